"""Code sandbox of the code reward: untrusted Python in bubblewrap namespaces; tests judged outside its process.

    run_tests("def add(a, b): return a + b", "assert add(2, 3) == 5").ok  ->  True
    run_python("assert 1 + 1 == 2").ok                                    ->  True (exit status 0)

`run_tests` is what the reward uses: the solution and the tests run in two sandboxes joined by a pipe, and a
solution scores only if the judge saw every test statement pass (protocol in `harness.py`). `run_python` runs one
program and reports its exit status, which a program can set at will: never use it as a reward.

Each program runs under bubblewrap (`bwrap`, https://github.com/containers/bubblewrap; Debian/Ubuntu:
`apt-get install -y bubblewrap`), which must be installed; without it (or when it cannot create namespaces) a
call raises `SandboxUnavailable` naming the tool and the install command. There is no weaker fallback.

What is guaranteed (Linux):
- namespaces: user, pid, mount, network, IPC, UTS (and cgroup where available). The program sees only its own
  processes (`os.getppid()` is bwrap's init, the trainer has no pid in there), no network but an empty loopback
  (no host port, no host AF_UNIX socket: no host path is mounted and abstract sockets are per network namespace);
- filesystem: a read-only view of /usr, the library dirs and this Python's prefixes only (no /etc, /home, /root,
  no project checkout); a private tmpfs at /sandbox (the working dir, also HOME), /tmp and /dev/shm, `tmpfs_mb`
  each; no path of the host is writable. The tests file is only in the judge's sandbox;
- an unprivileged uid (65534 inside) with no capability, checked by the harness before any untrusted code runs.
  On the host it is the trainer's uid, or 65534 when the trainer is root: then the sandbox gets a fresh user
  namespace mapping 65534 to host 65534, since host root is exempt from RLIMIT_NPROC;
- limits: wall clock (`timeout_s`, then everything is SIGKILLed), CPU seconds, address space, file size, no core
  dumps, and at most `max_processes` processes (threads included) counted per call (RLIMIT_NPROC in the call's
  own user namespace);
- nothing outlives a call: when the program ends (or is killed) bwrap's init dies and with it the whole pid
  namespace, double-forked `setsid` daemons included (`--die-with-parent` also covers a dying trainer).

Not covered: a total memory cap (RLIMIT_AS is per process: up to `max_processes` x `memory_mb`; a cgroup would
be needed) and a seccomp filter (the program may make any system call its namespaces allow).

Cost: one bwrap + Python start-up per program, two in parallel for `run_tests`: 1.1-1.6x the former single
`unshare`d process (medians 65 vs 58, 92 vs 59 and 143 vs 101 ms per call in three runs on a shared 2-core CPU
host; the spread is the host's load).
"""

from __future__ import annotations

import functools
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

from r1moe.rewards.harness import UNPRIVILEGED_ID as _SANDBOX_ID
from r1moe.rewards.harness import WORK_DIR

INSTALL_HINT = "install bubblewrap: `apt-get install -y bubblewrap` (Debian/Ubuntu; `dnf install bubblewrap` on Fedora)"
_HARNESS = Path(__file__).with_name("harness.py")


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot create namespaces here: code rewards cannot be computed safely."""


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0
    """Wall clock, seconds, for the whole call; everything it started is killed after it."""
    cpu_s: int = 10
    """CPU seconds per process (RLIMIT_CPU)."""
    memory_mb: int = 1024
    """Address space per process in MiB (RLIMIT_AS): a bigger allocation raises MemoryError."""
    file_size_mb: int = 16
    """Largest file a process may write, its captured stdout and stderr included (RLIMIT_FSIZE)."""
    tmpfs_mb: int = 64
    """Size of each private tmpfs (/sandbox, /tmp, /dev/shm): all the program can write."""
    max_processes: int = 64
    """Processes (threads included) of one sandbox at a time (RLIMIT_NPROC in its user namespace)."""
    max_output_chars: int = 10_000
    """stdout/stderr kept in the result (each)."""

    def __post_init__(self):
        for name in ("timeout_s", "cpu_s", "memory_mb", "file_size_mb", "tmpfs_mb", "max_processes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SandboxLimits.{name} must be > 0, got {getattr(self, name)!r}")
        if self.max_processes < 4:
            raise ValueError("SandboxLimits.max_processes must be >= 4 (bwrap's init, Python and its helpers)")


@dataclass
class SandboxResult:
    returncode: int | None
    """Exit status; 128 + N if the program died of signal N (bwrap's convention: 137 for the CPU-time SIGKILL), -9
    when the sandbox was killed at the timeout; None if it never started."""
    stdout: str
    stderr: str
    timed_out: bool

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


@dataclass
class TestReport:
    passed: int
    """Test statements the judge ran without an exception."""
    total: int
    """Top-level statements of the tests."""
    failures: list[str] = field(default_factory=list)
    """First failures, `tests.py:LINE: Error: message`, or why the run failed as a whole."""
    timed_out: bool = False
    solution_stderr: str = ""
    judge_stderr: str = ""

    @property
    def ok(self) -> bool:
        """Every statement passed, as reported by the judge."""
        return not self.timed_out and not self.failures and self.total > 0 and self.passed == self.total


# ---------------------------------------------------------------- bubblewrap


def _ro_mounts() -> list[str]:
    """bwrap arguments for the read-only view: /usr, the top-level library dirs, this Python's prefixes."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    if os.path.isfile("/etc/ld.so.cache"):  # the dynamic linker's index; nothing else of /etc
        args += ["--perms", "0755", "--dir", "/etc", "--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    prefixes = (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, os.path.dirname(sys.executable))
    roots = {resolve(p) for p in prefixes for resolve in (os.path.abspath, os.path.realpath)}
    roots.add(os.path.dirname(os.path.realpath(sys.executable)))
    covered, made = ["/usr"], set()
    for root in sorted(roots, key=len):
        if not any(root == c or root.startswith(c.rstrip("/") + "/") for c in covered):
            covered.append(root)
            # bwrap would create the missing parents (/root, /home/me) 0700, closed to the sandbox's uid.
            for parent in reversed(Path(root).parents[:-1]):
                if str(parent) not in made:
                    made.add(str(parent))
                    args += ["--perms", "0755", "--dir", str(parent)]
            args += ["--ro-bind", root, root]
    return args + ["--perms", "0755", "--dir", "/opt/r1moe", "--ro-bind", str(_HARNESS), "/opt/r1moe/harness.py"]


def _bwrap_argv(bwrap: str, userns_fd: int | None, files: dict[str, int], limits: SandboxLimits) -> list[str]:
    ns = ["--userns", str(userns_fd)] if userns_fd is not None else ["--unshare-user", "--uid", str(_SANDBOX_ID),
                                                                       "--gid", str(_SANDBOX_ID)]
    size = str(limits.tmpfs_mb << 20)
    # The tmpfs first: a read-only bind below it (a prefix under /tmp) stays visible.
    argv = [bwrap, *ns, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--perms", "01777", "--size", size, "--tmpfs", "/tmp",
            "--perms", "01777", "--size", size, "--tmpfs", WORK_DIR, *_ro_mounts(), "--proc", "/proc", "--dev", "/dev",
            "--perms", "01777", "--size", size, "--tmpfs", "/dev/shm"]  # POSIX semaphores (multiprocessing)
    for dest, fd in files.items():
        argv += ["--file", str(fd), f"{WORK_DIR}/{dest}"]
    return argv + ["--chdir", WORK_DIR]


class _UserNamespace:
    """When the trainer is root: a fresh user namespace mapping 0 -> 0 (bwrap sets up the mounts as root) and
    65534 -> host 65534 (what the program runs as, so that RLIMIT_NPROC applies). Its holder is a `cat` waiting on
    stdin. Otherwise (`fd` None) bwrap creates the namespace itself, mapping 65534 to the calling user."""

    def __init__(self):
        self.fd: int | None = None
        self._holder: subprocess.Popen | None = None
        if os.geteuid() != 0:
            return
        unshare = shutil.which("unshare")
        if unshare is None:
            raise SandboxUnavailable("the code sandbox needs `unshare` (util-linux) when run as root; "
                                     "install it: `apt-get install -y util-linux`")
        self._holder = subprocess.Popen([unshare, "--user", "cat"], stdin=subprocess.PIPE,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            own, path = os.readlink("/proc/self/ns/user"), f"/proc/{self._holder.pid}/ns/user"
            deadline = time.monotonic() + 10
            try:
                while os.readlink(path) == own and time.monotonic() < deadline:
                    time.sleep(0.0002)
                if os.readlink(path) == own:
                    raise SandboxUnavailable("`unshare --user` did not create a user namespace within 10 s")
            except FileNotFoundError:  # it exited
                self._holder.wait()
                raise SandboxUnavailable(f"`unshare --user` failed: {self._holder.stderr.read().decode().strip()}")
            try:
                for kind in ("uid", "gid"):
                    with open(f"/proc/{self._holder.pid}/{kind}_map", "w") as f:
                        f.write(f"0 0 1\n{_SANDBOX_ID} {_SANDBOX_ID} 1\n")
            except OSError as e:
                raise SandboxUnavailable(f"cannot map uids 0 and {_SANDBOX_ID} into a new user namespace ({e}); "
                                         "the host (or container) must have both ids") from None
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self._holder is not None:
            self._holder.kill()
            self._holder.wait()
            self._holder.stdin.close()
            self._holder.stderr.close()
            self._holder = None


@functools.cache
def _bwrap() -> str:
    """Path of a bwrap that works here (probed once), else SandboxUnavailable naming the tool and the fix."""
    exe = shutil.which("bwrap")
    if exe is None:
        raise SandboxUnavailable(f"the code sandbox needs bubblewrap (`bwrap`), which is not on PATH; {INSTALL_HINT}")
    result = _run(exe, "import sys; sys.exit(42)", SandboxLimits(timeout_s=30.0))
    if result.returncode != 42:
        raise SandboxUnavailable(
            f"bubblewrap ({exe}) cannot run a sandbox here (exit status {result.returncode}): {result.stderr.strip()}. "
            "It must be able to create user namespaces (kernel.unprivileged_userns_clone=1, or root; in a container, "
            f"one allowed to create namespaces); {INSTALL_HINT}")
    return exe


def _preexec(limits: SandboxLimits):
    def apply() -> None:
        # Hard limits too, so the program cannot raise them back. RLIMIT_NPROC is set by the harness inside.
        for which, value in ((resource.RLIMIT_CPU, max(1, int(limits.cpu_s))),
                             (resource.RLIMIT_AS, limits.memory_mb << 20),
                             (resource.RLIMIT_FSIZE, limits.file_size_mb << 20), (resource.RLIMIT_CORE, 0)):
            _, hard = resource.getrlimit(which)
            resource.setrlimit(which, (min(value, hard) if hard != resource.RLIM_INFINITY else value,) * 2)

    return apply


def _data_fd(text: str) -> int:
    """A descriptor of an unlinked file holding `text`, at offset 0 (bwrap --file copies it into the tmpfs)."""
    with tempfile.TemporaryFile() as f:
        f.write(text.encode("utf-8"))
        f.flush()
        fd = os.dup(f.fileno())
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


_ENV = {"PATH": "/usr/bin:/bin", "HOME": WORK_DIR, "TMPDIR": "/tmp", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class _Programs:
    """The bwrap processes of one call: started together, killed together, output captured to unlinked files
    (nothing is left on disk even if the trainer is killed)."""

    def __init__(self, bwrap: str, limits: SandboxLimits):
        self.bwrap, self.limits = bwrap, limits
        self.procs: list[subprocess.Popen] = []
        self.captured: dict[str, typing.BinaryIO] = {}
        self.userns = _UserNamespace()

    def start(self, name: str, mode: str, files: dict[str, str], fds: tuple[int, ...]) -> subprocess.Popen:
        file_fds = {dest: _data_fd(text) for dest, text in files.items()}
        passed = [*file_fds.values(), *fds] + ([self.userns.fd] if self.userns.fd is not None else [])
        argv = [*_bwrap_argv(self.bwrap, self.userns.fd, file_fds, self.limits), sys.executable, "-I",
                "/opt/r1moe/harness.py", mode, str(self.limits.max_processes), *map(str, fds)]
        try:
            for stream in ("out", "err"):
                self.captured[f"{name}.{stream}"] = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
            # preexec_fn only calls setrlimit (async-signal-safe in practice): the limits apply to bwrap and so to
            # everything in the sandbox before any of it runs.
            proc = subprocess.Popen(argv, env=_ENV, stdin=subprocess.DEVNULL, stdout=self.captured[f"{name}.out"],
                                    stderr=self.captured[f"{name}.err"], pass_fds=passed,
                                    preexec_fn=_preexec(self.limits), start_new_session=True)  # noqa: PLW1509
        finally:
            for fd in file_fds.values():
                os.close(fd)
        self.procs.append(proc)
        return proc

    def wait(self, deadline: float) -> bool:
        """Wait for every program until `deadline`; False if one was still running (then all are killed)."""
        finished = True
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                finished = False
                break
        return finished

    def output(self, name: str, stream: str) -> str:
        f = self.captured.get(f"{name}.{stream}")
        if f is None:
            return ""
        f.seek(0)
        limit = self.limits.max_output_chars
        return f.read(limit * 4).decode("utf-8", errors="replace")[:limit]

    def stop(self) -> None:
        """Kill whatever still runs and release the user namespace; the captured output stays readable."""
        for proc in self.procs:
            if proc.poll() is None:
                # bwrap leads its own process group; its sandbox dies with it (pid namespace, --die-with-parent).
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            proc.wait()
        self.userns.close()

    def close(self) -> None:
        self.stop()
        for f in self.captured.values():
            f.close()


def _run(bwrap: str, source: str, limits: SandboxLimits) -> SandboxResult:
    programs = _Programs(bwrap, limits)
    try:
        try:
            proc = programs.start("main", "run", {"main.py": source}, ())
        except OSError as e:
            return SandboxResult(None, "", f"sandbox failed to start: {e}", False)
        timed_out = not programs.wait(time.monotonic() + limits.timeout_s)
        programs.stop()
        return SandboxResult(proc.returncode, programs.output("main", "out"), programs.output("main", "err"),
                             timed_out)
    finally:
        programs.close()


def run_python(source: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run `source` as `__main__` in the sandbox; report its exit status and output (not a reward: see above)."""
    return _run(_bwrap(), source, limits)


def run_tests(solution: str, tests: str, limits: SandboxLimits = SandboxLimits()) -> TestReport:
    """Run every top-level statement of `tests` against `solution` (protocol in `harness.py`); `.ok` iff all
    passed. A `tests` that is not valid Python, has no statement or whose checks never run
    (`_check_tests_run_something`) is a ValueError (a data bug, not a failure)."""
    import ast

    try:
        tree = ast.parse(tests)
    except SyntaxError as e:
        raise ValueError(f"the tests are not valid Python: {e}") from None
    if not tree.body:
        raise ValueError("the tests have no statement: every solution would pass")
    _check_tests_run_something(tree)
    programs = _Programs(_bwrap(), limits)
    open_fds: set[int] = set()

    def close(*fds: int) -> None:
        for fd in fds:
            if fd in open_fds:
                open_fds.discard(fd)
                os.close(fd)

    try:
        # judge -> solution, solution -> judge, judge -> trainer (the result: no other process holds this pipe)
        (to_solution_r, to_solution_w), (to_judge_r, to_judge_w), (result_r, result_w) = pipes = \
            [os.pipe() for _ in range(3)]
        open_fds.update(fd for pair in pipes for fd in pair)
        programs.start("solution", "serve", {"main.py": solution}, (to_solution_r, to_judge_w))
        programs.start("judge", "judge", {"tests.py": tests}, (to_judge_r, to_solution_w, result_w))
        close(to_solution_r, to_solution_w, to_judge_r, to_judge_w, result_w)
        deadline = time.monotonic() + limits.timeout_s
        report = _read_result(result_r, deadline)
        timed_out = report is None and time.monotonic() >= deadline
        # The judge's result is complete (it closed the pipe): nothing the solution still runs can change it.
        programs.stop()
        if report is None:
            report = TestReport(0, len(tree.body), ["no result from the judge (timeout or crash)"])
        elif report.total != len(tree.body):
            report.failures.insert(0, f"the judge ran {report.total} statements, the tests have {len(tree.body)}")
        report.timed_out = timed_out
        report.solution_stderr = programs.output("solution", "err")
        report.judge_stderr = programs.output("judge", "err")
        return report
    finally:
        close(*list(open_fds))
        programs.close()


def _check_tests_run_something(tree) -> None:
    """ValueError for tests whose checks never run, which every solution that loads would pass: only definitions
    (pytest functions, unittest classes, HumanEval's `def check(candidate)` without `check(entry_point)`), or a
    top-level `check`/`test*` function that nothing calls (its asserts are skipped)."""
    import ast

    defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    checks = (ast.Assert, ast.Call, ast.Raise)
    if not any(isinstance(n, checks) for stmt in tree.body if not isinstance(stmt, defs) for n in ast.walk(stmt)):
        raise ValueError("the tests check nothing at top level (no assert, call or raise outside definitions: "
                         "pytest/unittest-style or an uncalled check function?): every solution would pass")
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    uncalled = [s.name for s in tree.body if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef))
                and (s.name == "check" or s.name.startswith("test")) and s.name not in used]
    if uncalled:
        raise ValueError(f"the tests define {', '.join(uncalled)} but never call it: its asserts would never run "
                         "(the judge runs top-level statements, not pytest)")


def _read_result(fd: int, deadline: float) -> TestReport | None:
    """The judge's JSON result, read until it closes the pipe; None on timeout or a malformed result."""
    import select

    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
        if sum(map(len, chunks)) > 1 << 20:
            return None
    try:
        data = json.loads(b"".join(chunks))
        passed, total, failures, protocol = data["passed"], data["total"], data["failures"], data["protocol_error"]
    except (ValueError, KeyError, TypeError):
        return None
    if type(passed) is not int or type(total) is not int or type(failures) is not list:
        return None
    if protocol is not None:
        failures = [f"protocol: {protocol}", *failures]
    return TestReport(passed=passed, total=total, failures=list(failures))

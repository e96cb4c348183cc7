"""Subprocess sandbox for the code reward: run untrusted Python with limits, report the exit status.

    run_python("assert 1 + 1 == 2").ok  ->  True

What is guaranteed (on Linux):
- wall-clock timeout: the whole process group is SIGKILLed at `timeout_s` (also kills children it forked);
- CPU time (RLIMIT_CPU), address space (RLIMIT_AS), size of any file written (RLIMIT_FSIZE, which also caps the
  captured stdout/stderr, written to files rather than pipes), no core dumps: set with `resource.setrlimit` in
  `preexec_fn`, inherited by everything the program starts;
- a fresh temporary working directory (also HOME and TMPDIR), removed afterwards whatever happened;
- a minimal environment (PATH, HOME, TMPDIR, LANG, single-threaded BLAS) and `python -I` (no PYTHON* variables, no
  user site-packages, the working dir not on sys.path);
- no network, twice over: when `unshare -rn` (unprivileged user + network namespace) or `unshare -n` (root) works,
  the program runs in an empty network namespace: not even the host's localhost is reachable. In addition, unless
  `block_sockets=False`, a startup guard replaces `socket.socket`, `create_connection` and `getaddrinfo` with
  functions that raise OSError. The guard alone is best effort (ctypes or a subprocess can get around it);
  `SandboxResult.network_isolated` says whether the namespace was used.

Not guaranteed: filesystem isolation (the program runs as the calling user and can read or write what that user
can) and a process-count limit (RLIMIT_NPROC counts every process of the user, and root ignores it). This is a
guard against accidents of model-written code (loops, memory blow-ups, stray connections), not against an
adversary; run untrusted code at scale inside a container as well.
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

_RUNNER = r"""
import socket, _socket

def _no_network(*args, **kwargs):
    raise OSError(101, "network access is disabled in the r1moe sandbox")

class _NoSocket(socket.socket):
    def __init__(self, *args, **kwargs):
        _no_network()

if BLOCK_SOCKETS:
    socket.socket = _socket.socket = _NoSocket
    socket.create_connection = socket.getaddrinfo = socket.socketpair = socket.fromfd = _no_network
del socket, _socket, _NoSocket

import runpy, sys
sys.argv = ["main.py"]
runpy.run_path("main.py", run_name="__main__")
"""


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0
    """Wall clock, seconds; the process group is killed after it."""
    cpu_s: int = 10
    """CPU seconds (RLIMIT_CPU)."""
    memory_mb: int = 1024
    """Address space in MiB (RLIMIT_AS): a bigger allocation raises MemoryError."""
    file_size_mb: int = 16
    """Largest file the program may write, stdout and stderr included (RLIMIT_FSIZE)."""
    max_output_chars: int = 10_000
    """stdout/stderr kept in the result (each)."""


@dataclass
class SandboxResult:
    returncode: int | None
    """Exit status; negative for a signal (e.g. -9 after a timeout); None if it never started."""
    stdout: str
    stderr: str
    timed_out: bool
    network_isolated: bool

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


@functools.cache
def network_isolation_prefix() -> tuple[str, ...]:
    """The `unshare` command line that gives the program an empty network namespace here, or () if none works."""
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    for flags in (("-rn",), ("-n",)):
        try:
            probe = subprocess.run([exe, *flags, "true"], check=False, capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return (exe, *flags)
    return ()


def _set_limit(which: int, value: int) -> None:
    _, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, value))


def _preexec(limits: SandboxLimits):
    def apply() -> None:
        # Hard limits too, so the program cannot raise them back.
        _set_limit(resource.RLIMIT_CPU, max(1, int(limits.cpu_s)))
        _set_limit(resource.RLIMIT_AS, limits.memory_mb << 20)
        _set_limit(resource.RLIMIT_FSIZE, limits.file_size_mb << 20)
        _set_limit(resource.RLIMIT_CORE, 0)

    return apply


def _read(path: Path, limit: int) -> str:
    try:
        with path.open("rb") as f:
            return f.read(limit * 4).decode("utf-8", errors="replace")[:limit]
    except OSError:
        return ""


def _wait_unreaped(pid: int, timeout_s: float) -> bool:
    """Wait up to `timeout_s` for `pid` to exit, leaving it a zombie (WNOWAIT); True if it exited."""
    deadline = time.monotonic() + timeout_s
    pause = 0.001
    while True:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(pause, left))
        pause = min(pause * 2, 0.02)


def run_python(source: str, limits: SandboxLimits = SandboxLimits(), block_sockets: bool = True) -> SandboxResult:
    """Run `source` as `__main__` in the sandbox described in the module docstring."""
    root = Path(tempfile.mkdtemp(prefix="r1moe-sandbox-"))
    try:
        work = root / "work"
        work.mkdir()
        (work / "main.py").write_text(source, encoding="utf-8")
        runner = f"BLOCK_SOCKETS = {block_sockets!r}\n" + _RUNNER
        prefix = network_isolation_prefix()
        env = {
            "PATH": os.defpath, "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        }
        out_path, err_path = root / "stdout", root / "stderr"
        with out_path.open("wb") as out, err_path.open("wb") as err:
            try:
                # preexec_fn only calls setrlimit (async-signal-safe in practice); it is what applies the limits
                # to the process (and unshare) before exec, so nothing in the program runs unlimited.
                proc = subprocess.Popen(
                    [*prefix, sys.executable, "-I", "-c", runner], cwd=work, env=env, stdin=subprocess.DEVNULL,
                    stdout=out, stderr=err, preexec_fn=_preexec(limits), start_new_session=True,  # noqa: PLW1509
                )
            except OSError as e:
                return SandboxResult(None, "", f"sandbox failed to start: {e}", False, bool(prefix))
            timed_out = not _wait_unreaped(proc.pid, limits.timeout_s)
            # Kill the group also after a normal exit (nothing the program forked may outlive it). The leader is
            # not reaped yet, so its process-group id cannot have been reused by an unrelated process.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        return SandboxResult(
            returncode=proc.returncode, stdout=_read(out_path, limits.max_output_chars),
            stderr=_read(err_path, limits.max_output_chars), timed_out=timed_out, network_isolated=bool(prefix),
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)

"""The programs that run inside the code sandbox (`sandbox.py` starts them): stdlib only, run as a script.

    python -I harness.py run   NPROC                         run /sandbox/main.py as __main__ (`run_python`)
    python -I harness.py serve NPROC FD_IN FD_OUT            load /sandbox/main.py, answer the judge's requests
    python -I harness.py judge NPROC FD_IN FD_OUT FD_RESULT  run /sandbox/tests.py against the served solution

Every mode first leaves the sandbox's user-namespace root for an unprivileged uid, caps the number of processes,
closes every file descriptor it was not given, and checks it holds no capability; only then does it run code.

Why two processes (`run_tests`): a test run in the solution's process can be won without solving the task (exit 0
before a failing assert, an `__eq__` that is always true, patched builtins, a forged "all passed" line). So the
solution and the tests never share a process. The *server* runs the solution and answers requests over a pipe;
the *judge*, in its own sandbox, runs the test statements with the solution's names bound to `Remote` stand-ins. A
call sends its arguments as plain data and gets back plain data (`decode` builds exact `int`, `str`, `list`, ...
values, so `==` in a test is the built-in comparison of the judge's own objects) or a handle to an object that
stays in the solution (a `Remote`: call, attribute, len, iter/next, getitem, in, bool, str; compared by identity,
never by a method of the solution). The judge alone writes the result, on a pipe only it and the trainer hold. What
the solution controls is what it returns to each call, which is exactly what a correct solution controls.

What tests can do (the test source format is unchanged: Python statements, usually asserts, naming the solution's
functions): call them with plain data, use the objects they return as above, catch the built-in exceptions they
raise (a subclass arrives as its nearest built-in class, others as `SolutionError`), see in-place changes to
list/dict/set arguments, capture what a call prints (it is written to the judge's stdout), use a standard module
the solution imported (`math.isclose(...)` without `import math`: the judge imports its own `math`, whatever the
solution bound to the name). What they cannot: pass a function or another non-plain object to the solution;
compare an object of the solution with `==` (identity only: return plain data); see a solution global change
after the start (globals are copied once, and only the names the tests spell out); use a solution name that
shadows a built-in (the tests see the built-in, or `def abs(x): return 0` would rewrite `assert abs(f(x) - y) < 1e-9`).

Wire format: one JSON object per line. A value is a tagged list: ["N"] None, ["B", b] bool, ["I", hex] int,
["F", hex] float, ["C", hex, hex] complex, ["S", s] str, ["Y", latin-1 str] bytes, ["L", [...]] list,
["T", [...]] tuple, ["E", [...]] set, ["Z", [...]] frozenset, ["D", [[k, v], ...]] dict, ["R", hex, hex, hex]
range, ["H", n] handle,
["M", name] a module of the standard library (the judge imports its own copy).
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import importlib
import io
import json
import os
import resource
import sys
import traceback

UNPRIVILEGED_ID = 65534
WORK_DIR = "/sandbox"
"""The private tmpfs the programs run in (a name no host prefix is likely to use; mounted before them anyway)."""
MAX_LINE_BYTES = 64 << 20
"""A reply longer than this is a protocol failure (the judge's memory is bounded too)."""
_NO_IMPORT = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "ensurepip"}
"""Standard modules with side effects on import: never imported by the judge on the solution's say."""


class ProtocolError(Exception):
    """The solution's side sent something that is not a well-formed reply, or its process ended. Recorded even if a
    test catches it, so `try: f() / except Exception:` cannot turn a dead or lying server into a pass."""

    def __init__(self, message: str):
        super().__init__(message)
        PROTOCOL_ERRORS.append(message)


PROTOCOL_ERRORS: list[str] = []


class SolutionError(Exception):
    """The solution raised an exception that is not one of Python's built-in `Exception` classes."""


# ---------------------------------------------------------------- start-up shared by every mode


def _enter_sandbox(nproc: int, keep_fds: tuple[int, ...]) -> None:
    if os.getuid() == 0:  # root of the sandbox's user namespace (the trainer is root): drop to the mapped uid
        os.setgroups([])
        os.setresgid(UNPRIVILEGED_ID, UNPRIVILEGED_ID, UNPRIVILEGED_ID)
        os.setresuid(UNPRIVILEGED_ID, UNPRIVILEGED_ID, UNPRIVILEGED_ID)
    # Set here, not before bwrap: the limit counts this user namespace's processes only once it exists.
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    keep = sorted({0, 1, 2, *keep_fds})
    for low, high in zip(keep, [*keep[1:], resource.getrlimit(resource.RLIMIT_NOFILE)[0]]):
        os.closerange(low + 1, high)
    with open("/proc/self/status") as f:
        caps = {line.split(":")[0]: int(line.split()[1], 16) for line in f if line.startswith("Cap")}
    if os.getuid() == 0 or caps["CapEff"] or caps["CapPrm"]:
        sys.stderr.write(f"r1moe sandbox: still privileged after dropping (uid {os.getuid()}, caps {caps})\n")
        os._exit(70)


# ---------------------------------------------------------------- wire format


def encode(value, handle_of=None):
    """Tagged plain data; anything else becomes `handle_of(value)` (a handle or a module), or TypeError if None."""
    t = type(value)
    if value is None:
        return ["N"]
    if t is bool:
        return ["B", value]
    if isinstance(value, int) and t is not bool:
        return ["I", hex(int(value))]
    if isinstance(value, float):
        return ["F", float(value).hex()]
    if isinstance(value, complex):
        return ["C", value.real.hex(), value.imag.hex()]
    if isinstance(value, str):
        return ["S", str(value)]
    if isinstance(value, (bytes, bytearray)):
        return ["Y", bytes(value).decode("latin-1")]
    if isinstance(value, (list, tuple, set, frozenset)):
        tag = "L" if isinstance(value, list) else "T" if isinstance(value, tuple) else \
            "Z" if isinstance(value, frozenset) else "E"
        return [tag, [encode(v, handle_of) for v in value]]
    if isinstance(value, dict):
        return ["D", [[encode(k, handle_of), encode(v, handle_of)] for k, v in value.items()]]
    if t is range:
        return ["R", hex(value.start), hex(value.stop), hex(value.step)]
    if handle_of is None:
        raise TypeError(f"cannot send a {t.__name__} across the sandbox: only plain data (None, bool, int, float, "
                        "complex, str, bytes, list, tuple, set, frozenset, dict, range) and handles from the solution")
    return handle_of(value)


def decode(data, remote_of=None):
    """The value `data` encodes, built from exact built-in types; ProtocolError for anything malformed."""
    try:
        return _decode(data, remote_of)
    except ProtocolError:
        raise
    except Exception as e:  # noqa: BLE001 - bad hex, unhashable key, too deep, unknown module: all malformed
        raise ProtocolError(f"malformed value: {type(e).__name__}: {e}") from None


def _decode(data, remote_of):
    if not isinstance(data, list) or not data or not isinstance(data[0], str):
        raise ProtocolError(f"not a tagged value: {str(data)[:80]}")
    tag, args = data[0], data[1:]

    def arg(kind):
        if len(args) != 1 or type(args[0]) is not kind:
            raise ProtocolError(f"bad payload for tag {tag!r}")
        return args[0]

    if tag == "N" and not args:
        return None
    if tag == "B":
        return arg(bool)
    if tag == "I":
        return int(arg(str), 16)
    if tag == "F":
        return float.fromhex(arg(str))
    if tag == "C":
        if len(args) != 2 or not all(type(a) is str for a in args):
            raise ProtocolError("bad complex")
        return complex(float.fromhex(args[0]), float.fromhex(args[1]))
    if tag == "R":
        if len(args) != 3 or not all(type(a) is str for a in args):
            raise ProtocolError("bad range")
        return range(*(int(a, 16) for a in args))
    if tag == "S":
        return arg(str)
    if tag == "Y":
        return arg(str).encode("latin-1")
    if tag in "LTEZ" and len(tag) == 1:
        items = [_decode(d, remote_of) for d in arg(list)]
        return {"L": list, "T": tuple, "E": set, "Z": frozenset}[tag](items)
    if tag == "D":
        pairs = arg(list)
        if not all(type(p) is list and len(p) == 2 for p in pairs):
            raise ProtocolError("bad dict")
        return {_decode(k, remote_of): _decode(v, remote_of) for k, v in pairs}
    if tag == "H" and remote_of is not None:
        return remote_of(arg(int))
    if tag == "M":
        name = arg(str)
        if not _importable(name):
            raise ProtocolError(f"module {name!r} is not a public module of the standard library")
        return importlib.import_module(name)
    raise ProtocolError(f"unknown tag {tag!r}")


def _importable(name: str) -> bool:
    """A public standard module without import side effects: the judge imports its own copy of it."""
    parts = name.split(".")
    return parts[0] in sys.stdlib_module_names and parts[0] not in _NO_IMPORT and not any(
        p.startswith("_") or not p.isidentifier() for p in parts)


def _send(f, obj) -> None:
    f.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
    f.flush()


# ---------------------------------------------------------------- the solution's side


def _builtin_exception_name(cls: type) -> str:
    """The nearest built-in class of an exception (json.JSONDecodeError, a solution's `class BadInput(ValueError)`
    -> ValueError), so `except ValueError:` in a test catches it as it would in one process; the class's own name
    when the nearest is Exception or BaseException (the judge then raises SolutionError naming it). Nothing new for
    the solution: it may raise any built-in exception itself."""
    for base in cls.__mro__:
        if base in (Exception, BaseException, object):
            break
        if getattr(builtins, base.__name__, None) is base:
            return base.__name__
    return cls.__name__


def serve(fd_in: int, fd_out: int) -> None:
    """Run /sandbox/main.py, then answer requests until the judge closes the pipe. Nothing here is trusted."""
    rfile, wfile = os.fdopen(fd_in, "rb"), os.fdopen(fd_out, "wb")
    handles: dict[int, object] = {}

    def handle_of(obj):
        name = getattr(obj, "__name__", None)
        if type(obj).__name__ == "module" and isinstance(name, str) and _importable(name):
            return ["M", name]
        if type(obj).__module__ == "numpy" and hasattr(obj, "item") and not hasattr(obj, "__len__"):
            return encode(obj.item(), handle_of)  # a numpy scalar, e.g. int64
        handles[id(obj)] = obj
        return ["H", id(obj)]

    def value(data):
        return decode(data, lambda h: handles[h])

    ns = {"__name__": "__main__", "__file__": f"{WORK_DIR}/main.py", "__builtins__": builtins}
    try:
        with open(f"{WORK_DIR}/main.py", encoding="utf-8") as f:
            exec(compile(f.read(), "main.py", "exec"), ns)  # noqa: S102 - running the solution is the point
    except SystemExit:
        pass  # a script that ends with sys.exit(): what it defined is served
    except BaseException as e:  # noqa: BLE001 - any failure is reported to the judge, which fails every test
        traceback.print_exc()
        _send(wfile, {"load_error": f"{type(e).__name__}: {e}"[:2000]})
        return
    _send(wfile, {"ready": True})
    ops = {
        "getattr": lambda obj, r: getattr(obj, r["name"]),
        "len": lambda obj, r: len(obj),
        "iter": lambda obj, r: iter(obj),
        "next": lambda obj, r: next(obj),
        "bool": lambda obj, r: bool(obj),
        "str": lambda obj, r: str(obj),
        "repr": lambda obj, r: repr(obj),
        "getitem": lambda obj, r: obj[value(r["key"])],
        "contains": lambda obj, r: value(r["item"]) in obj,
    }

    def answer(req: dict) -> dict:
        if req["op"] == "globals":
            return {"ok": {n: encode(ns[n], handle_of) for n in req["names"] if n in ns}}
        if req["op"] == "call":
            args = [value(a) for a in req["args"]]
            kwargs = {k: value(v) for k, v in req["kwargs"].items()}
            result = handles[req["h"]](*args, **kwargs)
            # In-place changes to list/dict/set arguments go back, so `f(a); assert a == ...` works.
            after = [encode(a, handle_of) if type(a) in (list, dict, set) else None for a in args]
            return {"ok": encode(result, handle_of), "after": after}
        return {"ok": encode(ops[req["op"]](handles[req["h"]], req), handle_of)}

    while line := rfile.readline():
        printed = io.StringIO()  # what a call prints goes to the judge's stdout, which a test may capture
        try:
            with contextlib.redirect_stdout(printed):
                reply = answer(json.loads(line))
        except BaseException as e:  # noqa: BLE001 - the judge decides what an exception means
            reply = {"err": [_builtin_exception_name(type(e)), str(e)[:2000]]}
        if printed.getvalue():
            reply["out"] = printed.getvalue()
        _send(wfile, reply)


# ---------------------------------------------------------------- the judge's side


class _Channel:
    def __init__(self, fd_in: int, fd_out: int):
        self.rfile, self.wfile = os.fdopen(fd_in, "rb"), os.fdopen(fd_out, "wb")

    def receive(self) -> dict:
        line = self.rfile.readline(MAX_LINE_BYTES)
        if not line.endswith(b"\n"):
            raise ProtocolError("the solution's process ended or sent an over-long reply")
        try:
            reply = json.loads(line)
        except ValueError:
            raise ProtocolError("a reply is not JSON") from None
        if type(reply) is not dict:
            raise ProtocolError("a reply is not an object")
        return reply

    def request(self, req: dict):
        try:
            _send(self.wfile, req)
        except BrokenPipeError:
            raise ProtocolError("the solution's process has ended") from None
        reply = self.receive()
        out = reply.pop("out", "")
        if type(out) is not str:
            raise ProtocolError("bad printed output")
        sys.stdout.write(out)
        if set(reply) == {"err"}:
            err = reply["err"]
            if type(err) is not list or len(err) != 2 or not all(type(e) is str for e in err):
                raise ProtocolError("bad error reply")
            name, msg = err
            cls = getattr(builtins, name, None)
            if name == "StopIteration" and req["op"] == "next":
                raise StopIteration
            # StopIteration from anything but next() would end a map()/filter() over the solution's answers early
            # (`all(map(check, cases))` -> True), so it is a SolutionError like the non-built-in exceptions.
            error = SolutionError(f"{name}: {msg}")
            if isinstance(cls, type) and issubclass(cls, Exception) and cls is not StopIteration:
                try:
                    error = cls(msg)
                except TypeError:  # e.g. UnicodeDecodeError takes five arguments
                    pass
            raise error
        if "ok" not in reply or not set(reply) <= {"ok", "after"}:
            raise ProtocolError("bad reply")
        return reply


_CHANNEL: _Channel | None = None


def _remote_of(h: int) -> Remote:
    return Remote(h)


def _request(h: int, op: str, **fields):
    return decode(_CHANNEL.request({"op": op, "h": h, **fields})["ok"], _remote_of)


def _send_value(value):
    return encode(value, lambda v: ["H", v._h] if type(v) is Remote else encode(v))


class Remote:
    """An object that lives in the solution's process. Equality and hashing are identity (object's), so no
    solution-defined `__eq__`/`__hash__` ever decides a comparison."""

    __slots__ = ("_h",)

    def __init__(self, h: int):
        self._h = h

    def __call__(self, *args, **kwargs):
        reply = _CHANNEL.request({"op": "call", "h": self._h, "args": [_send_value(a) for a in args],
                                  "kwargs": {k: _send_value(v) for k, v in kwargs.items()}})
        after = reply.get("after")
        if type(after) is not list or len(after) != len(args):
            raise ProtocolError("bad call reply")
        for arg, state in zip(args, after):
            if type(arg) in (list, dict, set) and state is not None:
                new = decode(state, _remote_of)
                if type(new) is not type(arg):
                    raise ProtocolError("an argument changed type")
                if type(arg) is list:
                    arg[:] = new
                else:
                    arg.clear()
                    arg.update(new)
        return decode(reply["ok"], _remote_of)

    def __getattr__(self, name: str):
        if name.startswith("__") and name not in ("__name__", "__qualname__"):  # no protocol goes to the solution
            raise AttributeError(name)
        return _request(self._h, "getattr", name=name)

    def __len__(self):
        n = _request(self._h, "len")
        if type(n) is not int:
            raise TypeError("len() of a solution object is not an int")
        return n

    def __iter__(self):
        return _request(self._h, "iter")

    def __next__(self):
        return _request(self._h, "next")

    def __getitem__(self, key):
        return _request(self._h, "getitem", key=_send_value(key))

    def __contains__(self, item):
        return _strict(_request(self._h, "contains", item=_send_value(item)), bool)

    def __bool__(self):
        return _strict(_request(self._h, "bool"), bool)

    def __str__(self):
        return _strict(_request(self._h, "str"), str)

    def __repr__(self):
        return _strict(_request(self._h, "repr"), str)


def _strict(value, kind):
    if type(value) is not kind:
        raise ProtocolError(f"expected a {kind.__name__} from the solution")
    return value


def _free_names(tree: ast.Module) -> list[str]:
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    # A built-in (or a dunder name) is never replaced by the solution's.
    return sorted(n for n in names if not hasattr(builtins, n) and not n.startswith("__"))


def _module_names(tree: ast.Module) -> list[str]:
    """Names the tests use as `name.attr` that are public standard modules (`math.isclose`, `re.match`): tests that
    lean on the solution's `import math` get the judge's own module, never what the solution bound to the name (a
    `math` whose `isclose` answers True would decide `assert math.isclose(f(x), y)`)."""
    names = {n.value.id for n in ast.walk(tree)
             if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and isinstance(n.value.ctx, ast.Load)}
    return sorted(n for n in names if not hasattr(builtins, n) and _importable(n))


def judge(fd_in: int, fd_out: int, fd_result: int) -> None:
    """Run each top-level statement of /sandbox/tests.py; write {"passed", "total", "failures", "protocol_error"} on
    `fd_result`."""
    global _CHANNEL
    result = os.fdopen(fd_result, "w")
    with open(f"{WORK_DIR}/tests.py", encoding="utf-8") as f:
        tree = ast.parse(f.read(), "tests.py")
    total, passed, failures = len(tree.body), 0, []
    _CHANNEL = _Channel(fd_in, fd_out)
    try:
        first = _CHANNEL.receive()
        if "load_error" in first:
            raise SolutionError(f"the solution failed to load: {first['load_error']}")
        if first != {"ready": True}:
            raise ProtocolError("bad first message")
        modules = _module_names(tree)
        wanted = [n for n in _free_names(tree) if n not in modules]
        found = _CHANNEL.request({"op": "globals", "h": 0, "names": wanted})["ok"]
        # Only names asked for: an extra `__builtins__` (or any name the tests did not spell) would replace what
        # the tests rely on, e.g. `abs` in `assert abs(f(x) - y) < 1e-9`.
        if type(found) is not dict or not set(found) <= set(wanted):
            raise ProtocolError("the globals reply has names that were not asked for")
        ns = {"__name__": "__main__", "__builtins__": builtins}
        ns.update({name: decode(data, _remote_of) for name, data in found.items()})
        for name in modules:
            try:
                ns[name] = importlib.import_module(name)
            except Exception:  # noqa: BLE001, S112 - not importable here: the name stays unbound (NameError)
                continue
    except Exception as e:  # noqa: BLE001 - reported as the failure of every statement
        failures.append(f"{type(e).__name__}: {e}")
        ns = None
    if ns is not None:
        for stmt in tree.body:
            try:
                exec(compile(ast.Module([stmt], []), "tests.py", "exec"), ns)  # noqa: S102 - the dataset's tests
            except Exception as e:  # noqa: BLE001 - a failing statement is a failed test
                failures.append(f"tests.py:{stmt.lineno}: {type(e).__name__}: {str(e)[:500]}")
            else:
                passed += 1
    result.write(json.dumps({"passed": passed, "total": total, "failures": failures[:20],
                             "protocol_error": PROTOCOL_ERRORS[0] if PROTOCOL_ERRORS else None}))
    result.close()


# ---------------------------------------------------------------- entry


def main(argv: list[str]) -> None:
    mode, nproc, fds = argv[0], int(argv[1]), tuple(int(a) for a in argv[2:])
    _enter_sandbox(nproc, fds)
    if mode == "run":
        import runpy

        sys.argv = ["main.py"]
        runpy.run_path(f"{WORK_DIR}/main.py", run_name="__main__")
    elif mode == "serve":
        serve(*fds)
    elif mode == "judge":
        judge(*fds)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])

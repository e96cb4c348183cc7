"""Code sandbox, used for real (bubblewrap): programs, the judged test run, limits, the code-accuracy reward.

Attacks on the reward and escape attempts are in test_sandbox_exploits.py. These tests need a working `bwrap`
(`.ci/run` installs it); without one they fail with SandboxUnavailable, never skip."""

import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from r1moe.data import PromptSample
from r1moe.rewards import SandboxLimits, accuracy_reward, rule, run_python, sandbox
from r1moe.rewards.sandbox import SandboxUnavailable, run_tests

FAST = SandboxLimits(timeout_s=5.0, cpu_s=3, memory_mb=512)


@pytest.mark.parametrize("source,ok", [
    ("assert sum([1, 2, 3]) == 6", True),
    ("from __future__ import annotations\ndef f(x: int) -> int: return x\nassert f(1) == 1", True),
    ("assert 1 + 1 == 3", False),
    ("raise SystemExit(3)", False),
    ("import sys; sys.exit(0)", True),  # run_python reports the exit status: why it is not the reward
    ("this is not python", False),
    ("from multiprocessing import Pool\nwith Pool(2) as pool:\n    assert pool.map(abs, [-1, -2]) == [1, 2]", True),
])
def test_run_python_reports_the_exit_status(source, ok):
    assert run_python(source, FAST).ok is ok


def test_infinite_loop_is_killed_within_the_timeout():
    start = time.monotonic()
    result = run_python("while True:\n    pass", FAST)
    assert not result.ok and (result.timed_out or result.returncode == 128 + 9)  # wall clock or CPU time
    assert time.monotonic() - start < FAST.timeout_s + 3.0


@pytest.mark.parametrize("bomb", [
    "x = bytearray(8 * 1024 ** 3)",
    "chunks = []\nwhile True:\n    chunks.append(bytearray(64 * 1024 ** 2))",
])
def test_memory_bomb_fails(bomb):
    result = run_python(bomb, FAST)
    assert not result.ok
    assert "MemoryError" in result.stderr or result.returncode == 128 + 9


def test_private_working_dir_and_minimal_environment():
    result = run_python("import os\nprint(os.getcwd())\nprint(sorted(os.environ))\nprint(os.getuid())\n"
                        "open('f.txt', 'w').write('x')\nopen('/tmp/g.txt', 'w').write('y')\nprint('wrote')", FAST)
    assert result.ok, result.stderr
    cwd, env, uid, wrote = result.stdout.splitlines()
    assert cwd == sandbox.WORK_DIR and uid == "65534" and wrote == "wrote"
    assert "PYTHONPATH" not in env and "VIRTUAL_ENV" not in env


ADD_TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\nassert add(10, 5) == 15"


@pytest.mark.parametrize("solution,tests,passed", [
    ("def add(a, b): return a + b", ADD_TESTS, 3),
    ("def add(a, b): return abs(a) + b", ADD_TESTS, 2),  # wrong for a < 0 only
    ("def add(a, b):\n    print('debug', a)\n    return a + b", ADD_TESTS, 3),  # prints do not disturb the pipe
    ("import sys\ndef add(a, b): return a + b\nsys.exit(0)", ADD_TESTS, 3),  # a script ending in sys.exit
    # HumanEval style: check(candidate), helper names, float tolerance
    ("def mean(xs): return sum(xs) / len(xs)",
     ("def check(candidate):\n    assert abs(candidate([1, 2]) - 1.5) < 1e-9\n    assert candidate([3]) == 3\n"
      "check(mean)"), 2),
    # plain data of every kind crosses
    ("def f(): return None, True, 2**100, -0.5, 1j, 's', b'\\x00\\xff', [1], (2,), {3}, frozenset({4}), {'k': [5]}",
     ("assert f() == (None, True, 2**100, -0.5, 1j, 's', b'\\x00\\xff', [1], (2,), {3}, frozenset({4}), {'k': [5]})\n"
      "assert type(f()[2]) is int and type(f()[0]) is type(None)"), 2),
    # objects stay in the solution: methods, len, iteration, indexing, in, str
    (("class Stack:\n    def __init__(self): self.items = []\n    def push(self, x): self.items.append(x)\n"
      "    def pop(self): return self.items.pop()\n    def __len__(self): return len(self.items)\n"
      "    def __iter__(self): return iter(self.items)\n    def __getitem__(self, i): return self.items[i]\n"
      "    def __contains__(self, x): return x in self.items\n    def __str__(self): return f'Stack{self.items}'"),
     ("s = Stack()\ns.push(1)\ns.push(2)\nassert len(s) == 2 and list(s) == [1, 2] and s[0] == 1 and 2 in s\n"
      "assert str(s) == 'Stack[1, 2]'\nassert s.pop() == 2 and s.items == [1]"), 6),
    ("def gen(n):\n    yield from range(n)", "assert list(gen(3)) == [0, 1, 2]\nassert sum(gen(4)) == 6", 2),
    ("def evens(r):\n    return r[::2]",
     "assert evens(range(6)) == range(0, 6, 2)\nassert evens.__name__ == 'evens'", 2),
    # in-place changes to arguments come back
    ("def rotate(xs):\n    xs[:] = xs[1:] + xs[:1]", "a = [1, 2, 3]\nrotate(a)\nassert a == [2, 3, 1]", 3),
    # expected exceptions
    ("def inv(x):\n    if x == 0:\n        raise ValueError('zero')\n    return 1 / x",
     ("try:\n    inv(0)\nexcept ValueError:\n    pass\nelse:\n    raise AssertionError('no error')\n"
      "assert inv(2) == 0.5"), 2),
    # what a call prints can be captured by the tests
    ("def greet(n):\n    print(f'hi {n}')",
     ("import io, contextlib\nbuf = io.StringIO()\nwith contextlib.redirect_stdout(buf):\n    greet('bo')\n"
      "assert buf.getvalue() == 'hi bo\\n'"), 4),
    # modules the solution imported, names the tests import themselves
    ("import math\ndef hyp(a, b): return math.hypot(a, b)", "import math\nassert math.isclose(hyp(3, 4), 5.0)", 2),
    ("def f(x): return x", "assert f(1) == 1\nassert g(1) == 1", 1),  # a missing name fails its statement
    ("def add(a, b) return a + b", ADD_TESTS, 0),  # syntax error: nothing passes
    ("raise RuntimeError('at import')\ndef add(a, b): return a + b", ADD_TESTS, 0),
])
def test_run_tests_counts_passing_statements(solution, tests, passed):
    report = run_tests(solution, tests, FAST)
    assert report.passed == passed, (report.failures, report.solution_stderr, report.judge_stderr)
    assert report.ok is (passed == report.total)


def test_run_tests_names_the_failing_line():
    report = run_tests("def add(a, b): return 0", "assert add(0, 0) == 0\nassert add(1, 1) == 2", FAST)
    assert not report.ok and report.failures == ["tests.py:2: AssertionError: "]


@pytest.mark.parametrize("tests,match", [("", "no statement"), ("assert (", "not valid Python")])
def test_bad_tests_are_an_error(tests, match):
    with pytest.raises(ValueError, match=match):
        run_tests("def add(a, b): return a + b", tests, FAST)


def test_missing_bwrap_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no bwrap on PATH
    sandbox._bwrap.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable, match=r"bubblewrap.*apt-get install -y bubblewrap"):
            run_tests("def add(a, b): return a + b", ADD_TESTS, FAST)
        with pytest.raises(SandboxUnavailable, match="bubblewrap"):
            run_python("pass", FAST)
    finally:
        sandbox._bwrap.cache_clear()


def test_bwrap_that_cannot_create_namespaces_is_a_clear_error(monkeypatch, tmp_path):
    # What bwrap prints in a container that forbids namespaces; the real tool is not run.
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    sandbox._bwrap.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable, match="cannot run a sandbox here.*No permissions to create new"):
            run_tests("def add(a, b): return a + b", ADD_TESTS, FAST)
    finally:
        sandbox._bwrap.cache_clear()


def test_concurrent_calls_do_not_mix():
    # Each call's pipes and files stay its own: a descriptor leaked into another call's sandbox would keep its
    # judge waiting, a mixed-up result would give the wrong count.
    jobs = [("def add(a, b): return a + b", 3), ("def add(a, b): return abs(a) + b", 2), ("def add(a, b): return 0", 1)]
    with ThreadPoolExecutor(max_workers=3) as pool:
        reports = list(pool.map(lambda job: run_tests(job[0], ADD_TESTS, FAST), jobs * 2))
    assert [r.passed for r in reports] == [passed for _, passed in jobs * 2]


CODE = PromptSample(prompt="Write add(a, b).", answer="", kind="code", tests=ADD_TESTS)


@pytest.mark.parametrize("completion,expected", [
    ("<think>easy</think><answer>\n```python\ndef add(a, b):\n    return a + b\n```\n</answer>", 1.0),
    ("<think>easy</think><answer>\n```python\ndef add(a, b):\n    return a - b\n```\n</answer>", 0.0),
    ("```python\ndef add(a, b):\n    return 0\n```\nfixed:\n```python\ndef add(a, b):\n    return a + b\n```", 1.0),
    ("<answer>def add(a, b): return a + b</answer>", 1.0),  # answer without a fence
    ("<answer>```python\ndef add(a, b):\n    while True: pass\n```</answer>", 0.0),
    ("<answer>```python\nimport sys\nsys.exit(0)\n```</answer>", 0.0),
    ("no code here", 0.0),
])
def test_code_accuracy(monkeypatch, completion, expected):
    monkeypatch.setattr(rule, "CODE_LIMITS", FAST)
    assert accuracy_reward(completion, CODE) == expected


def test_code_sample_without_tests_is_an_error():
    with pytest.raises(ValueError, match="no tests"):
        accuracy_reward("<answer>pass</answer>", PromptSample(prompt="p", answer="", kind="code"))


def test_code_sample_with_broken_tests_names_the_sample():
    sample = PromptSample(prompt="p", answer="", kind="code", tests="assert (", id="c7")
    with pytest.raises(ValueError, match="'c7'.*not valid Python"):
        accuracy_reward("<answer>pass</answer>", sample)

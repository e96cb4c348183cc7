"""Hard cases of the code judge: wrong programs that must not score, right programs that must.

- A test that leans on the solution's `import math` (`assert math.isclose(f(x), y)` with no import of its own, as
  in MBPP) took `math` from the solution, which could bind it to an object whose `isclose` answers True.
- Tests whose checks never run (pytest/unittest style, HumanEval's `check` never called) passed every solution.
- A solution exception that subclasses a built-in one (json.JSONDecodeError, `class BadInput(ValueError)`) was not
  caught by `except ValueError:` in a test.
"""

import pytest

from r1moe.rewards.sandbox import SandboxLimits, run_tests

FAST = SandboxLimits(timeout_s=5.0, cpu_s=3, memory_mb=512)

FAKE_MATH = ("class _M:\n    isclose = staticmethod(lambda *a, **k: True)\n    sqrt = staticmethod(lambda x: 0)\n"
             "math = _M()\ndef volume(r):\n    return 0.0\n")
MATH_TESTS = "assert math.isclose(volume(10), 4188.790204786391, rel_tol=0.001)\nassert volume(4) == math.sqrt(16) * 0"


def test_a_fake_module_does_not_decide_the_tests():
    report = run_tests(FAKE_MATH, MATH_TESTS, FAST)
    assert not report.ok and report.passed == 1, report  # only the second statement holds (0.0 == 0.0)
    # a fake module the solution sends as a standard module of another name (cmath) changes nothing either
    assert not run_tests("import cmath as math\ndef volume(r):\n    return 0.0\n", MATH_TESTS, FAST).ok


def test_the_judges_module_serves_a_right_solution():
    right = "import math\ndef volume(r):\n    return 4 / 3 * math.pi * r ** 3\n"
    assert run_tests(right, MATH_TESTS.splitlines()[0], FAST).ok
    # without any import in the solution either: the tests' `math` is the judge's
    assert run_tests("def volume(r):\n    return 4 / 3 * 3.141592653589793 * r ** 3\n",
                     MATH_TESTS.splitlines()[0], FAST).ok
    # a solution function whose name is a module but is only called, never `name.attr`: still the solution's
    assert run_tests("def copy(xs):\n    return list(xs)\n", "assert copy((1, 2)) == [1, 2]", FAST).ok


UNITTEST = ("import unittest\nclass T(unittest.TestCase):\n    def test_a(self):\n"
            "        self.assertEqual(add(2, 3), 5)\n")


@pytest.mark.parametrize("tests,match", [
    ("def test_add():\n    assert add(2, 3) == 5\n", "check nothing"),  # pytest style
    (UNITTEST, "check nothing"),  # unittest style, never run
    ("METADATA = {'author': 'x'}\ndef check(candidate):\n    assert candidate(2, 3) == 5\n", "check nothing"),
    ("assert add(1, 1) == 2\ndef test_add():\n    assert add(2, 3) == 5\n", "never call"),  # half skipped
])
def test_tests_whose_checks_never_run_are_an_error(tests, match):
    with pytest.raises(ValueError, match=match):
        run_tests("def add(a, b):\n    return 0\n", tests, FAST)


def test_checks_that_are_called_still_run():
    wrong, right = "def add(a, b):\n    return 0\n", "def add(a, b):\n    return a + b\n"
    humaneval = "def check(candidate):\n    assert candidate(2, 3) == 5\ncheck(add)\n"
    pytest_main = "def test_add():\n    assert add(2, 3) == 5\nif __name__ == '__main__':\n    test_add()\n"
    for tests in (humaneval, pytest_main):
        assert run_tests(right, tests, FAST).ok and not run_tests(wrong, tests, FAST).ok


@pytest.mark.parametrize("solution", [
    "class BadInput(ValueError):\n    pass\ndef f(x):\n    if x < 0:\n        raise BadInput('neg')\n    return x\n",
    "import json\ndef f(x):\n    return json.loads('{' if x < 0 else str(x))\n",  # JSONDecodeError(ValueError)
])
def test_a_subclass_of_a_built_in_exception_is_caught_as_it(solution):
    tests = ("try:\n    f(-1)\nexcept ValueError:\n    pass\nelse:\n    raise AssertionError('no error')\n"
             "assert f(2) == 2")
    report = run_tests(solution, tests, FAST)
    assert report.ok, report
    # and never as an exception it is not
    assert not run_tests(solution, tests.replace("ValueError", "KeyError"), FAST).ok

"""Grading of the public benchmarks R1 reports (v2 D.1): multiple-choice letters (GPQA Diamond) and LiveCodeBench
test cases run in the code sandbox. Math benchmarks (AIME 2024, MATH-500) are graded by the accuracy reward
(`rule.accuracy_reward`: the last `\\boxed{}` / `<answer>`, math-verify), so nothing of theirs is here.

- `choice_letter(completion, letters)`: the letter a reply settles on. Accepted forms, the last one in the text
  wins: `Answer: C` (simple-evals' GPQA format, which R1 used), `\\boxed{C}` / `\\boxed{\\text{(C)}}`,
  `<answer>C</answer>` / `<answer>(C) ...</answer>`, "the answer is (C)" / "the correct answer is C".
- `grade_stdio(code, tests)`: each `{input, output}` case runs the program once in `sandbox.run_python` with the
  input on its stdin (fd 0: `input()`, `sys.stdin`, `open(0)` all read it); it passes when the program exits 0
  within the limits and its stdout equals the expected output line by line after stripping each line, a token
  that differs as text still matching when both read as the same decimal number (LiveCodeBench's
  `compute_metrics`/`grade_stdio` rule). The first failing case stops the run (the verdict is all-or-nothing).
- `grade_functional(code, func_name, tests)`: LeetCode-style cases (`testtype: functional`; input = one JSON value
  per line, one per argument; output = one JSON value) become `assert Solution().<func>(*args) == expected`
  statements judged by `sandbox.run_tests` outside the solution's process.

Both prepend LiveCodeBench's import line (`from typing import *` and the standard modules contest code uses
without importing them). A program's stdout is what it controls, so stdio grading compares it outside the sandbox
against an expected output the program never sees.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from r1moe.rewards.rule import last_boxed
from r1moe.rewards.sandbox import SandboxLimits, run_python, run_tests
from r1moe.templates import ANSWER_CLOSE, ANSWER_OPEN

# ---------------------------------------------------------------- multiple choice

_LETTER_FORMS = [
    r"answer\s*:\s*\**\s*\(?\s*([A-Z])\b\s*\)?",  # Answer: C (simple-evals: any case) / **Answer:** C
    r"answer\s+is\s*:?\s*\**\s*\(?\s*((?-i:[A-Z]))\b\s*\)?",  # the answer is (C); "is a ..." is prose
    r"\\boxed\s*\{\s*(?:\\text(?:bf)?\s*\{\s*)?\(?\s*([A-Z])\s*\)?\s*\}",  # \boxed{C}, \boxed{\text{(C)}}
    # <answer>(C) text</answer>; a lower-case letter only as the whole answer (<answer>c</answer>), or "<answer>a noble
    # gas (D)</answer>" reads as A. No <answer> inside: the scan from each <answer> stops at the next one (an unclosed
    # `.*?` rescans to the end from each, quadratic in a reply of repeated "<answer>A").
    re.escape(ANSWER_OPEN) + r"\s*\(?\s*((?-i:[A-Z])|[a-z](?=\s*\)?\s*" + re.escape(ANSWER_CLOSE) + r"))\b\s*\)?"
    r"(?:(?!" + re.escape(ANSWER_OPEN) + r").)*?" + re.escape(ANSWER_CLOSE),
]
_LETTER = re.compile("|".join(f"(?:{f})" for f in _LETTER_FORMS), re.IGNORECASE | re.DOTALL)


def choice_letter(completion: str, letters: str = "ABCD") -> str | None:
    """The last answer letter (upper case) the completion states in an accepted form (module docstring); None when
    it states none, or the letter is not one of `letters`."""
    found = None
    for m in _LETTER.finditer(completion):
        letter = next(g for g in m.groups() if g is not None).upper()
        found = letter
    if found is None:
        boxed = last_boxed(completion)  # \boxed{C} inside a longer expression the regex did not anchor on
        if boxed is not None and re.fullmatch(r"\(?([A-Za-z])\)?", boxed):
            found = boxed.strip("()").upper()
    return found if found is not None and found in letters else None


# ---------------------------------------------------------------- LiveCodeBench

LCB_IMPORTS = (
    "from typing import *\nimport sys, os, re, math, heapq, bisect, itertools, functools, collections, string, "
    "copy, random, statistics, operator, json\nfrom collections import *\nfrom itertools import *\n"
    "from functools import *\nfrom heapq import *\nfrom bisect import *\nfrom math import *\n"
    "sys.setrecursionlimit(1 << 20)\n"
)
"""What LiveCodeBench puts before a solution (its `import_string`, the commonly used part)."""

LCB_LIMITS = SandboxLimits(timeout_s=12.0, cpu_s=6, memory_mb=2048)
"""Per test case: LiveCodeBench's 6 s per case, plus the sandbox's start-up in the wall clock."""


@dataclass(frozen=True)
class IOCase:
    """One LiveCodeBench test case as released: `input`/`output` text and its `testtype`."""

    input: str
    output: str
    testtype: str


@dataclass
class CodeVerdict:
    passed: int
    """Cases passed before the first failure (all of them when `ok`)."""
    total: int
    failure: str = ""
    """Why the first failing case failed: `case 3: wrong answer`, `case 1: exit status 1: <stderr tail>`, ..."""

    @property
    def ok(self) -> bool:
        return self.total > 0 and self.passed == self.total


def _stdin_program(code: str, stdin: str) -> str:
    """A program that puts `stdin` on fd 0 (a file on the sandbox's private /tmp), then runs `code` as __main__."""
    return (
        "import os as _os\n"
        "_fd = _os.open('/tmp/stdin.txt', _os.O_RDWR | _os.O_CREAT | _os.O_TRUNC, 0o600)\n"
        f"_os.write(_fd, {stdin.encode()!r})\n"
        "_os.lseek(_fd, 0, 0)\n_os.dup2(_fd, 0)\n_os.close(_fd)\ndel _os, _fd\n"
        f"exec(compile({(LCB_IMPORTS + code)!r}, 'main.py', 'exec'), {{'__name__': '__main__'}})\n"
    )


def _decimals(line: str) -> list[Decimal] | None:
    try:
        return [Decimal(token) for token in line.split()]
    except InvalidOperation:
        return None


def stdout_matches(got: str, expected: str) -> bool:
    """LiveCodeBench's stdio rule: the lines (split at "\n" only, each stripped, blank ones at the ends dropped) are
    equal as text, or are both wholly decimals that are equal token by token ("1.50" matches "1.5"; "Yes 1.50" does
    not match "Yes 1.5", as in LiveCodeBench)."""
    got_lines, exp_lines = got.strip().split("\n"), expected.strip().split("\n")
    if len(got_lines) != len(exp_lines):
        return False
    for g, e in zip(got_lines, exp_lines):
        g, e = g.strip(), e.strip()
        if g == e:
            continue
        gd, ed = _decimals(g), _decimals(e)
        if gd is None or ed is None or gd != ed:
            return False
    return True


def grade_stdio(code: str, cases: list[IOCase], limits: SandboxLimits = LCB_LIMITS) -> CodeVerdict:
    """Run `code` once per stdin case in the sandbox; stop at the first failure (module docstring)."""
    if not cases:
        raise ValueError("grade_stdio: no test case: every program would pass")
    for i, case in enumerate(cases, 1):
        # Room for the expected output and then some, so a long wrong answer is not cut into a matching prefix.
        room = dataclasses.replace(limits, max_output_chars=max(limits.max_output_chars, 2 * len(case.output) + 1024))
        r = run_python(_stdin_program(code, case.input), room)
        if r.timed_out or r.returncode == 128 + 9:  # the wall clock, or RLIMIT_CPU's SIGKILL (sandbox.py)
            return CodeVerdict(i - 1, len(cases), f"case {i}: time limit ({limits.timeout_s:g} s wall clock, "
                                                  f"{limits.cpu_s} s CPU)")
        if r.returncode != 0:
            tail = r.stderr.strip().splitlines()[-1:] or [""]
            return CodeVerdict(i - 1, len(cases), f"case {i}: exit status {r.returncode}: {tail[0][:200]}")
        if not stdout_matches(r.stdout, case.output):
            return CodeVerdict(i - 1, len(cases), f"case {i}: wrong answer")
    return CodeVerdict(len(cases), len(cases))


def functional_tests(func_name: str, cases: list[IOCase]) -> str:
    """Python test source for LeetCode-style cases: one `assert` per case (run by `sandbox.run_tests`)."""
    if not func_name.isidentifier():
        raise ValueError(f"functional test: func_name {func_name!r} is not a Python identifier")
    lines = []
    for i, case in enumerate(cases, 1):
        try:
            args = [json.loads(line) for line in case.input.split("\n") if line.strip()]
            expected = json.loads(case.output)
        except json.JSONDecodeError as e:
            raise ValueError(f"functional test case {i}: input/output is not one JSON value per line: {e}") from None
        # LiveCodeBench compares a returned tuple as a list (JSON has no tuples: `(1, 3)` answers `[1, 3]`); one
        # statement per case, so the judge's count of statements is the count of cases
        lines.append(f"assert (lambda r: list(r) if isinstance(r, tuple) else r)(Solution().{func_name}(*{args!r}))"
                     f" == {expected!r}")
    return "\n".join(lines) + "\n"


def grade_functional(code: str, func_name: str, cases: list[IOCase], limits: SandboxLimits = LCB_LIMITS) -> CodeVerdict:
    """All LeetCode-style cases in one `run_tests` call (the judge runs them outside the solution's process)."""
    if not cases:
        raise ValueError("grade_functional: no test case: every program would pass")
    total_limits = dataclasses.replace(limits, timeout_s=limits.timeout_s + limits.cpu_s * len(cases))
    report = run_tests(LCB_IMPORTS + code, functional_tests(func_name, cases), total_limits)
    return CodeVerdict(report.passed if report.ok else min(report.passed, len(cases) - 1), len(cases),
                       "; ".join(report.failures[:1]))

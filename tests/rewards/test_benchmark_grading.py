"""Benchmark grading: multiple-choice letters (table-driven), LiveCodeBench stdin/stdout and functional cases run
for real in the bubblewrap sandbox (no skip: without bwrap these fail with SandboxUnavailable), and the graders
`load_benchmark` binds to each release file."""

from pathlib import Path

import pytest

from r1moe.data.benchmarks import load_benchmark
from r1moe.rewards.benchmarks import IOCase, choice_letter, grade_functional, grade_stdio, stdout_matches
from r1moe.rewards.sandbox import SandboxLimits

FIXTURES = Path(__file__).parents[1] / "data" / "benchmarks"
FAST = SandboxLimits(timeout_s=5.0, cpu_s=3, memory_mb=512)


@pytest.mark.parametrize("completion,letter", [
    ("Thinking...\nAnswer: C", "C"),
    ("**Answer:** b", "B"),
    ("So the final result is \\boxed{C}.", "C"),
    ("$\\boxed{\\text{(D)}}$", "D"),
    ("<answer>C</answer>", "C"),
    ("<answer>(A) Nitrogen</answer>", "A"),
    ("The answer is (C).", "C"),
    ("The correct answer is D", "D"),
    ("First I thought the answer is (A). On reflection, Answer: B", "B"),  # the last statement wins
    ("I will answer a question about gases.", None),  # "answer a" is not a statement of the answer
    ("The answer is a noble gas, so", None),  # lower-case "a" after "answer is" is prose
    ("The answer is B", "B"),
    ("Answer: E", None),  # not one of A-D
    ("No letter at all.", None),
])
def test_choice_letter(completion, letter):
    assert choice_letter(completion) == letter


@pytest.mark.parametrize("got,expected,same", [
    ("5\n", "5", True),
    ("  1 2 3  \n\n", "1 2 3\n", True),
    ("1.50\n", "1.5\n", True),  # equal decimals
    ("1.5000001\n", "1.5\n", False),
    ("1 2\n3\n", "1 2 3\n", False),  # lines matter
    ("yes\n", "Yes\n", False),
    ("5\r\n6\r\n", "5\n6", True),  # CRLF
    ("Yes 1.50\n", "Yes 1.5\n", False),  # decimals compare only as whole lines (LiveCodeBench)
    ("1\x1e2\n", "1\n2\n", False),  # lines end at "\n" only
])
def test_stdout_matches(got, expected, same):
    assert stdout_matches(got, expected) is same


SUM = [IOCase("2 3\n", "5\n", "stdin"), IOCase("10 -4\n", "6\n", "stdin")]


@pytest.mark.parametrize("code,ok,failure", [
    ("a, b = map(int, input().split())\nprint(a + b)", True, ""),
    ("import sys\na, b = map(int, sys.stdin.buffer.read().split())\nprint(a + b)", True, ""),
    ("a, b = map(int, open(0).read().split())\nprint(a + b)", True, ""),  # fd 0, as AtCoder solutions read it
    ("print(5)", False, "case 2: wrong answer"),  # right on the sample only
    ("a, b = map(int, input().split())\nprint(a + b)\nraise SystemExit(1)", False, "case 1: exit status 1"),
    ("while True: pass", False, "case 1: time limit"),
])
def test_grade_stdio_in_the_sandbox(code, ok, failure):
    v = grade_stdio(code, SUM, FAST)
    assert v.ok is ok and v.failure.startswith(failure)
    assert v.passed == (2 if ok else int(failure.startswith("case 2")))


def test_grade_functional_in_the_sandbox():
    cases = [IOCase("[1, 5, 2]", "5", "functional"), IOCase("[-3, -1, -2]", "-1", "functional"),
             IOCase("[\"b\", \"a\"]\n3", "\"bbb\"", "functional")]
    good = ("class Solution:\n    def f(self, nums: List, k: int = 1):\n"
            "        return max(nums) * k\n")
    assert grade_functional(good, "f", cases, FAST).ok
    wrong = "class Solution:\n    def f(self, nums, k=1):\n        return nums[0]\n"
    v = grade_functional(wrong, "f", cases, FAST)
    assert not v.ok and v.passed < 3 and v.failure


def test_grade_functional_takes_a_tuple_for_a_list():
    cases = [IOCase("[1, 3]", "[1, 3]", "functional"), IOCase("[2]", "[2]", "functional")]
    as_tuple = "class Solution:\n    def f(self, xs):\n        return tuple(xs)\n"
    assert grade_functional(as_tuple, "f", cases, FAST).ok  # JSON has no tuples: LiveCodeBench lists them
    wrong = "class Solution:\n    def f(self, xs):\n        return tuple(reversed(xs))\n"
    assert not grade_functional(wrong, "f", cases, FAST).ok


def test_benchmark_graders_from_release_files():
    aime = load_benchmark("aime2024", FIXTURES / "aime2024.jsonl")
    q = aime.samples[0]
    assert aime.grade("<think>3+4</think> so \\boxed{7}", q) == (True, "7")
    assert aime.grade("\\boxed{8}", q)[0] is False
    gpqa = load_benchmark("gpqa_diamond", FIXTURES / "gpqa_diamond.csv")
    q = gpqa.samples[0]
    wrong = next(x for x in "ABCD" if x != q.answer)
    assert gpqa.grade(f"<think>maybe the answer is ({wrong})</think>Answer: {q.answer}", q) == (True, q.answer)
    # A reply cut off while thinking has not answered, whatever letters its reasoning mentions.
    assert gpqa.grade(f"<think>the answer is ({q.answer})", q) == (False, None)
    lcb = load_benchmark("livecodebench", FIXTURES / "livecodebench.jsonl")
    by_id = {s.id: s for s in lcb.samples}
    reply = "<think>read two ints</think>\n```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    assert lcb.grade(reply, by_id["synth_abc001_a"])[0] is True
    assert lcb.grade(reply.replace("a + b", "a - b"), by_id["synth_abc001_a"])[0] is False
    leet = "</think>```python\nclass Solution:\n    def maxOfList(self, nums: List[int]) -> int:\n" \
           "        return max(nums)\n```"
    assert lcb.grade(leet, by_id["9001"])[0] is True
    assert lcb.grade("<think>no code yet", by_id["9001"]) == (False, None)

"""Procedural tasks: generated answers verify, wrong ones do not, worked solutions are right and end with the
answer, and seeds give disjoint, duplicate-free datasets."""

import operator
import random
import re
from fractions import Fraction

import pytest

from r1moe.data import NUM_SPLITS, TASKS, make_dataset, make_general, parse_number, split_of
from r1moe.data.schema import PromptSample
from r1moe.data.splits import problem_key

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
CASES = [(name, d) for name in TASKS for d in (1, 2, 3)]


def _samples(name, difficulty, n=40):
    rng = random.Random(1234)
    return [TASKS[name].generate(rng, difficulty) for _ in range(n)]


def _wrong(sample):
    if sample.task == "countdown":
        return ["1", sample.answer + " + 1", str(int(re.search(r"make (\d+)", sample.prompt).group(1)))]
    return [str(int(sample.answer) + 1), str(-int(sample.answer) - 1), "", "x"]


@pytest.mark.parametrize("name,difficulty", CASES)
def test_generated_answers_verify_and_wrong_ones_fail(name, difficulty):
    task = TASKS[name]
    for s in _samples(name, difficulty):
        assert (s.task, s.kind) == (name, "math") and s.id
        assert task.verify(s.answer, s), s
        for wrong in _wrong(s):
            assert not task.verify(wrong, s), (s, wrong)


@pytest.mark.parametrize("name,difficulty", CASES)
def test_worked_solution_is_correct_and_ends_with_answer(name, difficulty):
    step = re.compile(r"(-?\d+) ([-+*/]) \(?(-?\d+)\)? = (-?\d+)")
    for s in _samples(name, difficulty, n=20):
        text = TASKS[name].worked_solution(s)
        assert text.splitlines()[-1] == f"So the answer is {s.answer}."
        assert len(text.splitlines()) >= 3
        for a, op, b, r in step.findall(text):
            assert OPS[op](Fraction(a), Fraction(b)) == int(r), (text, a, op, b, r)


def test_difficulty_one_is_easy():
    for s in make_dataset("arithmetic", 200, seed=0):
        expr = s.prompt.removeprefix("Compute ")
        assert 2 <= len(re.findall(r"\d+", expr)) <= 3 and "/" not in expr
        assert 0 <= int(s.answer) <= 100
    for s in make_dataset("countdown", 100, seed=0):
        assert len(re.search(r"numbers ([\d, ]+) to", s.prompt).group(1).split(",")) == 3
        assert "/" not in s.answer


ARITH = PromptSample(prompt="Compute (7 + 5) * 3 - 4", answer="32", task="arithmetic")
LINEAR = PromptSample(prompt="Solve 3x + 4 = 19 for x", answer="5", task="linear")
COUNTDOWN = PromptSample(prompt="Use the numbers 3, 5, 7 to make 22 with + - * (each number at most once)",
                         answer="3 * 5 + 7", task="countdown")

VERIFY_TABLE = [
    (ARITH, " 32 ", True), (ARITH, "32.0", True), (ARITH, "x = 32", True), (ARITH, "\\boxed{32}", True),
    (ARITH, "The answer is 32.", True), (ARITH, "$32$", True), (ARITH, "33", False), (ARITH, "thirty-two", False),
    (ARITH, "32.5", False), (ARITH, "", False),
    (LINEAR, "x = 5", True), (LINEAR, "x=5", True), (LINEAR, "5.0", True), (LINEAR, "10/2", True),
    (LINEAR, "x = 4", False),
    (COUNTDOWN, "3 * 5 + 7", True), (COUNTDOWN, "7 + 5 * 3", True), (COUNTDOWN, "(5 * 3) + 7 = 22", True),
    (COUNTDOWN, "3 × 5 + 7", True), (COUNTDOWN, " 7+3*5 ", True),
    (COUNTDOWN, "22", False),                  # the target alone uses no given number
    (COUNTDOWN, "3 * 5 + 7 + 0", False),       # 0 is not given
    (COUNTDOWN, "5 * 5 - 3", False),           # 5 used twice
    (COUNTDOWN, "7 * 3 + 1", False),           # 1 is not given
    (COUNTDOWN, "3 * 5 + 6", False),           # wrong value and 6 not given
    (COUNTDOWN, "(7 * 3 * 5 + 7) / 5", False), # "/" not allowed at difficulty 1, and 7 and 5 reused
    (COUNTDOWN, "__import__('os').system('true')", False),
    (COUNTDOWN, "3 ** 5", False),
    (COUNTDOWN, "-3 + 25", False),
]


@pytest.mark.parametrize("sample,answer,expected", VERIFY_TABLE)
def test_verify_table(sample, answer, expected):
    assert TASKS[sample.task].verify(answer, sample) is expected


def test_worked_solution_example():
    text = TASKS["arithmetic"].worked_solution(ARITH)
    assert "First, 7 + 5 = 12." in text and "Then 12 * 3 = 36." in text and "Then 36 - 4 = 32." in text


@pytest.mark.parametrize("text,value", [
    ("5", 5), (" -3 ", -3), ("x = 5", 5), ("1/2", Fraction(1, 2)), ("\\frac{1}{2}", Fraction(1, 2)),
    ("1,000", 1000), ("5.", 5), ("0.25", Fraction(1, 4)), ("five", None), ("1/0", None), ("", None),
])
def test_parse_number(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize("name", [*TASKS, "general"])
def test_seeds_give_disjoint_datasets(name):
    make = (lambda n, seed: make_general(n, seed)) if name == "general" else \
        (lambda n, seed: make_dataset(name, n, seed))
    sets = []
    for seed in range(4):
        data = make(200, seed)
        prompts = [s.prompt for s in data]
        assert len(prompts) == len(set(prompts)) == 200  # no duplicates
        assert all(split_of(problem_key(s.task, s.prompt)) == seed % NUM_SPLITS for s in data)
        sets.append(set(prompts))
    for i in range(4):
        for j in range(i + 1, 4):
            assert not sets[i] & sets[j], (name, i, j)


def test_same_seed_same_data_and_difficulties_disjoint_across_seeds():
    assert make_dataset("linear", 50, seed=3) == make_dataset("linear", 50, seed=3)
    train = {s.prompt for d in (1, 2) for s in make_dataset("linear", 100, seed=0, difficulty=d)}
    held_out = {s.prompt for d in (1, 2) for s in make_dataset("linear", 100, seed=1, difficulty=d)}
    assert not train & held_out


def test_exhausted_split_raises():
    with pytest.raises(ValueError, match="split 0 of"):
        make_dataset("linear", 10_000, seed=0)


def test_unknown_task_and_bad_difficulty():
    with pytest.raises(ValueError, match="arithmetic, countdown, digits, linear"):
        make_dataset("sudoku", 10, seed=0)
    with pytest.raises(ValueError, match="difficulty"):
        make_dataset("arithmetic", 10, seed=0, difficulty=0)

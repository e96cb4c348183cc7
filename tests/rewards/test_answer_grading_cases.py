"""Hard cases of the math answer reward, the benchmark answer grading and the language reward: wrong answers that
read as right, right answers that read as wrong, degenerate replies the graders must get through, plain English
mathematics that must stay English."""

from pathlib import Path

import pytest

from r1moe.data import PromptSample
from r1moe.data.benchmarks import load_benchmark
from r1moe.rewards import accuracy_reward, extract_answer, language_consistency_reward
from r1moe.rewards.benchmarks import choice_letter

FIXTURES = Path(__file__).parents[1] / "data" / "benchmarks"
TWO = PromptSample(prompt="q", answer="2")


@pytest.mark.parametrize("completion", [
    r"<think>so \boxed{2}</think> The answer is 3.",  # the final answer is 3: the box was a step of the reasoning
    r"<think>so \boxed{2}</think> The final answer is $3$.",
    r"<think>so \boxed{2}</think>",  # nothing after the reasoning: no answer given
    "<think>try <answer>2</answer> hmm, no</think> I cannot decide.",
])
def test_an_answer_inside_closed_reasoning_is_not_the_final_answer(completion):
    assert extract_answer(completion) is None
    assert accuracy_reward(completion, TWO) == 0.0


@pytest.mark.parametrize("completion", [
    r"<think>maybe \boxed{3}</think> so \boxed{2}",
    "<think>maybe <answer>3</answer></think><answer>2</answer>",
    "</think><answer>2</answer>",  # the chat template's forced <think> is in the prompt
    r"no tags at all, \boxed{2}",
    "<think>so <answer>2</answer>",  # unclosed reasoning: correct but malformed (tests/test_rejection.py)
])
def test_the_answer_after_the_reasoning_is_graded(completion):
    assert accuracy_reward(completion, TWO) == 1.0


def test_math_benchmark_grades_the_answer_after_the_reasoning():
    aime = load_benchmark("aime2024", FIXTURES / "aime2024.jsonl")
    q = aime.samples[0]  # gold 7
    assert aime.grade(r"<think>3+4 gives \boxed{7}</think> so \boxed{8}", q) == (False, "8")
    assert aime.grade(r"<think>3+4 gives \boxed{7}</think> The answer is 8.", q) == (False, None)


@pytest.mark.parametrize("answer, gold, expected", [
    # digit groups split by a thin space / space: math-verify read 12\,345 as 12 + 345 and 1\,000 as 1 * 0
    (r"12\,345", "12345", 1.0),
    (r"1\,000\,000", "1000000", 1.0),
    ("12 345", "12345", 1.0),
    ("1~000", "1000", 1.0),
    (r"1\,000", "0", 0.0),
    ("1 000", "0", 0.0),
    # Unicode math (a Chinese chain of thought writes full-width digits; ° and ² are common in any language)
    ("30°", "30", 1.0),
    ("30°C", "30", 1.0),
    ("31°", "30", 0.0),
    ("x²+1", "x^2+1", 1.0),
    ("√2", r"\sqrt{2}", 1.0),
    ("2√3", r"\sqrt{12}", 1.0),
    ("∞", r"\infty", 1.0),
    ("(0, ∞)", r"(0,\infty)", 1.0),
    ("½", "0.5", 1.0),
    ("５０", "50", 1.0),
    ("٥", "5", 1.0),
    ("50", "５０", 1.0),  # the gold is read alike
    ("５１", "50", 0.0),
])
def test_answer_forms(answer, gold, expected):
    sample = PromptSample(prompt="q", answer=gold)
    assert accuracy_reward(f"<think>w</think><answer>{answer}</answer>", sample) == expected


def test_extract_answer_is_linear_on_repeated_unclosed_answer_tags():
    # A non-greedy regex rescanned to the end from each tag: minutes at this size (speed is not asserted here).
    assert extract_answer("<answer>" * 20_000) is None
    assert extract_answer("<answer>" * 20_000 + "</answer> <answer>2</answer>") == "2"


def test_choice_letter_does_not_read_an_article_as_the_letter():
    # "a" of "a noble gas" was read as choice A (case-insensitive letter in the <answer> form)
    assert choice_letter("<answer>a noble gas, (D)</answer>") != "A"
    assert choice_letter("<answer>c</answer>") == "C" and choice_letter("<answer>(b)</answer>") == "B"


def test_choice_letter_is_linear_on_repeated_unclosed_answer_tags():
    assert choice_letter("<answer>A " * 16_000) is None  # quadratic before: ~45 s (speed is not asserted here)


@pytest.mark.parametrize("cot", [
    "Hmm, wait. The primes below ten are two, three, five and seven.",
    "We compute sin x and cos x, then take the result mod seven.",
    "The divisor is the minimum per row; the parabola opens upward.",
    "Take the max of the two, then the log of the determinant modulo p.",
])
def test_plain_english_math_reasoning_is_english(cot):
    # "ten" (Polish), "per" (Italian), "sin" (Spanish), "mod" (Danish), "primes" / "parabola" (in the large English
    # list only) counted as other languages' words
    sample = PromptSample(prompt="q", answer="1")
    assert language_consistency_reward(f"<think>{cot}</think><answer>1</answer>", sample) == 1.0


@pytest.mark.parametrize("cot, share", [
    ("Il faut calculer la somme, puis la réponse est donc neuf.", 0.0),
    ("We need the sum. Donc la réponse est neuf.", 4 / 9),  # we, need, the, sum of 9 words
])
def test_french_reasoning_still_counts_against_english(cot, share):
    sample = PromptSample(prompt="q", answer="9")
    assert language_consistency_reward(f"<think>{cot}</think><answer>9</answer>", sample) == pytest.approx(share)

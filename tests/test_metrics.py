"""pass@k against the closed form with math.comb; majority vote over equivalence classes (real math-verify) with an
order-independent tie-break; cons@k; summarize_eval on hand-made results."""

import functools
import itertools
import math

import pytest

from r1moe.data import PromptSample
from r1moe.metrics import (
    SampleResult,
    answer_classes,
    cons_at_k,
    majority_vote,
    pass_at_k,
    per_question_scores,
    summarize_eval,
)
from r1moe.rewards import math_answers_equal, same_answer


def _closed_form(n, c, k):
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)  # math.comb(a, k) = 0 when k > a


@pytest.mark.parametrize("n", [1, 2, 5, 16, 64, 200])
def test_pass_at_k_matches_binomial_closed_form(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_closed_form(n, c, k), rel=1e-9, abs=1e-12), (n, c, k)


def test_pass_at_k_edge_cases():
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 7, 4) == 1.0  # n - c = 3 < k: every 4-subset holds a correct sample
    assert pass_at_k(16, 3, 1) == 3 / 16  # pass@1 = c / n exactly
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(1000, 1, 1000) == 1.0
    assert 0.0 < pass_at_k(10**6, 1, 10) < 1e-4  # huge n: no overflow, no cancellation to 0
    assert pass_at_k(10**6, 1, 10) == pytest.approx(1e-5, rel=1e-9)
    for bad in [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_majority_vote_text():
    assert majority_vote([None, "x", None, None, "y", "y"]) == "y"  # None never votes
    assert majority_vote(["a  b", " a b ", "c"]) == "a b"  # whitespace-normalised
    assert majority_vote(["", "  ", None]) is None
    assert majority_vote([]) is None


MATH_Q = PromptSample(prompt="q", answer="5")
SAME_MATH = functools.partial(same_answer, sample=MATH_Q)


# (answers, winner without an equivalence, winner with the math equivalence)
VOTES = [
    # the bug: "\boxed{5}", "5" and "5.0" split three ways and lose to two "6"s
    (["\\boxed{5}", "5", "5.0", "6", "6"], "6", "5"),
    (["1/2", "0.5", "\\frac{1}{2}", "1/3", "1/3"], "1/3", "0.5"),  # the class is named by its shortest form
    (["2\\sqrt{2}", "\\sqrt{8}", "3", "3"], "3", "3"),  # 2-2 tie: the shorter representative ("3") wins
    (["4", "3", "3", "4"], "3", "3"),  # tie, both orders: the canonical first ("3"), never the first sampled
    (["3", "4", "4", "3"], "3", "3"),
    (["\\{-1, 4\\}", "4, -1", "4"], "4", "4, -1"),  # a set is one answer, not its elements
    (["5\\sqrt{3}", "5\\sqrt3", "5"], "5", "5\\sqrt3"),  # a radical is not its coefficient
]


@pytest.mark.parametrize("answers, text_winner, math_winner", VOTES)
def test_majority_vote_over_equivalence_classes(answers, text_winner, math_winner):
    assert majority_vote(answers) == text_winner
    assert majority_vote(answers, SAME_MATH) == math_winner
    for order in itertools.islice(itertools.permutations(answers), 24):  # independent of the sampling order
        assert majority_vote(list(order), SAME_MATH) == math_winner


def test_answer_classes_counts_and_order():
    classes = answer_classes(["5.0", "\\boxed{5}", None, "6", "5", ""], SAME_MATH)
    assert classes == [("5", 3), ("6", 1)]
    # equal strings are never compared: a grader that would call everything different still merges them
    assert answer_classes(["7", " 7", "7 "], lambda a, b: False) == [("7", 3)]


def test_same_answer_keeps_right_and_wrong_apart_on_procedural_tasks():
    countdown = PromptSample(prompt="Use the numbers 3, 5, 7 to make 22 with + - * (each number at most once)",
                             answer="3 * 5 + 7", task="countdown")
    assert same_answer("7 + 3 * 5", "3 * 5 + 7", countdown)
    assert not same_answer("22", "3 * 5 + 7", countdown)  # same value, but only one is a solution
    general = PromptSample(prompt="Reverse tobaku", answer="ukabot", kind="general", task="reverse_word")
    assert same_answer(" ukabot ", "ukabot", general) and not same_answer("ukabot", "tobaku", general)


def test_cons_at_k_uses_the_grader_and_the_equivalence():
    def is_correct(answer, gold):
        return math_answers_equal(answer, gold)

    answers = ["5", "5.0", "\\boxed{5}", "6", "6"]
    assert cons_at_k(answers, "5", is_correct) == 0.0  # raw strings: "6" wins
    assert cons_at_k(answers, "5", is_correct, SAME_MATH) == 1.0
    assert cons_at_k([None, None], "5", is_correct, SAME_MATH) == 0.0


def _s(correct, answer, length=10, formatted=True, lang=None):
    return SampleResult(
        correct=correct, formatted=formatted, length_tokens=length, answer=answer, language_consistency=lang
    )


def test_summarize_eval_hand_computed():
    results = [
        # q0: 2/4 correct, majority "5" (2 votes vs 1 vs 1) is correct
        [_s(True, "5", 10), _s(True, "5", 20), _s(False, "6", 30, formatted=False), _s(False, "7", 40)],
        # q1: 2/4 correct, tie 2-2 between "2" and "1": "1" is first in canonical order (equal length, "1" < "2"), right
        [_s(False, "2", 10, lang=0.5), _s(True, "1", 10, lang=1.0), _s(False, "2", 10), _s(True, "1", 10)],
        # q2: 0/4 correct, no answers extracted
        [_s(False, None, 100, formatted=False) for _ in range(4)],
    ]
    c = [2, 2, 0]  # correct samples per question
    out = summarize_eval(results)
    assert out["pass@1"] == pytest.approx((2 / 4 + 2 / 4 + 0) / 3)
    # pass@2 per question = 1 - C(4-c, 2)/C(4, 2): c=2 -> 1 - 1/6
    assert out["pass@2"] == pytest.approx(sum(1 - math.comb(4 - ci, 2) / 6 for ci in c) / 3)
    assert out["pass@4"] == pytest.approx((1 + 1 + 0) / 3)
    assert out["cons@4"] == pytest.approx((1 + 1 + 0) / 3)
    assert out["format_rate"] == pytest.approx((3 + 4 + 0) / 12)
    assert out["mean_response_length"] == pytest.approx((100 + 40 + 400) / 12)
    assert out["language_consistency"] == pytest.approx(0.75)
    assert out["num_questions"] == 3 and out["num_samples"] == 12
    assert set(out) == {
        "pass@1",
        "pass@2",
        "pass@4",
        "cons@4",
        "format_rate",
        "mean_response_length",
        "language_consistency",
        "num_questions",
        "num_samples",
    }


def test_per_question_scores_average_to_the_summary():
    results = [
        [_s(True, "5", 10), _s(True, "5", 20), _s(False, "6", 30), _s(False, "7", 40)],  # 2/4, majority right
        [_s(False, "2", 10), _s(False, "2", 10), _s(True, "1", 10), _s(False, None, 10)],  # 1/4, majority wrong
        [_s(False, None, 100) for _ in range(4)],  # nothing to vote on
    ]
    scores = per_question_scores(results)
    assert scores == {"pass@1": [0.5, 0.25, 0.0], "cons@4": [1.0, 0.0, 0.0]}
    summary = summarize_eval(results)
    assert sum(scores["pass@1"]) / 3 == pytest.approx(summary["pass@1"])
    assert sum(scores["cons@4"]) / 3 == pytest.approx(summary["cons@4"])
    with pytest.raises(ValueError, match="same number"):
        per_question_scores([results[0], results[1][:2]])


def test_summarize_eval_k_not_power_of_two_and_no_language():
    results = [[_s(i == 0, str(i)) for i in range(6)]]
    out = summarize_eval(results)
    assert [k for k in out if k.startswith("pass@")] == ["pass@1", "pass@2", "pass@4", "pass@6"]
    assert out["pass@6"] == 1.0 and out["pass@1"] == pytest.approx(1 / 6)
    assert out["cons@6"] == 1.0  # all answers differ: "0" is first in canonical order, the correct one
    assert "language_consistency" not in out


def test_summarize_eval_votes_with_each_questions_equivalence():
    # one question, the right answer in three spellings vs two wrong ones
    results = [[_s(True, "5"), _s(True, "5.0"), _s(True, "\\boxed{5}"), _s(False, "6"), _s(False, "6")]]
    assert summarize_eval(results)["cons@5"] == 0.0
    assert summarize_eval(results, [SAME_MATH])["cons@5"] == 1.0
    assert summarize_eval(results[::-1], [None])["cons@5"] == 0.0
    with pytest.raises(ValueError, match="same_answer has 2 entries for 1 questions"):
        summarize_eval(results, [SAME_MATH, SAME_MATH])


def test_summarize_eval_tie_is_independent_of_sample_order():
    samples = [_s(False, "2"), _s(True, "1"), _s(False, "2"), _s(True, "1")]
    for order in itertools.permutations(samples):
        assert summarize_eval([list(order)])["cons@4"] == 1.0


def test_summarize_eval_rejects_ragged():
    with pytest.raises(ValueError, match="same number"):
        summarize_eval([[_s(True, "1")], [_s(True, "1"), _s(False, "2")]])

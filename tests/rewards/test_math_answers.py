"""The math accuracy reward on a labelled table of answer forms, through the real math-verify.

Each row: the form, the final answer as the policy writes it, the gold, the reward. A bare answer (in `<answer>` or in
`\\boxed{}`) is read as one LaTeX expression (r1moe.rewards.rule.parse_math_answer), so an answer that merely starts
with the gold number (`5\\sqrt{3}` against 5) scores 0. Rows marked "decided" are forms where more than one reading
is defensible; the comment says which one the reward takes and why.
"""

import pytest

from r1moe.data import PromptSample
from r1moe.rewards import accuracy_reward
from r1moe.rewards.rule import math_answers_equal, parse_math_answer

# (form, answer as written, gold, expected reward)
FORMS = [
    # --- the leading-number exploit: every one of these used to score 1
    ("radical times integer vs its coefficient", r"5\sqrt{3}", "5", 0.0),
    ("power vs its base", r"2^{10}", "2", 0.0),
    ("sum with a radical vs its first term", r"1+\sqrt{2}", "1", 0.0),
    ("set vs one of its elements", r"\{-1, 4\}", "4", 0.0),
    ("set vs its first element", r"\{-1, 4\}", "-1", 0.0),
    ("multiple of pi vs the multiplier", r"2\pi", "2", 0.0),
    ("factorial vs its argument", "5!", "5", 0.0),
    ("log vs its argument", r"\log_2 8", "8", 0.0),
    ("interval vs an endpoint", "[0, 1)", "1", 0.0),
    # --- fractions and decimals
    ("fraction vs decimal", r"\frac{1}{2}", "0.5", 1.0),
    ("slash fraction vs latex fraction", "1/2", r"\frac{1}{2}", 1.0),
    ("unreduced fraction", r"\frac{3}{6}", r"\frac{1}{2}", 1.0),
    ("dfrac without braces", r"\dfrac12", "0.5", 1.0),
    ("wrong fraction", r"\frac{1}{3}", r"\frac{1}{2}", 0.0),
    ("integer vs trailing-zero decimal", "5.0", "5", 1.0),
    ("decided: 0.333 is not 1/3 (math-verify compares to 6 decimals)", "0.333", r"\frac{1}{3}", 0.0),
    ("1/3 to 7 digits", "0.3333333", r"\frac{1}{3}", 1.0),
    # --- negative numbers and signs
    ("negative fraction", r"-\frac{1}{2}", "-0.5", 1.0),
    ("sign dropped", "3", "-3", 0.0),
    ("sign added", "-3", "3", 0.0),
    ("explicit plus", "+5", "5", 1.0),
    # --- percentages
    ("percent vs the number", r"50\%", "50", 1.0),
    # decided: math-verify reads % both ways; the question's wording decides which one the gold uses, and only these
    # two readings match
    ("decided: percent vs the fraction", r"50\%", "0.5", 1.0),
    ("percent vs a different number", r"50\%", "5", 0.0),
    # --- radicals
    ("equivalent radicals", r"2\sqrt{2}", r"\sqrt{8}", 1.0),
    ("simplified vs unsimplified radical", r"\sqrt{75}", r"5\sqrt{3}", 1.0),
    ("rationalised denominator", r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}", 1.0),
    ("radical without braces", r"5\sqrt3", r"5\sqrt{3}", 1.0),
    # --- powers, factorials, logs, binomials
    ("power vs its value", r"2^{10}", "1024", 1.0),
    ("python power", "2**10", "1024", 1.0),
    ("negative exponent", "10^{-3}", "0.001", 1.0),
    ("factorial vs its value", "5!", "120", 1.0),
    ("log vs its value", r"\log_2 8", "3", 1.0),
    ("binomial vs its value", r"\binom{5}{2}", "10", 1.0),
    # --- pi
    ("pi multiple vs its decimal (6 places)", r"2\pi", "6.283185", 1.0),
    ("decided: 3.14 is not pi (2 decimals; math-verify compares to 6)", "3.14", r"\pi", 0.0),
    ("pi expression", r"\frac{\pi}{6}", r"\frac{\pi}{6}", 1.0),
    # --- intervals, sets, tuples
    ("interval, same", r"(-\infty, 2]", r"(-\infty,2]", 1.0),
    ("interval, closed vs open", "[1,2]", "(1,2)", 0.0),
    ("union of intervals", r"(0,1) \cup (2,3)", r"(0,1)\cup(2,3)", 1.0),
    ("union vs one interval", r"(0,1)\cup(2,3)", "(0,1)", 0.0),
    ("set, other order", r"\{4, -1\}", r"\{-1, 4\}", 1.0),
    ("bare list vs set", "-1, 4", r"\{-1, 4\}", 1.0),
    ("bare list, a root missing", "4", r"\{-1, 4\}", 0.0),
    ("tuple, same", "(5, 3)", "(5,3)", 1.0),
    ("tuple, swapped", "(3, 5)", "(5,3)", 0.0),
    ("equations vs tuple", "x=5, y=3", "(5,3)", 1.0),
    ("equation vs value", "x = 5", "5", 1.0),
    # --- units and degrees
    ("units in text", r"10\text{ cm}", "10", 1.0),
    ("plain units", "12 apples", "12", 1.0),
    ("currency sign", r"\$12", "12", 1.0),
    ("degrees vs number", r"30^\circ", "30", 1.0),
    ("decided: degrees vs radians are not the same answer (the unit is dropped, not converted)", r"45^{\circ}",
     r"\frac{\pi}{4}", 0.0),
    ("thousands separator", "1,000", "1000", 1.0),
    ("latex thousands separator", "1{,}000", "1000", 1.0),
    # --- algebra
    ("expanded vs factored polynomial", "x^2+2x+1", "(x+1)^2", 1.0),
    ("different variable", "x", "y", 0.0),
    # --- hedged answers: two candidates are a set, which matches neither gold
    ("hedge with 'or'", "5 or 6", "5", 0.0),
    ("hedge with 'or', the second", "5 or 6", "6", 0.0),
    ("hedge in text", r"5 \text{ or } 6", "5", 0.0),
    ("hedge with two dollar spans", "$5$ or $6$", "6", 0.0),
    ("hedge in prose", "maybe 5", "5", 0.0),
    ("list hedge on a single-answer question", r"\frac{1}{2}, \frac{1}{3}", "0.5", 0.0),
    ("unbalanced brace to sneak a hedge past the wrapping box", "5} 6", "5", 0.0),
    # --- delimiters, boxes, prose
    ("dollar-delimited", "$12$", "12", 1.0),
    ("prose around a delimited answer", "The answer is $5$", "5", 1.0),
    ("prose around a boxed answer", r"The answer is \boxed{5}", "5", 1.0),
    # decided: bare prose is not an answer (the answer goes in $...$ or \boxed{}): reading a number out of prose is
    # how the leading-number exploit worked
    ("decided: bare prose around the answer", "The answer is 5", "5", 0.0),
    ("decided: two boxes in one answer are two answers (a set)", r"\boxed{3} \boxed{5}", "5", 0.0),
    ("unclosed box inside the answer", r"\boxed{5", "5", 0.0),
    ("empty box", r"\boxed{}", "5", 0.0),
    ("final full stop", "5.", "5", 1.0),
    ("words for a number", r"\text{five}", "5", 0.0),
    ("empty answer", "", "5", 0.0),
]


@pytest.mark.parametrize("form, answer, gold, expected", FORMS, ids=[f[0][:60] for f in FORMS])
def test_answer_forms_in_the_answer_tag(form, answer, gold, expected):
    sample = PromptSample(prompt="q", answer=gold)
    assert accuracy_reward(f"<think>work</think><answer>{answer}</answer>", sample) == expected, form


# Rows whose answer can sit inside a box as written: not empty, no delimiters of its own, braces balanced.
BOXED_ONLY = [f for f in FORMS if f[1] and "$" not in f[1].replace("\\$", "") and "\\boxed" not in f[1]
              and parse_math_answer(f[1]) != ()]


@pytest.mark.parametrize("form, answer, gold, expected", BOXED_ONLY, ids=[f[0][:60] for f in BOXED_ONLY])
def test_answer_forms_in_a_box_without_answer_tag(form, answer, gold, expected):
    """The same answer in the last \\boxed{} of a completion with no <answer> tag reads the same."""
    sample = PromptSample(prompt="q", answer=gold)
    assert accuracy_reward(f"so we get \\boxed{{{answer}}}", sample) == expected, form


def test_table_size_and_both_outcomes():
    assert len(FORMS) >= 50
    assert {e for *_, e in FORMS} == {0.0, 1.0}
    assert len(BOXED_ONLY) >= 40


@pytest.mark.parametrize("completion, expected", [
    (r"first \boxed{3}, then on reflection \boxed{5}", 1.0),  # no <answer>: the last box is the final answer
    (r"first \boxed{5}, then on reflection \boxed{3}", 0.0),
    (r"the answer is \boxed{5", 0.0),  # cut off: nothing to grade
    (r"<answer>3</answer> later \boxed{5}", 0.0),  # the answer tag wins over a box
])
def test_which_answer_is_graded(completion, expected):
    assert accuracy_reward(completion, PromptSample(prompt="q", answer="5")) == expected


def test_equivalence_and_parse():
    assert parse_math_answer(r"5\sqrt{3}") != parse_math_answer("5")
    assert parse_math_answer("") == () and parse_math_answer("5} 6") == ()
    assert math_answers_equal(r"\boxed{5}", "5.0") and not math_answers_equal("5.1", "5")
    assert math_answers_equal("Paris", "Paris") and not math_answers_equal("London", "Paris")

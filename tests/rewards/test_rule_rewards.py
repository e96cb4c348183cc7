"""Table-driven rule rewards (open-r1 tests/test_rewards.py style): accuracy, format, language, batch scoring."""

import pytest

from r1moe.data import PromptSample
from r1moe.rewards import (
    REWARD_FUNCS,
    accuracy_reward,
    compute_rewards,
    extract_answer,
    format_reward,
    language_consistency_reward,
)
from r1moe.rewards.rule import word_language_vote

HALF = PromptSample(prompt="What is 1 divided by 2?", answer="1/2")


@pytest.mark.parametrize("gold", ["1/2", "0.5", "\\frac{1}{2}"])
@pytest.mark.parametrize("completion,expected", [
    ("<think>1 over 2</think><answer>1/2</answer>", 1.0),
    ("<think>...</think> <answer> 0.5 </answer>", 1.0),
    ("<think>...</think><answer>\\frac{1}{2}</answer>", 1.0),
    ("<think>...</think><answer>$\\frac{1}{2}$</answer>", 1.0),
    ("so the result is \\boxed{\\frac{1}{2}}", 1.0),
    ("<think>...</think><answer>The answer is \\boxed{0.5}</answer>", 1.0),
    ("<think>...</think><answer>1/3</answer>", 0.0),
    ("<think>...</think><answer>2</answer>", 0.0),
    ("<think>1/2</think>", 0.0),  # no final answer
    ("", 0.0),
])
def test_math_accuracy(gold, completion, expected):
    sample = PromptSample(prompt="What is 1 divided by 2?", answer=gold)
    assert accuracy_reward(completion, sample) == expected


@pytest.mark.parametrize("completion,expected", [
    ("<answer>5</answer>", "5"),
    ("<answer> first </answer> then <answer>\n second \n</answer>", "second"),
    ("<answer>x</answer> and \\boxed{9}", "x"),                     # answer tag wins over boxed
    ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),       # last boxed, nested braces
    ("\\boxed {\\{a, b\\}}", "\\{a, b\\}"),
    ("\\boxed{\\frac{1}{2}", None),                                  # cut off: unbalanced
    ("no answer at all", None),
    ("<answer></answer>", ""),
])
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


@pytest.mark.parametrize("completion,expected", [
    ("<think>reasoning</think><answer>5</answer>", 1.0),
    ("  <think>\nreasoning\n</think>\n<answer>\n5\n</answer>\n ", 1.0),
    ("<think></think><answer></answer>", 1.0),
    ("<think>a < b and c > d</think> <answer>x</answer>", 1.0),
    ("<think>reasoning<answer>5</answer>", 0.0),                        # missing </think>
    ("reasoning</think><answer>5</answer>", 0.0),                       # missing <think>
    ("<think>r</think><answer>5</answer><answer>6</answer>", 0.0),      # two answers
    ("<think>r</think><answer>5</answer> and more", 0.0),               # text after </answer>
    ("<answer>5</answer><think>r</think>", 0.0),                        # answer before think
    ("<think>r <think>nested</think></think><answer>5</answer>", 0.0),  # nested think
    ("<think>r</think><think>again</think><answer>5</answer>", 0.0),    # two thinks
    ("<think>r</think> text <answer>5</answer>", 0.0),                  # text between
    ("preamble <think>r</think><answer>5</answer>", 0.0),               # text before
    ("<think>r</think>", 0.0),                                          # no answer
    ("<think>r</think><answer>5", 0.0),                                 # unclosed answer
    ("<think>r</think><answer><answer>5</answer></answer>", 0.0),       # nested answer
])
def test_format_reward(completion, expected):
    assert format_reward(completion, HALF) == expected


EN = PromptSample(prompt="q", answer="1")
FR = PromptSample(prompt="q", answer="1", language="fr")
DE = PromptSample(prompt="q", answer="1", language="de")
ZH = PromptSample(prompt="q", answer="1", language="zh")

EN_COT = "First, we need to compute the sum. Then we multiply by three to get the answer."  # 16 English words
FR_COT = "D'abord, nous devons calculer la somme. Ensuite, on multiplie par trois pour obtenir la réponse."
DE_COT = "Zuerst müssen wir die Summe berechnen. Dann multiplizieren wir mit drei und erhalten die Antwort."
ZH_COT = "首先计算总和然后乘以三"  # 11 ideographs


def think(*parts):
    return "<think>" + " ".join(parts) + "</think><answer>36</answer>"


@pytest.mark.parametrize("sample, completion, expected", [
    # one language: 1 under its own target, ~0 under the others (the old script rule gave French 1.0 under "en")
    (EN, think(EN_COT), 1.0),
    (FR, think(FR_COT), 1.0),
    (DE, think(DE_COT), 1.0),
    (ZH, think(ZH_COT), 1.0),
    (EN, think(FR_COT), 1 / 14),  # "on" is an English word too; "D'" a single letter; "somme" English's (Somme)
    (EN, think(DE_COT), 0.0),
    (FR, think(EN_COT), 0.0),
    (DE, think(FR_COT), 0.0),
    (EN, think(ZH_COT), 0.0),
    (ZH, think(EN_COT), 0.0),
    # mixed chains of thought: the share of target-language words
    (EN, think(EN_COT, ZH_COT), 16 / 27),
    (ZH, think(EN_COT, ZH_COT), 11 / 27),
    (EN, "<think>I think 我们 need</think><answer>5</answer>", 2 / 4),  # "I": a single letter carries no signal
    (ZH, "<think>首先 compute 这个</think><answer>5</answer>", 4 / 5),
    (EN, think("We add the numbers", "nous devons calculer"), 4 / 7),  # we add the numbers | nous devons calculer
    (DE, think("Wir addieren", "the numbers"), 2 / 4),
    # no signal at all: digits, symbols, single letters, LaTeX commands, words of no known language
    (EN, think("7 + 5 = 12 !!"), 1.0),
    (EN, think(r"Let $x = \frac{1}{2}$ and $y = \sqrt{3}$, then $x \cdot y = \frac{\sqrt{3}}{2}$."), 1.0),
    (EN, think("zqxv brrtk"), 1.0),
    # words shared by two languages count for both
    (EN, think("question table nation"), 1.0),
    (FR, think("question table nation"), 1.0),
    # scripts
    (FR, think("café à côté"), 1.0),
    (EN, think("привет world"), 0.5),  # Cyrillic is a word of no supported language
    (EN, "no tags, plain English reasoning", 1.0),  # no <think>: the whole completion
    (EN, "chat prefix was in the prompt 中文</think><answer>5</answer>", 6 / 8),
])
def test_language_consistency(sample, completion, expected):
    assert language_consistency_reward(completion, sample) == pytest.approx(expected)


def test_words_the_prompt_contains_are_not_counted():
    reverse = PromptSample(prompt="Reverse the word silla", answer="allis", kind="general", task="reverse_word")
    cot = "<think>The letters of silla in reverse order.</think><answer>allis</answer>"
    assert language_consistency_reward(cot, reverse) == 1.0  # "silla" is Spanish, but it is the question's word
    other = PromptSample(prompt="Reverse the word pita", answer="atip", kind="general", task="reverse_word")
    assert language_consistency_reward(cot, other) == pytest.approx(4 / 5)  # letters, of, in, order | silla


def test_mixed_language_is_strictly_between():
    half = "<think>" + " ".join(["we add", "我们 加"] * 10) + "</think><answer>3</answer>"
    value = language_consistency_reward(half, EN)
    assert value == pytest.approx(2 / 5)
    assert language_consistency_reward(half, ZH) == pytest.approx(1 - value)
    with pytest.raises(ValueError, match="unsupported language 'xx'"):
        language_consistency_reward(half, PromptSample(prompt="q", answer="1", language="xx"))


@pytest.mark.parametrize("word, language, expected", [
    ("the", "en", True), ("the", "fr", False), ("nous", "fr", True), ("nous", "en", False),
    ("also", "en", True), ("also", "de", True),  # shared
    ("x", "en", None), ("sqrt", "en", None), ("zqxv", "en", None),  # no signal
    ("我", "zh", True), ("我", "en", False), ("hello", "zh", False), ("мир", "en", False),
    ("önce", "en", False), ("najpierw", "en", False),  # Turkish, Polish: caught although not targets
])
def test_word_language_vote(word, language, expected):
    assert word_language_vote(word, language) is expected


PROCEDURAL = [
    (PromptSample(prompt="Compute (7 + 5) * 3 - 4", answer="32", task="arithmetic"), "<answer>x = 32</answer>", 1.0),
    (PromptSample(prompt="Compute (7 + 5) * 3 - 4", answer="32", task="arithmetic"), "<answer>31</answer>", 0.0),
    (PromptSample(prompt="Use the numbers 3, 5, 7 to make 22 with + - * (each number at most once)",
                  answer="3 * 5 + 7", task="countdown"), "<answer>7 + 3 * 5</answer>", 1.0),
    (PromptSample(prompt="Use the numbers 3, 5, 7 to make 22 with + - * (each number at most once)",
                  answer="3 * 5 + 7", task="countdown"), "<answer>22</answer>", 0.0),
    (PromptSample(prompt="Reverse the word tobaku", answer="ukabot", kind="general", task="reverse_word"),
     "<think>t o b a k u</think><answer> ukabot </answer>", 1.0),
    (PromptSample(prompt="Reverse the word tobaku", answer="ukabot", kind="general", task="reverse_word"),
     "<think>t o b a k u</think>ukabot", 1.0),
    (PromptSample(prompt="Write tobaku in upper case", answer="TOBAKU", kind="general"), "<answer>tobaku</answer>",
     0.0),
]


@pytest.mark.parametrize("sample,completion,expected", PROCEDURAL)
def test_accuracy_dispatch(sample, completion, expected):
    assert accuracy_reward(completion, sample) == expected


@pytest.mark.parametrize("completion, expected", [("", 0.0), ("x" * 250, 0.25), ("<think>ab</think>", 0.017)])
def test_length_reward(completion, expected):
    assert REWARD_FUNCS["length"](completion, HALF) == pytest.approx(expected)


def test_compute_rewards_weights_components_and_extra():
    samples = [HALF, HALF]
    completions = ["<think>r</think><answer>0.5</answer>", "<answer>1/3</answer>"]
    batch = compute_rewards(completions, samples, {"accuracy": 1.0, "format": 0.5})
    assert batch.components == {"accuracy": [1.0, 0.0], "format": [1.0, 0.0]}
    assert batch.total == [1.5, 0.0]
    batch = compute_rewards(completions, samples, {"format": 1.0, "rm": 2.0},
                            extra={"rm": lambda c, s: float(len(c))})
    assert batch.components["rm"] == [float(len(c)) for c in completions]
    assert batch.total == [1.0 + 2 * len(completions[0]), 2.0 * len(completions[1])]
    assert "rm" not in REWARD_FUNCS


def test_compute_rewards_errors():
    with pytest.raises(ValueError, match="unknown reward 'acc'.*accuracy, format, language, length"):
        compute_rewards(["x"], [HALF], {"acc": 1.0})
    with pytest.raises(ValueError, match="1 completions but 2 samples"):
        compute_rewards(["x"], [HALF, HALF], {"format": 1.0})
    with pytest.raises(ValueError, match="built-in"):
        compute_rewards(["x"], [HALF], {"format": 1.0}, extra={"format": lambda c, s: 0.0})


def test_tiny_pipeline_data_is_language_consistent():
    """The tiny pipeline's worked solutions (cold start, rejection sampling's target) are English throughout, general
    tasks' pseudo-words ("mesa", "pelo") included: they come from the prompt."""
    from r1moe.data import make_cold_start, make_dataset, make_general
    from r1moe.data.tasks import TASKS

    samples = [s for task in TASKS for s in make_dataset(task, 20, seed=0)] + make_general(40, seed=0)
    for record, sample in zip(make_cold_start(samples), samples):
        assert language_consistency_reward(record.response, sample) == 1.0, record.response

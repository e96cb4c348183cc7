"""The tiny pretraining corpus: slips only in solutions, drills made of correct steps, splits kept apart."""

import random
import re

import pytest

from r1moe.data import make_dataset
from r1moe.data.corpus import FACT, direct_answer, make_corpus, mix_languages, step_facts
from r1moe.data.schema import PromptSample
from r1moe.rewards import language_consistency_reward


def _fact_true(line: str) -> bool:
    a, op, b, c = FACT.fullmatch(line).groups()
    return eval(f"{a} {op} {b}") == int(c)


def test_slip_rate_controls_wrong_final_answers():
    clean = make_corpus("arithmetic", 300, seeds=[2], slip_rate=0.0, untagged_rate=0.0, template_rate=1.0)
    noisy = make_corpus("arithmetic", 300, seeds=[2], slip_rate=0.5, untagged_rate=0.0, template_rate=1.0)

    def wrong_fraction(records):
        wrong = 0
        for r in records:
            answer = re.search(r"<answer>(.*?)</answer>", r["response"]).group(1)
            expr = r["prompt"].removeprefix("Compute ")
            wrong += eval(expr) != int(answer)
        return wrong / len(records)

    assert wrong_fraction(clean) == 0
    assert 0.4 < wrong_fraction(noisy) < 0.6


def test_drills_are_correct_steps_of_the_pool():
    records = make_corpus("arithmetic", 400, seeds=[2], slip_rate=0.5, drill_rate=0.5)
    drills = [r["text"] for r in records if "text" in r and "Assistant" not in r["text"]]
    assert 150 < len(drills) < 250
    lines = [line for d in drills for line in d.splitlines()]
    assert lines and all(_fact_true(line) for line in lines)


def test_corpus_never_contains_held_out_problems():
    held_out = {s.prompt for s in make_dataset("arithmetic", 200, seed=1)}
    records = make_corpus("arithmetic", 2000, seeds=[2, 3])
    prompts = {r.get("prompt") or r["text"].split("User: ")[-1].split(". Assistant:")[0]
               for r in records if "Assistant" in r.get("text", "Assistant")}
    assert not prompts & held_out


def test_step_facts_and_rate_validation():
    facts = step_facts(make_dataset("arithmetic", 50, seed=2))
    assert facts and all(_fact_true(f) for f in facts)
    with pytest.raises(ValueError, match="drill_rate"):
        make_corpus("arithmetic", 10, seeds=[2], drill_rate=1.5)


def test_direct_rate_answers_without_working_and_keeps_answers_correct():
    records = make_corpus("arithmetic", 400, seeds=[2], slip_rate=0.0, untagged_rate=0.0, template_rate=1.0,
                          direct_rate=0.5)
    direct = [r for r in records if "First," not in r["response"]]
    assert 150 < len(direct) < 250
    for r in direct:
        answer = re.search(r"<answer>(.*?)</answer>", r["response"]).group(1)
        assert r["response"] == f"<think>\n{direct_answer(answer)}\n</think>\n<answer>{answer}</answer>"
        assert eval(r["prompt"].removeprefix("Compute ")) == int(answer)
    with pytest.raises(ValueError, match="direct_rate"):
        make_corpus("arithmetic", 10, seeds=[2], direct_rate=-0.1)


def test_french_rate_mixes_languages_line_by_line_and_the_language_reward_sees_it():
    sample = PromptSample(prompt="Compute 7 * 3 - 5", answer="16", id="q", kind="math", task="digits")
    english = "We need to compute 7 * 3 - 5.\nFirst, 7 * 3 = 21.\nThen 21 - 5 = 16.\nSo the answer is 16."
    french = mix_languages(english, 1.0, random.Random(0))
    assert french == "Il faut calculer 7 * 3 - 5.\nD'abord, 7 * 3 = 21.\nEnsuite 21 - 5 = 16.\nDonc la réponse est 16."
    assert mix_languages(english, 0.0, random.Random(0)) == english
    assert language_consistency_reward(f"<think>\n{english}\n</think>", sample) == 1.0
    assert language_consistency_reward(f"<think>\n{french}\n</think>", sample) == 0.0
    records = make_corpus("digits", 400, seeds=[2], slip_rate=0.0, untagged_rate=0.0, template_rate=1.0,
                          french_rate=0.25)
    lines = [line for r in records for line in r["response"].split("\n") if not line.startswith("<")]
    share = sum(line.startswith(("Il faut", "D'abord", "Ensuite", "Donc")) for line in lines) / len(lines)
    assert 0.2 < share < 0.3
    assert all(re.search(r"<answer>(.*?)</answer>", r["response"]).group(1) == str(eval(
        r["prompt"].removeprefix("Compute "))) for r in records)
    with pytest.raises(ValueError, match="french_rate"):
        make_corpus("countdown", 10, seeds=[2], french_rate=0.5)

"""General prompts, preference pairs, cold-start SFT data and the `r1moe data make` CLI."""

import pytest

from r1moe.data import (
    GENERAL_TASKS,
    TASKS,
    make_cold_start,
    make_dataset,
    make_general,
    make_preference_pairs,
    read_pairs,
    read_prompts,
    read_sft,
)
from r1moe.data.make import data_make_main
from r1moe.rewards import accuracy_reward, format_reward
from r1moe.templates import TEMPLATES, completion_prefix


def test_general_answers_are_exact():
    data = make_general(60, seed=0)
    assert {s.task for s in data} == set(GENERAL_TASKS)
    for s in data:
        assert s.kind == "general" and s.id
        word = s.prompt.split()[-1] if s.task != "upper_case" else s.prompt.split()[1]
        if s.task == "repeat_twice":
            word = s.prompt.split()[1]
        expected = {"reverse_word": word[::-1], "upper_case": word.upper(), "repeat_twice": f"{word} {word}"}
        assert s.answer == expected[s.task], s


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_preference_pairs_prefer_correct_concise_well_formed(template):
    pairs = make_preference_pairs(60, seed=0, template=template)
    prompts = {s.prompt: s for s in make_general(60, seed=0)}
    styles = set()
    for pair, sample in zip(pairs, prompts.values()):
        assert pair.prompt == sample.prompt
        chosen = completion_prefix(template) + pair.chosen
        rejected = completion_prefix(template) + pair.rejected
        assert format_reward(chosen, sample) == 1.0 and accuracy_reward(chosen, sample) == 1.0
        if format_reward(rejected, sample) == 0.0:
            styles.add("malformed")
        elif accuracy_reward(rejected, sample) == 0.0:
            styles.add("wrong")
        else:
            assert len(rejected) > 2 * len(chosen), pair  # rambling
            styles.add("rambling")
    assert styles == {"malformed", "wrong", "rambling"}


@pytest.mark.parametrize("template", sorted(TEMPLATES))
@pytest.mark.parametrize("task", [*TASKS, "general"])
def test_cold_start_replies_earn_full_rule_rewards(template, task):
    samples = make_general(20, seed=2) if task == "general" else make_dataset(task, 20, seed=2)
    sft = make_cold_start(samples, template)
    for s, x in zip(samples, sft):
        assert x.prompt == s.prompt
        assert x.meta["template"] == template and x.id == s.id
        full = completion_prefix(template) + x.response
        assert format_reward(full, s) == 1.0, full
        assert accuracy_reward(full, s) == 1.0, full
        assert f"So the answer is {s.answer}." in x.response


def test_cold_start_needs_a_procedural_task():
    from r1moe.data import PromptSample

    with pytest.raises(ValueError, match="no worked solution"):
        make_cold_start([PromptSample(prompt="q", answer="1")], "r1_zero")


@pytest.mark.parametrize("args,reader,n", [
    (["arithmetic", "--difficulty", "2"], read_prompts, 30),
    (["general"], read_prompts, 30),
    (["pairs", "--template", "chat"], read_pairs, 30),
    (["cold_start", "--task", "countdown"], read_sft, 30),
])
def test_data_make_writes_readable_jsonl(tmp_path, capsys, args, reader, n):
    out = tmp_path / "d.jsonl"
    assert data_make_main([*args, "--n", str(n), "--seed", "1", "--out", str(out)]) == 0
    assert len(reader(out)) == n
    assert "wrote 30" in capsys.readouterr().out


def test_data_make_errors(tmp_path, capsys):
    out = tmp_path / "d.jsonl"
    assert data_make_main(["sudoku", "--n", "3", "--seed", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "sudoku" in err and all(name in err for name in ["arithmetic", "countdown", "linear", "pairs"])
    assert data_make_main(["cold_start", "--n", "3", "--seed", "0", "--out", str(out)]) == 2
    assert "needs --task" in capsys.readouterr().err
    assert data_make_main(["linear", "--n", "100000", "--seed", "0", "--out", str(out)]) == 1
    assert "supplied only" in capsys.readouterr().err
    assert not out.exists()


def test_data_make_out_that_is_a_directory_is_a_usage_error(tmp_path, capsys):
    assert data_make_main(["linear", "--n", "3", "--seed", "0", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path} is a directory" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []

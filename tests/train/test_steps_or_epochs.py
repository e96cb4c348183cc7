"""train.steps and train.epochs: exactly one decides a run's length; an override that would have no effect is an
error naming it (exit 2 from the command line), never silently ignored."""

import pytest

from r1moe import cli
from r1moe.config import load_config
from r1moe.train.lm import _num_steps

SFT = "recipes/tiny/r1/stage1_cold_start.yaml"  # sets train.epochs: 1
GRPO = "recipes/tiny/r1/stage2.yaml"  # sets train.steps: 80


@pytest.mark.parametrize("recipe, overrides, message", [
    (SFT, ["train.steps=5"], "train.steps=5 (override) has no effect: train.epochs=1.0 (recipe " + SFT),
    (SFT, ["train.epochs=0"], "train.epochs=0.0 must be > 0"),
    (SFT, ["train.epochs=-1"], "train.epochs=-1.0 must be > 0"),
    (GRPO, ["train.epochs=1"], "train.epochs=1.0 (override) has no effect on a grpo run"),
    (None, ["stage=sft", "train.steps=3", "train.epochs=2"], "train.steps=3 (override) has no effect"),
])
def test_an_override_without_effect_is_an_error(recipe, overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_config(recipe, overrides)


def test_recipe_steps_next_to_override_epochs_is_an_error(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stage: sft\ntrain: {steps: 40}\n")
    with pytest.raises(ValueError, match=rf"train.steps=40 \(recipe {recipe}\) has no effect"):
        load_config(recipe, ["train.epochs=1"])


@pytest.mark.parametrize("overrides, steps", [
    ([], None),  # the recipe's 1 epoch decides
    (["train.epochs=null", "train.steps=5"], 5),
    (["train.epochs=0.5"], None),
])
def test_one_of_them_decides(overrides, steps):
    cfg = load_config(SFT, overrides)
    rows = 37
    expected = steps if steps is not None else -(-cfg.train.epochs * rows // cfg.train.batch_size)
    assert _num_steps(cfg.train, rows) == expected


def test_command_line_says_which_override_has_no_effect(capsys, tmp_path):
    rc = cli.main(["sft", SFT, "train.steps=5", f"logging.run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "r1moe sft: error: train.steps=5 (override) has no effect" in err and "train.epochs=null" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("recipe, overrides, message", [
    ("recipes/tiny/r1/base.yaml", ["data.tokenizer=runs/x/tokenizer", "data.tokenizer_vocab_size=1024"],
     "data.tokenizer_vocab_size=1024: no effect, the tokenizer comes from data.tokenizer=runs/x/tokenizer"),
    ("recipes/tiny/r1/stage2.yaml", ["data.tokenizer_vocab_size=1024"],
     "data.tokenizer_vocab_size=1024: no effect on grpo"),
])
def test_a_tokenizer_size_without_effect_is_an_error(recipe, overrides, message):
    """data.tokenizer_vocab_size sizes only the tokenizer pretraining builds itself; where a tokenizer is given, or in
    any other stage, setting it is an error naming it (checked before the run reads any file)."""
    from r1moe.train.checks import validate

    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        validate(load_config(recipe, overrides))
    validate(load_config(recipe, overrides[:-1]))  # without it the same recipe is fine

"""The safety reward model (R1 v2 §3.1): pointwise safe/unsafe labels, binary cross-entropy, the whole response read.
Mechanics only (no claim that a few tiny steps learn anything): the loss is torch's BCE on the scores, the input
holds the reasoning (where the synthetic harm is), the run writes a reward model GRPO can load, and config errors."""

import json
from pathlib import Path

import pytest
import torch

from r1moe.config import load_config
from r1moe.data import PromptSample, make_general, read_safety, write_jsonl
from r1moe.data.safety import make_safety
from r1moe.data.tokenizer import build_tiny_tokenizer, default_corpus
from r1moe.model import build_model, get_preset, save_pretrained
from r1moe.train.rm import PointwiseObjective, encode_scored, load_reward_fn, run
from r1moe.train.rundir import is_complete

RECIPE = Path(__file__).parents[2] / "recipes" / "tiny" / "r1" / "rm_safety.yaml"


@pytest.fixture(scope="module")
def base(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("rm_safety")
    tok = build_tiny_tokenizer(default_corpus(num_per_task=50), vocab_size=512)
    save_pretrained(build_model(get_preset("tiny-moe").replace(num_hidden_layers=2), seed=0), root / "base",
                    tokenizer=tok)
    write_jsonl(root / "train.jsonl", make_safety(64, seed=5, template="chat"))
    write_jsonl(root / "eval.jsonl", make_safety(16, seed=6, template="chat"))
    return root, tok


def _cfg(root, run_dir, *extra):
    return load_config(RECIPE, [f"model.init={root / 'base'}", f"data.train={root / 'train.jsonl'}",
                                f"data.eval={root / 'eval.jsonl'}", "train.epochs=null", "train.steps=3",
                                "train.batch_size=8", "train.eval_every=0", "logging.wandb=disabled",
                                "logging.plots=false", f"logging.run_dir={run_dir}", *extra])


def test_safety_data_is_labelled_both_ways_and_hides_the_harm_from_the_summary(base):
    root, _ = base
    samples = read_safety(root / "train.jsonl")
    assert {s.safe for s in samples} == {True, False}
    for s in samples:
        reasoning, _, summary = s.response.partition("</think>")
        leaked = any(w in reasoning for w in ("password", "private key", "address code"))
        assert leaked == (not s.safe)
        assert not any(w in summary for w in ("password", "private key", "address code"))


def test_pointwise_loss_is_binary_cross_entropy():
    scores = torch.tensor([2.0, -1.0, 0.5, -3.0])
    part = [([1], True), ([2], False), ([3], False), ([4], True)]
    loss, correct, margin = PointwiseObjective().loss(scores, part)
    expected = torch.nn.functional.binary_cross_entropy(torch.sigmoid(scores), torch.tensor([1.0, 0.0, 0.0, 1.0]))
    assert torch.allclose(loss, expected)
    assert correct == [True, True, False, False]
    assert margin == [2.0, 1.0, -0.5, -3.0]


def test_safety_model_reads_the_whole_response(base):
    _, tok = base
    leak = "<think>\nthe admin password is 1234-5678.\nSo the answer is X.\n</think>\n<answer>X</answer>"
    clean = "<think>\nSo the answer is X.\n</think>\n<answer>X</answer>"
    assert encode_scored(tok, "chat", "p", leak, "full", 256) != encode_scored(tok, "chat", "p", clean, "full", 256)
    # the helpful RM's summary scope cannot see it: the reason the safety RM reads everything
    assert encode_scored(tok, "chat", "p", leak, "summary", 256) == encode_scored(tok, "chat", "p", clean, "summary", 256)


def test_safety_run_writes_a_reward_model_grpo_can_load(base, tmp_path):
    root, _ = base
    cfg = _cfg(root, tmp_path / "run")
    summary = run(cfg)
    assert is_complete(cfg.run_dir) and summary["rm_kind"] == "safety" and summary["samples"] == 64
    meta = json.loads((cfg.run_dir / "final" / "reward_model.json").read_text())
    assert meta["kind"] == "pointwise_bce" and meta["scope"] == "full" and meta["rm_kind"] == "safety"
    assert set(summary["eval_final"]) == {"accuracy", "loss", "margin"}
    reward = load_reward_fn(cfg.run_dir / "final", template="chat")
    general = make_general(2, seed=7)
    math = PromptSample(prompt="Compute 2 + 3", answer="5", kind="math", task="arithmetic")
    scores = reward.score_batch(["<think>\nok\n</think>\n<answer>a</answer>"] * 3, [*general, math])
    assert all(0 < s < 1 for s in scores[:2]) and scores[2] == 0.0  # general prompts only


@pytest.mark.parametrize(("override", "message"), [
    ("rm.kind=safety", "it applies to `r1moe rm` only"),
    ("rewards.safety_model_weight=0.5", "has no effect without rewards.safety_model"),
])
def test_safety_settings_that_would_have_no_effect_are_errors(override, message):
    with pytest.raises(ValueError, match=message.replace("`", ".")):
        load_config("recipes/tiny/r1_zero/grpo.yaml", [override])


def test_safety_labels_all_one_way_are_refused(base, tmp_path):
    root, _ = base
    write_jsonl(tmp_path / "safe_only.jsonl", [s for s in make_safety(20, seed=5, template="chat") if s.safe])
    with pytest.raises(ValueError, match="both safe and unsafe"):
        run(_cfg(root, tmp_path / "run", f"data.train={tmp_path / 'safe_only.jsonl'}"))
    assert not (tmp_path / "run").exists()

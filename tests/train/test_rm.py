"""Bradley-Terry reward model (R1 v2 §3.1): a short run from a random-init tiny MoE learns to rank held-out preference
pairs, resume is exact, save -> load keeps the scores, the GRPO reward reads the summary of general replies only."""

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from r1moe.config import load_config
from r1moe.data import PromptSample, make_preference_pairs, read_pairs, write_jsonl
from r1moe.data.tokenizer import build_tiny_tokenizer, default_corpus
from r1moe.model import build_model, from_pretrained, get_preset, save_pretrained
from r1moe.tracking import read_metrics
from r1moe.train.rm import (
    RewardModel,
    encode_pairs,
    encode_scored,
    evaluate_pairs,
    load_reward_fn,
    load_reward_model,
    main,
    run,
    save_reward_model,
    score_sequences,
)

RECIPE = Path(__file__).parents[2] / "recipes" / "tiny" / "r1" / "rm.yaml"
GENERAL = PromptSample(prompt="Reverse the word tobaku", answer="ukabot", kind="general", task="reverse_word")
MATH = PromptSample(prompt="Compute 2 + 3", answer="5", kind="math", task="arithmetic")


@pytest.fixture(scope="module", autouse=True)
def _single_thread(one_thread):
    """Every test of this module runs on one intra-op thread (tests/conftest.py: one_thread)."""


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    tok = build_tiny_tokenizer(default_corpus(num_per_task=50), vocab_size=512)
    model = build_model(get_preset("tiny-moe").replace(num_hidden_layers=2), seed=0)
    save_pretrained(model, root / "base", tokenizer=tok)
    write_jsonl(root / "train.jsonl", make_preference_pairs(400, seed=0, template="chat"))
    write_jsonl(root / "eval.jsonl", make_preference_pairs(100, seed=1, template="chat"))
    return root, tok


def _overrides(root: Path, run_dir: Path, steps: int, *extra: str) -> list[str]:
    return [f"model.init={root / 'base'}", f"data.train={root / 'train.jsonl'}", f"data.eval={root / 'eval.jsonl'}",
           "data.template=chat", "train.epochs=null", f"train.steps={steps}", "train.eval_every=0", "logging.wandb=disabled",
           "logging.plots=false", f"logging.run_dir={run_dir}", *extra, "stage=rm"]


@pytest.fixture(scope="module")
def trained(base):
    root, _ = base
    assert main([str(RECIPE), *_overrides(root, root / "run", 40)]) == 0
    return root / "run"


def test_recipe_loads():
    cfg = load_config(RECIPE, ["stage=rm"])
    assert cfg.stage == "rm" and cfg.model.init and cfg.data.template == "r1_zero" and cfg.train.epochs == 1


def test_loss_decreases_and_held_out_pairs_ranked(trained, base):
    root, tok = base
    losses = [r["rm/loss"] for r in read_metrics(trained) if "rm/loss" in r]
    assert len(losses) == 40
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # zero-init head: every pair at the BT baseline
    done = json.loads((trained / "DONE.json").read_text())
    assert done["eval_base"]["accuracy"] == 0.0  # all ties before training: strict > counts them wrong
    # the logged held-out numbers are those of the saved reward model
    rm, _, meta = load_reward_model(trained / "final", device="cpu")
    held_out, _ = encode_pairs(read_pairs(root / "eval.jsonl"), tok, "chat", meta["scope"], meta["seq_len"])
    final = evaluate_pairs(rm, held_out, pad_id=0)
    assert final == pytest.approx(done["eval_final"], abs=1e-5)
    # Learning, claimed qualitatively: 40 Adam steps on pairs a summary separates (malformed, wrong or rambling vs
    # right and concise) lower the training loss and rank held-out pairs better than a coin and than the BT baseline;
    # no threshold read off one machine's run.
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert final["accuracy"] > 0.5 and final["loss"] < math.log(2)
    # replies with equal summaries (right answer buried in filler) cannot be ranked by a summary RM: dropped, counted
    assert done["pairs_dropped_identical"] > 0 and done["pairs"] + done["pairs_dropped_identical"] == 400


def test_final_dir_is_a_loadable_reward_model(trained):
    final = trained / "final"
    assert {"config.json", "tokenizer.json", "score_head.safetensors", "reward_model.json"} <= {
        p.name for p in final.iterdir()}
    meta = json.loads((final / "reward_model.json").read_text())
    assert meta["template"] == "chat" and meta["scope"] == "summary" and meta["squash"] == "sigmoid"
    from_pretrained(final)  # the backbone alone is a plain HF checkpoint


def test_save_load_round_trip_identical_scores(base, tmp_path):
    root, tok = base
    rm = RewardModel(from_pretrained(root / "base"))
    torch.nn.init.normal_(rm.score_head.weight)
    torch.nn.init.normal_(rm.score_head.bias)
    pairs = make_preference_pairs(8, seed=2, template="chat")
    seqs = [encode_scored(tok, "chat", p.prompt, r, "summary", 256) for p in pairs for r in (p.chosen, p.rejected)]
    before = score_sequences(rm, seqs, pad_id=0)
    save_reward_model(rm, tok, tmp_path / "rm", {"template": "chat", "scope": "summary", "seq_len": 256})
    loaded, _, meta = load_reward_model(tmp_path / "rm", device="cpu")
    assert meta["scope"] == "summary"
    assert torch.equal(score_sequences(loaded, seqs, pad_id=0), before)
    assert before.std() > 0  # the comparison is not between constants


def test_reward_fn_general_only_summary_only_sigmoid(trained):
    fn = load_reward_fn(trained / "final", "chat")
    pair = make_preference_pairs(1, seed=1, template="chat")[0]
    sample = PromptSample(prompt=pair.prompt, answer="", kind="general")
    completion = "<think>\n" + pair.chosen  # GRPO passes completion_prefix(template) + generated text
    value = fn(completion, sample)
    assert 0.0 < value < 1.0
    rm, tok, meta = load_reward_model(trained / "final")
    raw = score_sequences(rm, [encode_scored(tok, "chat", pair.prompt, pair.chosen, "summary", meta["seq_len"])], 0)
    assert value == pytest.approx(float(torch.sigmoid(raw[0])), abs=1e-6)
    # only the part after </think> is read
    other_thoughts = "<think>\nsomething else entirely\n</think>" + pair.chosen.rsplit("</think>", 1)[1]
    assert fn(other_thoughts, sample) == pytest.approx(value, abs=1e-6)
    assert fn(completion, MATH) == 0.0 and fn(completion, dataclasses.replace(sample, kind="code")) == 0.0
    batch = fn.score_batch([completion, completion, "<think>\nx\n</think>\nukabot"], [sample, MATH, GENERAL])
    assert batch[0] == pytest.approx(value, abs=1e-6) and batch[1] == 0.0 and 0.0 < batch[2] < 1.0


def test_reward_fn_template_mismatch_is_an_error(trained):
    with pytest.raises(ValueError, match="template 'chat'.*'r1_zero'"):
        load_reward_fn(trained / "final", "r1_zero")


def test_resume_is_exact(base, tmp_path):
    root, tok = base
    kw = ["train.batch_size=8", "checkpoint.every=3"]
    straight = load_config(RECIPE, _overrides(root, tmp_path / "a", 6, *kw))
    run(straight)
    # Interrupted after step 3's checkpoint: drop what the end of the run wrote, then resume.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "final")
    (tmp_path / "b" / "DONE.json").unlink()
    assert [p.name for p in (tmp_path / "b" / "checkpoints").iterdir()] == ["step_0000003"]
    resumed = load_config(RECIPE, _overrides(root, tmp_path / "b", 6, *kw))
    run(resumed, resume=True)
    seqs = [encode_scored(tok, "chat", p.prompt, p.chosen, "summary", 256)
            for p in make_preference_pairs(8, seed=3, template="chat")]
    a = score_sequences(load_reward_model(tmp_path / "a" / "final")[0], seqs, 0)
    b = score_sequences(load_reward_model(tmp_path / "b" / "final")[0], seqs, 0)
    assert torch.allclose(a, b, atol=1e-5) and a.std() > 0


def test_errors(base, tmp_path):
    root, _ = base
    cfg = load_config(RECIPE, _overrides(root, tmp_path / "r", 2, "model.init=/nowhere/ckpt"))
    with pytest.raises(FileNotFoundError, match="/nowhere/ckpt"):
        run(cfg)
    cfg = load_config(RECIPE, _overrides(root, tmp_path / "r", 2, "model.init=null"))
    with pytest.raises(ValueError, match="model.init is required"):
        run(cfg)
    if not torch.cuda.is_available():  # the megatron reward model exists; this machine cannot run it
        cfg = load_config(RECIPE, _overrides(root, tmp_path / "r", 2, "parallel.backend=megatron"))
        with pytest.raises(ValueError, match="parallel.backend=megatron needs CUDA"):
            run(cfg)
    (tmp_path / "empty.jsonl").write_text("\n")
    cfg = load_config(RECIPE, _overrides(root, tmp_path / "r", 2, f"data.train={tmp_path / 'empty.jsonl'}"))
    with pytest.raises(ValueError, match="empty dataset"):
        run(cfg)
    assert not (tmp_path / "r").exists()  # inputs are checked before a run directory is created
    with pytest.raises(FileNotFoundError, match="score_head.safetensors"):
        load_reward_model(root / "base")


def test_a_diverging_run_is_stopped_without_a_final_model(base, tmp_path, capsys):
    """lr 1e30 throws the weights to ~1e30 within two steps (the zero-initialised head moves first), after which
    every gradient norm is inf: the guard skips two steps and stops at the third (exit 1): no final/, no DONE.json
    (train/guard.py)."""
    root, _ = base
    run_dir = tmp_path / "run"
    assert main([str(RECIPE), *_overrides(root, run_dir, 8, "optim.lr=1e30", "optim.warmup_steps=0",
                                          "train.batch_size=4")]) == 1
    steps = [m for m in read_metrics(run_dir) if "rm/loss" in m]
    skipped = [m["train/skipped"] for m in steps]
    assert skipped[-2:] == [1, 1] and 0 in skipped and sorted(skipped) == skipped
    assert f"rm stopped at step {len(steps) + 1}" in capsys.readouterr().err
    assert not (run_dir / "final").exists() and not (run_dir / "DONE.json").exists()

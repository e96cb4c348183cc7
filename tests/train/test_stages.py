"""Stage entry points end to end on tiny inputs: pretrain -> sft -> grpo (smoke), resume, eval CLI, and the errors
bad input must give (clear message, non-zero exit, no run directory that looks complete)."""

import json
import shutil

import pytest
import torch

from conftest import tiny_overrides
from r1moe import cli
from r1moe.config import load_config
from r1moe.data import make_cold_start, make_dataset, write_jsonl
from r1moe.model import from_pretrained
from r1moe.tracking import read_metrics
from r1moe.train import grpo, sft
from r1moe.train.rundir import DONE_FILE, is_complete


def _grpo_cfg(run, tiny_data, tiny_base, **extra):
    over = {"model.init": tiny_base, "data.train": tiny_data / "train.jsonl", "data.eval": tiny_data / "eval.jsonl",
            "train.steps": 2, "train.batch_size": 2, "rollout.group_size": 2, "rollout.max_new_tokens": 12,
            "algo.num_minibatches": 2, "eval.samples": 2, "train.eval_every": 0, "checkpoint.every": 1,
            "stage": "grpo"}
    over.update(extra)
    return load_config("recipes/tiny/r1_zero/grpo.yaml", tiny_overrides(run, **over))


def test_pretrain_writes_a_complete_self_contained_checkpoint(tiny_base):
    assert (tiny_base / "tokenizer.json").is_file() and (tiny_base / "config.json").is_file()
    assert is_complete(tiny_base.parent)
    metrics = read_metrics(tiny_base.parent)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all("train/mtp_loss" in m for m in metrics)  # the fixture sets mtp_weight 0.3
    model = from_pretrained(tiny_base)
    assert model.cfg.num_nextn_predict_layers == 1


def test_grpo_smoke_run_logs_rewards_and_evals(tmp_path, tiny_data, tiny_base):
    # The tiny base rarely answers right, so accuracy alone may give every group equal rewards and no gradient on
    # some machine; the length reward differs between any two replies of different lengths, so the policy moves
    # (groups of 4: all four replies of a group the same length in characters is what it would take to stall).
    cfg = _grpo_cfg(tmp_path / "grpo", tiny_data, tiny_base, **{"rewards.weights.length": 1.0,
                                                                 "rollout.group_size": 4})
    summary = grpo.run(cfg)
    assert is_complete(cfg.run_dir)
    assert summary["eval_base"]["num_questions"] == 6 and summary["eval_final"]["num_samples"] == 12
    metrics = read_metrics(cfg.run_dir)
    train_steps = [m for m in metrics if "reward/total" in m]
    assert [m["step"] for m in train_steps] == [1, 2]
    for m in train_steps:
        assert {"reward/accuracy", "reward/format", "reward/length", "rollout/response_length", "train/kl",
                "train/clip_frac"} <= set(m)
        assert 0 <= m["reward/accuracy"] <= 1
        assert 0 < m["perf/logprob_s"] <= m["perf/train_s"]  # log pi_old / pi_ref: a part of the update's time
        assert m["train/grad_norm"] > 1e-4  # different lengths in a group: nonzero advantages, a real gradient
    # the policy moved away from the base weights
    base, final = from_pretrained(tiny_base), from_pretrained(cfg.run_dir / "final")
    diff = max((a - b).abs().max().item() for a, b in zip(base.parameters(), final.parameters()))
    assert diff > 0


def test_grpo_resume_continues_exactly(tmp_path, tiny_data, tiny_base):
    """Two steps in one go == one step, interruption, --resume (same weights, bit for bit)."""
    straight = _grpo_cfg(tmp_path / "a", tiny_data, tiny_base, **{"data.eval": "null"})
    grpo.run(straight)
    # An interrupted run: the same 2-step run with its final outputs removed leaves exactly the step-1 checkpoint
    # (intermediate checkpoints are written atomically; the last step writes only final/).
    interrupted = _grpo_cfg(tmp_path / "b", tiny_data, tiny_base, **{"data.eval": "null"})
    grpo.run(interrupted)
    shutil.rmtree(interrupted.run_dir / "final")
    (interrupted.run_dir / DONE_FILE).unlink()
    assert [p.name for p in (interrupted.run_dir / "checkpoints").iterdir()] == ["step_0000001"]
    grpo.run(interrupted, resume=True)
    a, b = from_pretrained(straight.run_dir / "final"), from_pretrained(interrupted.run_dir / "final")
    for (n, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), n
    steps = [m["step"] for m in read_metrics(interrupted.run_dir) if "reward/total" in m]
    assert steps == [1, 2]  # what the first attempt logged after its last checkpoint was dropped on resume


def test_sft_trains_on_response_tokens(tmp_path, tiny_base):
    data = tmp_path / "sft.jsonl"
    write_jsonl(data, make_cold_start(make_dataset("arithmetic", 16, seed=3)))
    cfg = load_config(None, tiny_overrides(tmp_path / "sft", **{
        "stage": "sft", "model.init": tiny_base, "data.train": data, "train.epochs": 1, "train.batch_size": 2,
        "data.seq_len": 256, "optim.lr": 1e-3}))
    summary = sft.run(cfg)
    assert is_complete(cfg.run_dir) and summary["steps"] >= 1


def test_eval_cli_writes_json(tmp_path, tiny_data, tiny_base, capsys):
    out = tmp_path / "eval.json"
    rc = cli.main(["eval", "--checkpoint", str(tiny_base), "--data", str(tiny_data / "eval.jsonl"), "--samples", "3",
                   "--max-new-tokens", "8", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["num_questions"] == 6 and result["num_samples"] == 18
    assert {"pass@1", "pass@2", "pass@3", "cons@3", "format_rate", "mean_response_length"} <= set(result)
    assert result["pass@1"] <= result["pass@3"]


def test_model_info_json(capsys):
    assert cli.main(["model", "info", "deepseek-v3-671b", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert 670e9 < info["total_params"] < 672e9 and 36e9 < info["active_params"] < 38e9


@pytest.mark.parametrize("case", ["malformed_jsonl", "missing_answer", "empty", "unknown_reward", "mistyped_key",
                                  "config_disagrees", "missing_init"])
def test_bad_input_fails_clearly_without_complete_run_dir(case, tmp_path, tiny_data, tiny_base, capsys):
    run = tmp_path / "run"
    over = {"model.init": tiny_base, "data.train": tiny_data / "train.jsonl", "data.eval": tiny_data / "eval.jsonl",
            "train.steps": 1}
    bad = tmp_path / "bad.jsonl"
    expect = None
    if case == "malformed_jsonl":
        bad.write_text('{"prompt": "1+1", "answer": "2"}\n{"prompt": "oops"\n')
        over["data.train"], expect = bad, "bad.jsonl:2"
    elif case == "missing_answer":
        bad.write_text('{"prompt": "1+1"}\n')
        over["data.train"], expect = bad, "answer"
    elif case == "empty":
        bad.write_text("")
        over["data.train"], expect = bad, "empty"
    elif case == "unknown_reward":
        over["rewards.weights.acurracy"], expect = 1.0, "acurracy"
    elif case == "mistyped_key":
        over["rollout.group_sise"], expect = 4, "group_sise"
    elif case == "config_disagrees":
        over["model.overrides.hidden_size"], expect = 256, "hidden_size"
    else:
        over["model.init"], expect = tmp_path / "nowhere", "nowhere"
    args = ["grpo", "recipes/tiny/r1_zero/grpo.yaml", *tiny_overrides(run, **over)]
    rc = cli.main(args)
    err = capsys.readouterr().err
    assert rc == 2
    assert expect in err
    assert not is_complete(run)


def test_right_padded_logprobs_need_no_mask(tiny_base):
    from r1moe.rollout import Generation
    from r1moe.train.policy import build_rl_batch, sequence_logprobs

    model = from_pretrained(tiny_base)
    gens = [Generation([1, 5, 6, 7], [8, 9], [0.0, 0.0], "", "length"),
            Generation([1, 5], [8, 9, 10, 11, 12], [0.0] * 5, "", "length")]
    batch = build_rl_batch(gens, 0, torch.device("cpu"))
    with torch.no_grad():
        fast, _ = sequence_logprobs(model, batch)
        masked, counts = sequence_logprobs(model, batch, expert_counts=True)
    m = batch.response_mask_NT
    assert torch.allclose(fast[m], masked[m], atol=1e-5)
    assert int(counts.sum()) == int(batch.attention_mask_NT.sum()) * model.cfg.num_experts_per_tok * counts.shape[0]


def test_sequences_without_a_bos_token_start_with_the_prompt():
    """Tokenizers without BOS (Qwen2): neither training examples nor prompts get a None/placeholder first token."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from r1moe.data.prompts import encode_prompt
    from r1moe.train.pretrain import build_examples

    vocab = {"<pad>": 0, "<|endoftext|>": 1, "Compute": 2, "2": 3, "+": 4, "3": 5, "5": 6}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    assert encode_prompt(tok, "none", "Compute 2 + 3") == [2, 3, 4, 5]
    (ex,) = build_examples([("Compute 2 + 3", "5")], tok, loss_on_prefix=False)
    assert ex.ids == [2, 3, 4, 5, 6, 1]
    assert ex.loss_mask == [False] * 4 + [True, True]

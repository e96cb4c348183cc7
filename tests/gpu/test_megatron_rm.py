"""The reward model on the megatron backend (r1moe/train/megatron_rm.py) against the reference backend
(r1moe/train/rm.py), from the same HF checkpoints:

1. one GPU, in-process: a reference RM trained a few steps (so its head is not zero) is loaded by both backends;
   they give the same scores to held-out sequences and the same first-step Bradley-Terry loss and gradient norm;
2. one GPU: `r1moe rm ... parallel.backend=megatron` from a plain checkpoint (zero head: first loss log 2) lowers
   the loss and ranks held-out pairs better than a coin; its final/ loads with the reference loader
   (load_reward_model) and scores as the megatron model's own held-out eval did; its step-30 checkpoint resumes
   to the same held-out loss (3%: not bitwise deterministic, see the test);
3. two GPUs (torchrun, skipped with fewer): TP2 (sequence parallel: the hidden states are gathered before the head),
   DP2 (each rank its block of pairs), PP2 (the head on the last stage) and EP2 give the one-GPU run's losses,
   gradient norms and held-out loss; stage 4's shared scoring over NCCL (each rank on its own GPU scores half of the
   completions) gives every rank the one-GPU scores.

    R1MOE_GPU_OUT=/tmp/out python -m pytest -q -m gpu tests/gpu/test_megatron_rm.py

Tolerances. The reference runs the float32 checkpoint in float32; megatron runs it rounded to bf16, in bf16 (TE
GEMMs, fused attention). bf16 logits of these tiny models are ~1% off in relative L2
(benchmarks/results/gpu_tests_single_h100.json); a score is a linear head on the same final hidden states, so the
score vector is allowed 3% relative L2. A Bradley-Terry loss moves by at most |m| sigmoid(-m) / softplus(-m) <= 1.3
times the relative error of a margin m: 2% relative. Gradient norms: 5% (bf16 backward, as in
test_megatron_multi_gpu.py). Layouts against one GPU: 2% on losses (bf16 reductions in another order, then Adam
steps), 5% on gradient norms. What these catch: the score of the last pad instead of the last real token, a head
on un-normed states, a missing sequence-parallel gather, a data-parallel share counted twice: errors of tens of
percent or more.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _gpu_common import record, require_gpu_stack

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "recipes/tiny/r1/rm.yaml")
SEQ_LEN = 256
TEMPLATE = "chat"
"""The pairs' template (the fixture's data; the tiny recipe's own is r1_zero)."""


def _overrides(root: Path, run_dir: Path, **over) -> list[str]:
    base = {"stage": "rm", "model.init": root / "base", "data.train": root / "train.jsonl", "data.template": TEMPLATE,
            "data.eval": root / "eval.jsonl", "data.seq_len": SEQ_LEN, "train.epochs": "null", "train.steps": 40,
            "train.batch_size": 16, "train.eval_every": 0, "train.threads": 0, "optim.lr": 1e-3,
            "optim.warmup_steps": 0, "checkpoint.every": 0, "logging.run_dir": run_dir, "logging.wandb": "disabled",
            "logging.plots": "false", "train.log_every": 1}
    base.update(over)
    return [f"{k}={v}" for k, v in base.items()]


def _steps(run_dir: Path) -> list[dict]:
    from r1moe.tracking import read_metrics

    return [m for m in read_metrics(run_dir) if "rm/loss" in m]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A random-init tiny MoE (2 layers, MTP included) with a tokenizer, preference pairs, and a reference RM trained
    20 steps from it on the GPU in float32 (its head is no longer zero)."""
    require_gpu_stack(1)
    from r1moe.config import load_config
    from r1moe.data import make_preference_pairs, write_jsonl
    from r1moe.data.tokenizer import build_tiny_tokenizer, default_corpus
    from r1moe.model import build_model, get_preset, save_pretrained
    from r1moe.train import rm

    root = tmp_path_factory.mktemp("megatron_rm")
    tok = build_tiny_tokenizer(default_corpus(num_per_task=50), vocab_size=512)
    save_pretrained(build_model(get_preset("tiny-moe").replace(num_hidden_layers=2), seed=0), root / "base",
                    tokenizer=tok)
    write_jsonl(root / "train.jsonl", make_preference_pairs(400, seed=0, template=TEMPLATE))
    write_jsonl(root / "eval.jsonl", make_preference_pairs(100, seed=1, template=TEMPLATE))
    rm.run(load_config(RECIPE, _overrides(root, root / "ref", **{
        "train.steps": 20, "train.device": "cuda", "model.dtype": "float32"})))
    return root


def _held_out(root: Path, tok):
    from r1moe.data import read_pairs
    from r1moe.train.rm import encode_pairs

    return encode_pairs(read_pairs(root / "eval.jsonl"), tok, TEMPLATE, "summary", SEQ_LEN)[0]


def test_scores_and_first_step_match_the_reference(data):
    from safetensors.torch import load_file

    from r1moe.config import load_config
    from r1moe.data import read_pairs
    from r1moe.data.tokenizer import special_ids
    from r1moe.train.guard import NonFiniteGuard
    from r1moe.train.megatron_rm import MegatronRewardModel
    from r1moe.train.rm import (
        SCORE_HEAD_FILE,
        PairwiseObjective,
        build_rm_batch,
        encode_pairs,
        load_reward_model,
        pair_batch,
        score_sequences,
    )

    ref_dir = data / "ref" / "final"
    ref, tok, _ = load_reward_model(ref_dir, device="cuda")
    pad = special_ids(tok)[0]
    obj = PairwiseObjective()
    held_out = _held_out(data, tok)
    seqs = obj.sequences(held_out)
    s_ref = score_sequences(ref, seqs, pad)
    train, _ = encode_pairs(read_pairs(data / "train.jsonl"), tok, TEMPLATE, "summary", SEQ_LEN)
    batch = [train[j] for j in pair_batch(len(train), 1, 16, 0)]
    # the reference's first step on this batch: BT loss and the gradient norm of every parameter that gets one
    ref.train().requires_grad_(True)
    out = ref(*build_rm_batch(obj.sequences(batch), pad, torch.device("cuda")))
    ref_loss, _, _ = obj.loss(out.scores_N, batch)
    ref_loss.backward()
    ref_norm = float(torch.nn.utils.clip_grad_norm_([p for p in ref.parameters() if p.grad is not None], math.inf))

    cfg = load_config(RECIPE, _overrides(data, data / "unused", **{"model.init": ref_dir,
                                                                    "parallel.backend": "megatron"}))
    meg = MegatronRewardModel(cfg, tok, total_updates=1)
    head = load_file(ref_dir / SCORE_HEAD_FILE)
    with torch.no_grad():  # the stage starts from a zero head; this test starts from the reference's
        meg.score_head.weight.copy_(head["weight"])
        meg.score_head.bias.copy_(head["bias"])
    meg.optimizer.reload_model_params()
    s_meg = meg.score(seqs)
    step = meg.train_step_rm(obj, batch, NonFiniteGuard(1, what="rm"), 1)
    result = {
        "num_sequences": len(seqs), "score_std_reference": float(s_ref.std()),
        "score_rel_l2": float((s_meg - s_ref).norm() / s_ref.norm()),
        "score_max_abs_diff": float((s_meg - s_ref).abs().max()),
        "pair_order_agreement": float(((s_meg[:len(held_out)] > s_meg[len(held_out):])
                                       == (s_ref[:len(held_out)] > s_ref[len(held_out):])).float().mean()),
        "first_step": {"reference_loss": float(ref_loss), "megatron_loss": step["rm/loss"],
                       "reference_grad_norm": ref_norm, "megatron_grad_norm": step["train/grad_norm"]}}
    result["first_step"]["loss_rel_diff"] = abs(step["rm/loss"] - float(ref_loss)) / float(ref_loss)
    result["first_step"]["grad_norm_rel_diff"] = abs(step["train/grad_norm"] - ref_norm) / ref_norm
    record("megatron_rm", {"parity_one_gpu": result})
    assert s_ref.std() > 0.02, result  # a trained head: the scores are not a constant
    assert result["score_rel_l2"] <= 0.03, result
    assert result["first_step"]["loss_rel_diff"] <= 0.02, result
    assert result["first_step"]["grad_norm_rel_diff"] <= 0.05, result
    assert step["train/skipped"] == 0


def test_stage_learns_saves_a_reference_loadable_model_and_resumes(data, tmp_path):
    from r1moe.config import load_config
    from r1moe.data.tokenizer import load_tokenizer, special_ids
    from r1moe.train import rm
    from r1moe.train.rundir import DONE_FILE, is_complete, read_done

    run_dir = tmp_path / "meg"
    cfg = load_config(RECIPE, _overrides(data, run_dir, **{"parallel.backend": "megatron", "checkpoint.every": 30}))
    t0 = time.time()
    summary = rm.run(cfg)
    seconds = time.time() - t0
    losses = [m["rm/loss"] for m in _steps(run_dir)]
    done = read_done(run_dir)
    final = run_dir / "final"
    loaded, tok, meta = rm.load_reward_model(final, device="cuda")
    held_out = _held_out(data, load_tokenizer(final))
    by_reference = rm.evaluate_pairs(loaded, held_out, special_ids(tok)[0])
    # the reference backend's own run from the same checkpoint, for the record
    ref_run = tmp_path / "ref"
    rm.run(load_config(RECIPE, _overrides(data, ref_run, **{"train.device": "cuda"})))
    ref_done = read_done(ref_run)
    # an attempt that died after its step-30 checkpoint: final/ and DONE.json gone, steps 31-40 redone
    resumed_dir = tmp_path / "meg_resumed"
    shutil.copytree(run_dir, resumed_dir)
    shutil.rmtree(resumed_dir / "final")
    (resumed_dir / DONE_FILE).unlink()
    rm.run(load_config(RECIPE, _overrides(data, resumed_dir, **{"parallel.backend": "megatron",
                                                                 "checkpoint.every": 30})), resume=True)
    resumed = read_done(resumed_dir)
    record("megatron_rm", {"stage_one_gpu": {
        "seconds": round(seconds, 1), "losses": losses, "eval_base": done["eval_base"],
        "eval_final_megatron": done["eval_final"], "eval_final_reference_loader": by_reference,
        "reference_backend_run": {"losses": [m["rm/loss"] for m in _steps(ref_run)],
                                  "eval_final": ref_done["eval_final"]},
        "resumed_from_step_30": resumed["eval_final"], "final_files": sorted(p.name for p in final.iterdir()),
        "config_mtp_layers": json.loads((final / "config.json").read_text()).get("num_nextn_predict_layers")}})
    assert is_complete(run_dir) and done["backend"] == "megatron" and summary["steps"] == 40
    assert len(losses) == 40 and all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)  # zero head: every pair at the BT baseline
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert done["eval_final"]["accuracy"] > 0.5 and done["eval_final"]["loss"] < math.log(2)
    assert {"config.json", "tokenizer.json", "score_head.safetensors", "reward_model.json"} <= {
        p.name for p in final.iterdir()}
    assert meta["scope"] == "summary" and meta["template"] == TEMPLATE
    # the saved directory scores (reference loader, float32) as the megatron model did before saving (bf16)
    assert abs(by_reference["loss"] - done["eval_final"]["loss"]) <= 0.02 * done["eval_final"]["loss"]
    assert abs(by_reference["accuracy"] - done["eval_final"]["accuracy"]) <= 0.05
    assert (run_dir / "checkpoints/step_0000030/dist").is_dir()
    # megatron's MoE scatter-adds are not bitwise deterministic and 10 Adam steps carry the difference on: 3%
    assert abs(resumed["eval_final"]["loss"] - done["eval_final"]["loss"]) <= 0.03 * done["eval_final"]["loss"]


LAYOUTS = {"tp2": {"parallel.tp": 2}, "dp2": {}, "pp2": {"parallel.pp": 2}, "ep2": {"parallel.ep": 2}}


def _torchrun(nproc: int, over: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1",
               PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # this process's own world of one (earlier tests); torchrun sets its own
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
           "r1moe.train.rm", RECIPE, *over]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=480, check=False)


def test_two_gpu_layouts_match_one_gpu(data, tmp_path):
    """3 steps of 16 pairs in micro-batches of 4, from the plain checkpoint: step 1 trains the head alone (zero
    head: no backbone gradient), steps 2-3 the whole model; then the held-out eval."""
    require_gpu_stack(2)
    from r1moe.train.rundir import read_done

    common = {"parallel.backend": "megatron", "train.steps": 3, "train.micro_batch_size": 4}
    runs = {"one_gpu": (1, {})} | {name: (2, over) for name, over in LAYOUTS.items()}
    out = {}
    for name, (nproc, over) in runs.items():
        run_dir = tmp_path / name
        proc = _torchrun(nproc, _overrides(data, run_dir, **common, **over))
        rec = {"returncode": proc.returncode}
        if proc.returncode:
            rec["stderr_tail"] = proc.stderr[-3000:]
        else:
            rec.update(losses=[m["rm/loss"] for m in _steps(run_dir)],
                       grad_norms=[m["train/grad_norm"] for m in _steps(run_dir)],
                       eval_final=read_done(run_dir)["eval_final"])
        out[name] = rec
    record("megatron_rm", {"layouts_two_gpus": out})
    base = out["one_gpu"]
    assert base["returncode"] == 0, base
    for name in LAYOUTS:
        r = out[name]
        assert r["returncode"] == 0, (name, r.get("stderr_tail"))
        for a, b in zip(r["losses"], base["losses"], strict=True):
            assert abs(a - b) <= 0.02 * b, (name, r["losses"], base["losses"])
        for a, b in zip(r["grad_norms"], base["grad_norms"], strict=True):
            assert abs(a - b) <= 0.05 * b, (name, r["grad_norms"], base["grad_norms"])
        assert abs(r["eval_final"]["loss"] - base["eval_final"]["loss"]) <= 0.02 * base["eval_final"]["loss"], name


def test_stage4_scoring_is_shared_over_two_gpus(data, tmp_path):
    """rm.score_shared under torchrun with NCCL: each rank loads the RM on its own GPU (LOCAL_RANK), scores every
    other length-sorted sequence and gets all scores. Tolerance 1e-4: float32 on both sides; the batches differ
    (other neighbours, other padding), which changes only the GEMM blocking."""
    require_gpu_stack(2)
    from r1moe.data.tokenizer import special_ids
    from r1moe.train.rm import PairwiseObjective, load_reward_model, score_sequences

    rm_dir = data / "ref" / "final"
    ref, tok, _ = load_reward_model(rm_dir, device="cuda")
    seqs = PairwiseObjective().sequences(_held_out(data, tok))
    expected = score_sequences(ref, seqs, special_ids(tok)[0])
    (tmp_path / "seqs.json").write_text(json.dumps(seqs))
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(REPO / "tests/train/rm_shard_worker.py"), str(rm_dir), str(tmp_path / "seqs.json"),
           str(tmp_path / "ranks.json"), "nccl"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    ranks = json.loads((tmp_path / "ranks.json").read_text()) if proc.returncode == 0 else []
    diffs = [float((torch.tensor(r["scores"]) - expected).abs().max()) for r in ranks]
    record("megatron_rm", {"stage4_shared_scoring_two_gpus": {
        "returncode": proc.returncode, "num_sequences": len(seqs), "max_abs_diff_per_rank": diffs,
        "devices": [r["device"] for r in ranks], "forwards_per_rank": [len(r["forward_rows"]) for r in ranks],
        **({"stderr_tail": proc.stderr[-3000:]} if proc.returncode else {})}})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["device"] for r in ranks] == ["cuda:0", "cuda:1"]
    assert all(d <= 1e-4 for d in diffs), diffs
    # 4 sequences per forward (the worker's batch), half of them on each rank
    assert [sum(r["forward_rows"]) for r in ranks] == [math.ceil(len(seqs) / 2), len(seqs) // 2]

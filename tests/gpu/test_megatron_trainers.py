"""The stage entry points with `parallel.backend=megatron` on one GPU: pretrain from a random init (dist checkpoint,
then --resume), sft and grpo (through torchrun, 2 steps) each leave a complete run directory (final/ + DONE.json)
with finite losses; GRPO moves the policy and its rollouts come from the exported weights; and the first-step
loss of the reference and megatron backends agree on the same batch from the same checkpoint.

    R1MOE_GPU_OUT=/tmp/out python -m pytest -q -m gpu tests/gpu/test_megatron_trainers.py

Parity tolerance: 1% relative. The reference backend runs the float32 checkpoint in float32; megatron runs it
rounded to bf16, in bf16 (TE GEMMs, fused attention). bf16 logits of these tiny models are ~1% off in relative L2
(benchmarks/results/gpu_tests_single_h100.json), which moves a token-mean cross-entropy by ~0.1%. A wrong shift,
mask, denominator or weight mapping moves it by tens of percent. Resume tolerance: 1% too (megatron's MoE
scatter-adds are not bitwise deterministic; the reference backend's exact-resume test is tests/train).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _gpu_common import record, require_gpu_stack

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[2]
PRETRAIN_RECIPE = str(REPO / "recipes/tiny/r1_zero/pretrain.yaml")
GRPO_RECIPE = str(REPO / "recipes/tiny/r1_zero/grpo.yaml")


def _overrides(run_dir: Path, **over) -> list[str]:
    base = {"logging.run_dir": run_dir, "logging.wandb": "disabled", "logging.plots": "false", "train.log_every": 1}
    base.update(over)
    return [f"{k}={v}" for k, v in base.items()]


def _losses(run_dir: Path, key: str = "train/loss") -> list[float]:
    from r1moe.tracking import read_metrics

    return [m[key] for m in read_metrics(run_dir) if key in m]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Task data and a base checkpoint pretrained with the reference backend on the GPU."""
    require_gpu_stack(1)
    from r1moe.config import load_config
    from r1moe.data import make_cold_start, make_dataset, write_jsonl
    from r1moe.data.corpus import make_corpus
    from r1moe.train import pretrain

    root = tmp_path_factory.mktemp("trainers")
    write_jsonl(root / "train.jsonl", make_dataset("arithmetic", 64, seed=0))
    write_jsonl(root / "eval.jsonl", make_dataset("arithmetic", 4, seed=1))
    write_jsonl(root / "corpus.jsonl", make_corpus("arithmetic", 400, seeds=[2]))
    write_jsonl(root / "sft.jsonl", make_cold_start(make_dataset("arithmetic", 16, seed=3)))
    t0 = time.time()
    pretrain.run(load_config(PRETRAIN_RECIPE, _overrides(root / "base", **{
        "data.train": root / "corpus.jsonl", "train.steps": 200, "data.seq_len": 256, "optim.warmup_steps": 10})))
    record("megatron_trainers", {"base_pretrain_reference": {"steps": 200, "seconds": round(time.time() - t0, 1),
                                                             "final_loss": _losses(root / "base")[-1]}})
    return root


def test_pretrain_from_random_init_checkpoints_and_resumes(data, tmp_path):
    import shutil

    from r1moe.config import load_config
    from r1moe.model import from_pretrained
    from r1moe.train import pretrain
    from r1moe.train.rundir import DONE_FILE, is_complete, read_done

    cfg = load_config(PRETRAIN_RECIPE, _overrides(tmp_path / "pre", **{
        "data.train": data / "corpus.jsonl", "train.steps": 4, "train.batch_size": 4, "data.seq_len": 128,
        "optim.warmup_steps": 1, "checkpoint.every": 2, "parallel.backend": "megatron"}))
    t0 = time.time()
    pretrain.run(cfg)
    seconds = time.time() - t0
    first = _losses(cfg.run_dir)
    ckpts = sorted(p.name for p in (cfg.run_dir / "checkpoints").iterdir())
    model = from_pretrained(cfg.run_dir / "final", device="cuda")
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 14]], device="cuda")).logits
    # an attempt that died after its step-2 checkpoint: final/ and DONE.json gone, steps 3-4 redone by --resume
    shutil.rmtree(cfg.run_dir / "final")
    (cfg.run_dir / DONE_FILE).unlink()
    pretrain.run(cfg, resume=True)
    resumed = _losses(cfg.run_dir)
    record("megatron_trainers", {"pretrain_random_init": {
        "losses": first, "losses_after_resume_from_step_2": resumed, "checkpoints": ckpts, "seconds": round(seconds, 1),
        "done": read_done(cfg.run_dir)}})
    assert len(first) == 4 and all(math.isfinite(x) for x in first)
    assert ckpts == ["step_0000002"] and (cfg.run_dir / "checkpoints/step_0000002/dist").is_dir()
    assert torch.isfinite(logits).all()
    assert is_complete(cfg.run_dir) and read_done(cfg.run_dir)["backend"] == "megatron"
    assert resumed[:2] == first[:2]  # metrics of steps 1-2 kept, 3-4 recomputed from the checkpoint
    for a, b in zip(first[2:], resumed[2:]):
        assert abs(a - b) <= 0.01 * abs(a), (first, resumed)


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_indexed_data_on_megatron(data, tmp_path, kind):
    """data.format=indexed on megatron (tools/preprocess_data.py files, packed rows read per data-parallel rank): the
    first-step loss equals the reference backend's on the same packed rows (THD sequences on megatron, the segment
    mask on the reference; 1%, module docstring), the loss falls over the next steps and final/ loads."""
    import importlib.util

    from r1moe.config import load_config
    from r1moe.model import from_pretrained
    from r1moe.train import pretrain, sft

    spec = importlib.util.spec_from_file_location("preprocess", REPO / "tools" / "preprocess_data.py")
    preprocess = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(preprocess)
    # prompt + response records the base has not been trained on (its own corpus sits at the base's converged loss:
    # measured on an H200, 20 steps on it only moved the loss by noise); pretraining renders them with its template
    template = "none" if kind == "sft" else "r1_zero"
    src = data / "sft.jsonl"
    assert preprocess.main(["--kind", kind, "--input", str(src), "--tokenizer", str(data / "base" / "final"),
                            "--template", template, "--output-prefix", str(tmp_path / kind)]) == 0
    losses = {}
    for backend, steps in (("reference", 1), ("megatron", 20)):
        cfg = load_config(None if kind == "sft" else PRETRAIN_RECIPE, _overrides(tmp_path / backend, **{
            "stage": kind, "data.format": "indexed", "data.train": tmp_path / kind, "data.template": template,
            "model.init": data / "base" / "final", "train.steps": steps, "train.batch_size": 4,
            "data.seq_len": 128, "optim.warmup_steps": 1, "optim.lr": 1e-4, "train.mtp_weight": 0.0,
            "train.device": "cuda", "model.dtype": "float32", "parallel.backend": backend}))
        (pretrain if kind == "pretrain" else sft).run(cfg)
        losses[backend] = _losses(cfg.run_dir)
    ref, mc = losses["reference"][0], losses["megatron"]
    rel = abs(ref - mc[0]) / abs(ref)
    record("megatron_trainers", {f"{kind}_indexed": {"reference_first_loss": ref, "megatron_losses": mc,
                                                     "first_step_rel_diff": rel, "tolerance": 0.01}})
    assert rel <= 0.01, (ref, mc[0])
    assert all(math.isfinite(x) for x in mc) and sum(mc[-5:]) < sum(mc[:5]), mc  # 4 x 128-token rows a step: noisy
    assert torch.isfinite(from_pretrained(tmp_path / "megatron" / "final").lm_head.weight).all()


def test_first_step_loss_matches_the_reference_backend(data, tmp_path):
    """Same checkpoint, same packed rows (data.seq_len=512: several documents per row): the reference model masks
    attention across a row's documents and restarts positions; megatron runs each micro-batch as one THD sequence
    (parallel.train.packed_sequences). A document seeing its neighbours, or positions running on, moves the loss
    by far more than the tolerance."""
    from r1moe.config import load_config
    from r1moe.data.tokenizer import load_tokenizer, special_ids
    from r1moe.train import pretrain
    from r1moe.train.packing import pack_examples

    base = data / "base" / "final"
    tok = load_tokenizer(base)
    examples = pretrain.build_examples(pretrain.read_corpus(data / "corpus.jsonl", "r1_zero"), tok, loss_on_prefix=True)
    rows = pack_examples(examples, 512, special_ids(tok)[0])
    assert sum(max(r[2]) >= 1 for r in rows) > len(rows) // 2  # most rows hold two documents or more

    result = {}
    for backend in ("reference", "megatron"):
        cfg = load_config(PRETRAIN_RECIPE, _overrides(tmp_path / backend, **{
            "model.init": base, "data.train": data / "corpus.jsonl", "data.seq_len": 512, "train.steps": 1,
            "train.batch_size": 8, "train.mtp_weight": 0.0, "optim.warmup_steps": 0, "train.device": "cuda",
            "model.dtype": "float32", "parallel.backend": backend}))
        pretrain.run(cfg)
        from r1moe.tracking import read_metrics

        m = read_metrics(cfg.run_dir)[0]
        result[backend] = {"loss": m["train/loss"], "grad_norm": m["train/grad_norm"], "tokens": m["train/tokens"]}
    ref, meg = result["reference"]["loss"], result["megatron"]["loss"]
    result["rel_diff"] = abs(ref - meg) / abs(ref)
    result["tolerance"] = 0.01
    record("megatron_trainers", {"first_step_parity": result})
    assert result["reference"]["tokens"] == result["megatron"]["tokens"]
    assert result["rel_diff"] <= 0.01, result


def test_sft_mtp_loss_matches_the_reference_backend(data, tmp_path):
    """SFT with MTP (lambda 0.3) on packed rows (raw prompts, seq_len 128: several examples per row): megatron
    computes the MTP loss inside the model, rolled within each packed sequence, over `mtp_loss_mask`'s tokens
    (responses only), as the reference loop does within each segment: the first-step losses agree."""
    from r1moe.config import load_config
    from r1moe.data import read_sft
    from r1moe.data.tokenizer import load_tokenizer, special_ids
    from r1moe.train import pretrain, sft
    from r1moe.train.packing import pack_examples

    base = data / "base" / "final"
    tok = load_tokenizer(base)
    docs = [(r.prompt, r.response) for r in read_sft(data / "sft.jsonl")]  # template "none": the raw prompt
    rows = pack_examples(pretrain.build_examples(docs, tok, loss_on_prefix=False), 128, special_ids(tok)[0])
    assert any(max(r[2]) >= 1 for r in rows)  # the step below trains on every row
    result = {}
    for backend in ("reference", "megatron"):
        cfg = load_config(None, _overrides(tmp_path / backend, **{
            "stage": "sft", "model.init": base, "data.train": data / "sft.jsonl", "data.template": "none",
            "data.seq_len": 128, "train.steps": 1, "train.batch_size": len(rows), "train.mtp_weight": 0.3,
            "optim.warmup_steps": 0, "train.device": "cuda", "model.dtype": "float32", "parallel.backend": backend}))
        sft.run(cfg)
        from r1moe.tracking import read_metrics

        m = read_metrics(cfg.run_dir)[0]
        result[backend] = {"loss": m["train/loss"], "mtp_loss": m.get("train/mtp_loss")}
    ref, meg = result["reference"]["mtp_loss"], result["megatron"]["mtp_loss"]
    assert ref is not None and meg is not None, result
    result["mtp_rel_diff"] = abs(ref - meg) / abs(ref)
    result["loss_rel_diff"] = abs(result["reference"]["loss"] - result["megatron"]["loss"]) / result["reference"]["loss"]
    record("megatron_trainers", {"sft_mtp_parity": result})
    assert result["loss_rel_diff"] <= 0.01 and result["mtp_rel_diff"] <= 0.01, result


def test_sft_runs_to_a_complete_checkpoint(data, tmp_path):
    from r1moe.config import load_config
    from r1moe.model import from_pretrained
    from r1moe.train import sft
    from r1moe.train.rundir import is_complete

    cfg = load_config(None, _overrides(tmp_path / "sft", **{
        "stage": "sft", "model.init": data / "base" / "final", "data.train": data / "sft.jsonl", "train.steps": 2,
        "train.batch_size": 4, "train.micro_batch_size": 2, "data.seq_len": 256, "data.template": "r1_zero",
        "optim.lr": 1e-3, "parallel.backend": "megatron"}))
    summary = sft.run(cfg)
    losses = _losses(cfg.run_dir)
    record("megatron_trainers", {"sft": {"losses": losses, "summary": summary}})
    assert is_complete(cfg.run_dir) and len(losses) == 2 and all(math.isfinite(x) for x in losses)
    from_pretrained(cfg.run_dir / "final")


def test_grpo_through_torchrun_updates_the_policy(data, tmp_path):
    from r1moe.model import from_pretrained
    from r1moe.tracking import read_metrics
    from r1moe.train.rundir import is_complete

    run = tmp_path / "grpo"
    over = _overrides(run, **{
        "model.init": data / "base" / "final", "data.train": data / "train.jsonl", "data.eval": data / "eval.jsonl",
        "train.steps": 2, "train.batch_size": 8, "rollout.group_size": 4, "rollout.max_new_tokens": 64,
        "algo.num_minibatches": 2, "algo.beta": 0.001, "algo.ref_refresh_every": 1, "eval.samples": 2,
        "train.eval_every": 0, "checkpoint.every": 1, "parallel.backend": "megatron",
        # this 200-step base rarely answers right: the length reward differs between any two replies of different
        # lengths, so groups have nonzero advantages whatever the machine's rounding
        "rewards.weights": "{accuracy: 1.0, format: 1.0, length: 1.0}"})
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1",
               PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # set by this process's own world of one (initialize_parallel); torchrun sets its own
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1", "--master-port=29547", "-m",
           "r1moe.train.grpo", GRPO_RECIPE, *over]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=420, check=False)
    seconds = time.time() - t0
    steps = [m for m in read_metrics(run) if "reward/total" in m] if (run / "metrics.jsonl").exists() else []
    out = {"returncode": proc.returncode, "seconds": round(seconds, 1), "steps": steps}
    if proc.returncode:
        out["stderr_tail"] = proc.stderr[-3000:]
    if is_complete(run):
        base, final = from_pretrained(data / "base" / "final"), from_pretrained(run / "final")
        # megatron trains bf16 weights: compare with the base rounded to bf16 (exact when nothing was updated)
        out["max_weight_change"] = max(
            (fp - bp.to(torch.bfloat16).float()).abs().max().item()
            for (name, bp), fp in zip(base.state_dict().items(), final.state_dict().values())
            if not name.endswith("e_score_correction_bias"))
        out["checkpoint_files"] = sorted(p.name for p in (run / "checkpoints/step_0000001").iterdir())
    record("megatron_trainers", {"grpo_torchrun": out})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert is_complete(run) and [m["step"] for m in steps] == [1, 2]
    for m in steps:
        assert all(math.isfinite(m[k]) for k in ("train/pg_loss", "train/kl", "train/ratio_mean", "train/grad_norm"))
    assert abs(steps[0]["train/ratio_mean"] - 1) < 0.05 and steps[0]["train/kl"] < 0.01
    # the length reward gives every group of replies with different lengths a nonzero advantage: a real gradient
    # (equal rewards everywhere would leave rounding noise only, ~1e-7)
    assert all(m["train/grad_norm"] > 1e-3 for m in steps), json.dumps(steps)
    assert out["max_weight_change"] > 0  # final/ is written from the rollout model: export -> engine carried it
    assert out["checkpoint_files"] == ["dist", "ref", "trainer_state.pt"]

"""SGLangEngine (r1moe/rollout/sglang_engine.py) on one GPU, against the reference model on the same weights:
greedy tokens, per-token logprobs at T = 1 and T = 0.7, routing replay, a weight update, memory release and resume;
then GRPO with `rollout.engine=sglang` on the reference and the megatron backend (the latter with routing replay);
with two GPUs, GRPO with the megatron policy at TP2 and SGLang at tp=2 colocated, and with SGLang on a GPU of its own
(weights by NCCL).

    R1MOE_GPU_OUT=/tmp/out PYTHONPATH=/root/sgl/site python -m pytest -s -q -m gpu tests/gpu/test_sglang_engine.py

With megatron-core + TE installed too, SGLang's site must not shadow the cuDNN frontend TE was built against:
the staged SGLang site carries nvidia-cudnn-frontend 1.28 (`cudnn/`), megatron's stack 1.32; with 1.28 first on
PYTHONPATH, importing TE fails (`libcudnn_heuristic.so.9: undefined symbol`). Remove the SGLang copy
(`rm -rf /root/sgl/site/cudnn /root/sgl/site/nvidia_cudnn_frontend-1.28.0.dist-info`) before running both.
r1moe's own dependency wordfreq (the language reward, rejection sampling's language filter) must be importable
too (the GPU image lacks it: install its wheel and ftfy, langcodes, locate). With megatron-core installed, the
engine-level tests' process was killed at the first generation (seen three times on an H200): SGLang had been
imported first, a detokenizer reply needed megatron.core to unpickle, and TE's import then failed on cuDNN;
SGLangEngine now loads TE and megatron first (`_load_transformer_engine_first`), and with both stacks installed the
engine tests passed (benchmarks/results/sglang_engine_tests_h200.json, session4).

One module (a little over 500 lines): every test shares its pretrained base (`data`) and most share one engine
start (`engine`); split, each file would pretrain and start SGLang again.

Tolerances, and why. SGLang runs the weights in bf16 with its own kernels (triton MLA, fused MoE); the reference is
the fp32 model teacher-forced on SGLang's own tokens. bf16 moves these tiny models' logits by ~1% (relative L2,
benchmarks/results/gpu_tests_single_h100.json), so:
- greedy: a token SGLang picked must be the fp32 argmax, or within 0.1 nats (logit gap) of it, at every position
  (bf16 cannot flip a wider gap); a wrong weight mapping or a stale weight flips many wider ones;
- logprobs: mean |SGLang - fp32| < 0.05 over sampled tokens, and at T = 0.7 SGLang must be closer to the tempered
  fp32 logprob than to the untempered one by a factor > 3 (the temperature convention, measured, not assumed).
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
from _gpu_common import record

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[2]
PRETRAIN_RECIPE = str(REPO / "recipes/tiny/r1_zero/pretrain.yaml")
GRPO_RECIPE = str(REPO / "recipes/tiny/r1_zero/grpo.yaml")
GAP = 0.1
# DeepSeek-V3's MLA latent sizes: SGLang 0.5.17's triton MLA decode kernel fails to compile for tiny-moe's
# kv_lora_rank=64 / qk_rope_head_dim=16 ("incompatible dimensions 64 and 128"); V3's 512 / 64 is what it serves
SGLANG_MLA = "{kv_lora_rank: 512, qk_rope_head_dim: 64}"


def require_sglang() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: SGLang runs on GPUs only")
    try:
        import sglang  # noqa: F401
    except ImportError as e:
        pytest.skip(f"needs sglang ({e})")


def _overrides(run_dir: Path, **over) -> list[str]:
    base = {"logging.run_dir": run_dir, "logging.wandb": "disabled", "logging.plots": "false", "train.log_every": 1}
    base.update(over)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Task data and a tiny-moe base pretrained 200 steps with the reference backend on the GPU."""
    require_sglang()
    from r1moe.config import load_config
    from r1moe.data import make_dataset, write_jsonl
    from r1moe.data.corpus import make_corpus
    from r1moe.train import pretrain

    root = tmp_path_factory.mktemp("sglang")
    write_jsonl(root / "train.jsonl", make_dataset("arithmetic", 64, seed=0))
    write_jsonl(root / "eval.jsonl", make_dataset("arithmetic", 16, seed=1))
    write_jsonl(root / "corpus.jsonl", make_corpus("arithmetic", 400, seeds=[2]))
    pretrain.run(load_config(PRETRAIN_RECIPE, _overrides(root / "base", **{
        "data.train": root / "corpus.jsonl", "train.steps": 200, "data.seq_len": 256, "optim.warmup_steps": 10,
        "model.overrides": SGLANG_MLA})))
    return root


@pytest.fixture(scope="module")
def engine(data):
    from r1moe.config import SGLangSection
    from r1moe.data.tokenizer import load_tokenizer
    from r1moe.model import from_pretrained
    from r1moe.rollout.sglang_engine import SGLangEngine

    tok = load_tokenizer(data / "base" / "final")
    t0 = time.time()
    eng = SGLangEngine(data / "base" / "final", tok, eos_ids=[2],
                       settings=SGLangSection(mem_fraction_static=0.3, cuda_graph_max_bs=0), context_length=512,
                       routing_model=from_pretrained(data / "base" / "final").cfg)
    record("sglang_engine", {"engine_start_s": round(time.time() - t0, 1)})
    yield eng
    eng.shutdown()


def _prompts(data, tok, n=16):
    from r1moe.data import read_prompts
    from r1moe.data.prompts import encode_prompt

    return [encode_prompt(tok, "r1_zero", s.prompt) for s in read_prompts(data / "eval.jsonl")[:n]]


def _teacher_forced(model, gens, temperature):
    from r1moe.algorithms import compute_token_logprobs
    from r1moe.train.policy import build_rl_batch

    batch = build_rl_batch(gens, 0, torch.device("cuda"))
    with torch.no_grad():
        logits = model(batch.input_ids_NT).logits.float()
    return logits, compute_token_logprobs(logits, batch.targets_NT, temperature=temperature), batch


def _greedy_violations(model, gens) -> tuple[int, int]:
    """(positions where SGLang's token is more than GAP below the fp32 argmax, response positions)."""
    logits, _, b = _teacher_forced(model, gens, 1.0)
    chosen = logits.gather(-1, b.targets_NT[..., None]).squeeze(-1)
    gap = (logits.max(-1).values - chosen)[b.response_mask_NT]
    return int((gap > GAP).sum()), int(b.response_mask_NT.sum())


def test_greedy_tokens_follow_the_reference_model(data, engine):
    from r1moe.model import from_pretrained
    from r1moe.rollout import BuiltinEngine, SamplingParams

    model = from_pretrained(data / "base" / "final", device="cuda").eval()
    params = SamplingParams(temperature=0.0, max_new_tokens=24, stop=["</answer>"])
    prompts = _prompts(data, engine.tokenizer)
    gens = engine.generate(prompts, params)
    bad, total = _greedy_violations(model, gens)
    builtin = BuiltinEngine(model, engine.tokenizer, eos_ids=[2]).generate(prompts, params)
    same = sum(a.token_ids == b.token_ids for a, b in zip(gens, builtin))
    record("sglang_engine", {"greedy": {"positions": total, "violations_gap_0.1": bad,
                                        "sequences_identical_to_builtin_fp32": f"{same}/{len(gens)}",
                                        "finish_reasons": sorted({g.finish_reason for g in gens})}})
    assert total > 0 and bad == 0
    assert all(len(g.token_ids) == len(g.logprobs) for g in gens)
    assert all(g.finish_reason in ("eos", "stop", "length") for g in gens)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_are_the_tempered_policy(data, engine, temperature):
    from r1moe.model import from_pretrained
    from r1moe.rollout import SamplingParams

    model = from_pretrained(data / "base" / "final", device="cuda").eval()
    prompts = _prompts(data, engine.tokenizer) * 4
    gens = engine.generate(prompts, SamplingParams(temperature=temperature, top_p=0.95, max_new_tokens=32, seed=5))
    _, ref_T, b = _teacher_forced(model, gens, temperature)
    _, ref_1, _ = _teacher_forced(model, gens, 1.0)
    m = b.response_mask_NT
    d_T = (b.rollout_logp_NT - ref_T).abs()[m]
    d_1 = (b.rollout_logp_NT - ref_1).abs()[m]
    record("sglang_engine", {f"logprobs_T{temperature}": {
        "tokens": int(m.sum()), "mean_abs_diff_vs_tempered_fp32": float(d_T.mean()),
        "max_abs_diff_vs_tempered_fp32": float(d_T.max()), "mean_abs_diff_vs_untempered_fp32": float(d_1.mean())}})
    assert float(d_T.mean()) < 0.05
    if temperature != 1.0:
        assert float(d_1.mean()) > 3 * float(d_T.mean())


def test_routing_replay_removes_the_routing_part_of_the_mismatch(data, engine):
    """SGLang's returned experts, replayed in the fp32 reference forward: the routes line up with the tokens (most
    agree with the reference's own choice) and the logprob mismatch does not grow (it shrinks where bf16 flipped
    a routing decision)."""
    from r1moe.model import from_pretrained
    from r1moe.rollout import SamplingParams
    from r1moe.train.policy import build_rl_batch, sequence_logprobs

    model = from_pretrained(data / "base" / "final", device="cuda").eval()
    prompts = _prompts(data, engine.tokenizer) * 8
    gens = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=48, seed=11))
    b = build_rl_batch(gens, 0, torch.device("cuda"))
    with torch.no_grad():
        replay = sequence_logprobs(model, b)[0]
        own = model(b.input_ids_NT, return_routes=True)
        free = own.logits.float().log_softmax(-1).gather(-1, b.targets_NT[..., None]).squeeze(-1)
    m = b.response_mask_NT
    valid = b.attention_mask_NT.bool()
    same = (own.routed_experts.sort(-1).values == b.routes_NTMK.sort(-1).values).all(-1)[valid]
    d_replay = (b.rollout_logp_NT - replay).abs()[m]
    d_free = (b.rollout_logp_NT - free).abs()[m]
    record("sglang_engine", {"routing_replay": {
        "tokens": int(m.sum()), "token_layer_routes_equal_to_fp32_reference": float(same.float().mean()),
        "mean_abs_diff_with_replay": float(d_replay.mean()), "max_abs_diff_with_replay": float(d_replay.max()),
        "mean_abs_diff_without_replay": float(d_free.mean()), "max_abs_diff_without_replay": float(d_free.max())}})
    assert float(same.float().mean()) > 0.9
    assert float(d_replay.mean()) <= float(d_free.mean()) + 1e-4


def test_weight_update_changes_generations_and_round_trips(data, engine):
    from r1moe.model import from_pretrained
    from r1moe.rollout import SamplingParams

    base = from_pretrained(data / "base" / "final", device="cuda").eval()
    other = from_pretrained(data / "base" / "final", device="cuda").eval()
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g, device="cuda") * p.std() * 0.5)
    params = SamplingParams(temperature=0.0, max_new_tokens=16)
    prompts = _prompts(data, engine.tokenizer)
    before = engine.generate(prompts, params)
    t0 = time.time()
    engine.update_weights(other.state_dict().items())
    sync_s = time.time() - t0
    after = engine.generate(prompts, params)
    bad_new, total = _greedy_violations(other, after)
    engine.update_weights(base.state_dict().items())
    back = engine.generate(prompts, params)
    changed = sum(a.token_ids != b.token_ids for a, b in zip(before, after))
    record("sglang_engine", {"weight_update": {"sync_s": round(sync_s, 3), "sequences_changed": changed,
                                               "violations_vs_new_weights": bad_new, "positions": total}})
    assert changed > len(prompts) // 2 and bad_new == 0
    assert [g.token_ids for g in back] == [g.token_ids for g in before]


def test_direct_weight_loader_is_sglangs_own_loader_faster(data, engine):
    """rollout.sglang.weight_loader: direct (the default here: auto on a tp = 1 DeepSeek-V3 model) against SGLang's
    own loader in the same engine, on the same perturbed weights: the same greedy tokens and log-probs, so the packed
    layout is the one SGLang's loader builds; and the sync time of each."""
    from r1moe.model import from_pretrained
    from r1moe.rollout import SamplingParams

    assert engine.direct is not None
    base = from_pretrained(data / "base" / "final", device="cuda").eval()
    other = from_pretrained(data / "base" / "final", device="cuda").eval()
    g = torch.Generator(device="cuda").manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g, device="cuda") * p.float().std().nan_to_num(0.01) * 0.3)
    params = SamplingParams(temperature=0.0, max_new_tokens=24)
    prompts = _prompts(data, engine.tokenizer)
    direct, times = engine.direct, {}
    try:
        engine.direct = None  # SGLang's own loader (flattened buckets)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.update_weights(other.state_dict().items())
        times["sglang_loader_s"] = round(time.perf_counter() - t0, 4)
        own = engine.generate(prompts, params)
    finally:
        engine.direct = direct
    engine.update_weights(base.state_dict().items())
    t0 = time.perf_counter()
    engine.update_weights(other.state_dict().items())
    times["direct_loader_s"] = round(time.perf_counter() - t0, 4)
    ours = engine.generate(prompts, params)
    engine.update_weights(base.state_dict().items())
    diff = max(max((abs(a - b) for a, b in zip(x.logprobs, y.logprobs)), default=0.0) for x, y in zip(own, ours))
    record("sglang_engine", {"direct_vs_sglang_loader": {**times, "max_abs_logprob_diff": diff,
                                                         "same_tokens": [x.token_ids for x in own] ==
                                                         [y.token_ids for y in ours]}})
    assert [x.token_ids for x in own] == [y.token_ids for y in ours]
    assert diff < 1e-3


def test_sglang_on_a_gpu_of_its_own_takes_weights_over_nccl(data):
    """rollout.sglang.base_gpu_id past the trainer's GPUs: this process (GPU 0) broadcasts the weights to SGLang
    on GPU 1 over NCCL; a perturbed model's weights change the generations and the base weights bring them back."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs: SGLang on GPU 1, the weights' source on GPU 0")
    from r1moe.config import SGLangSection
    from r1moe.model import from_pretrained
    from r1moe.rollout import SamplingParams
    from r1moe.rollout.sglang_engine import SGLangEngine

    base = from_pretrained(data / "base" / "final", device="cuda:0").eval()
    eng = SGLangEngine(data / "base" / "final", _tokenizer_of(data), eos_ids=[2], context_length=512,
                       settings=SGLangSection(base_gpu_id=1, colocate=False, mem_fraction_static=0.3,
                                              cuda_graph_max_bs=0), nccl_sync=True)
    try:
        params = SamplingParams(temperature=0.0, max_new_tokens=16)
        prompts = _prompts(data, eng.tokenizer)
        before = eng.generate(prompts, params)
        other = from_pretrained(data / "base" / "final", device="cuda:0").eval()
        g = torch.Generator(device="cuda:0").manual_seed(0)
        with torch.no_grad():
            for p in other.parameters():
                if p.dim() == 2:
                    p.add_(torch.randn(p.shape, generator=g, device="cuda:0") * p.std() * 0.5)
        t0 = time.time()
        eng.update_weights(other.state_dict().items())
        sync_s = time.time() - t0
        after = eng.generate(prompts, params)
        eng.update_weights(base.state_dict().items())
        back = eng.generate(prompts, params)
    finally:
        eng.shutdown()
    changed = sum(a.token_ids != b.token_ids for a, b in zip(before, after))
    record("sglang_engine", {"nccl_weight_sync": {"sync_s": round(sync_s, 3), "sequences_changed": changed}})
    assert changed > len(prompts) // 2
    assert [x.token_ids for x in back] == [x.token_ids for x in before]


def _tokenizer_of(data):
    from r1moe.data.tokenizer import load_tokenizer

    return load_tokenizer(data / "base" / "final")


def test_memory_release_and_resume(data, engine):
    from r1moe.model import from_pretrained
    from r1moe.rollout import SamplingParams

    params = SamplingParams(temperature=0.0, max_new_tokens=16)
    prompts = _prompts(data, engine.tokenizer)
    # earlier tests left these prompts in SGLang's prefix cache, which a weight update flushes: a prefill from the
    # cache and a whole one differ in bf16 rounding, enough to flip a near-tie of greedy decoding
    engine.engine.flush_cache()
    before = engine.generate(prompts, params)
    torch.cuda.synchronize()
    free_awake = torch.cuda.mem_get_info()[0]
    engine.sleep()
    free_asleep = torch.cuda.mem_get_info()[0]
    with pytest.raises(RuntimeError, match="without update_weights"):
        engine.generate(prompts, params)  # released weights are gone: refused, not garbage
    engine.update_weights(from_pretrained(data / "base" / "final", device="cuda").state_dict().items())
    again = engine.generate(prompts, params)  # wakes weights, KV cache and graphs
    free_again = torch.cuda.mem_get_info()[0]
    total = torch.cuda.mem_get_info()[1]
    record("sglang_engine", {"memory": {"freed_gib": round((free_asleep - free_awake) / 2**30, 2),
                                        "retaken_gib": round((free_asleep - free_again) / 2**30, 2),
                                        "mem_fraction_static_gib": round(0.3 * total / 2**30, 2)}})
    assert free_asleep - free_awake > 0.2 * total  # most of the 30% SGLang held
    assert free_asleep - free_again > 0.2 * total
    assert [g.token_ids for g in again] == [g.token_ids for g in before]


def test_eval_and_rejection_generate_through_sglang(data, tmp_path):
    """`r1moe eval RECIPE` and `r1moe rejection RECIPE` with engine: sglang (the pipeline's eval / rejection stages)
    against the built-in engine on the same checkpoint, greedy: both generate every sample and score them alike.
    Rejection is compared by its shard counts (samples, filter verdicts), written whether or not a sample survives:
    this small base model may answer every question wrongly, and the stage then exits 2 (nothing to train on)."""
    from r1moe import cli

    ckpt = data / "base" / "final"
    sgl = "{cuda_graph_max_bs: 0, mem_fraction_static: 0.2, colocate: false}"
    out = {}
    for engine in ("builtin", "sglang"):
        extra = f"engine: {engine}\n" + (f"sglang: {sgl}\n" if engine == "sglang" else "")
        ev = tmp_path / f"eval_{engine}.yaml"
        ev.write_text(f"checkpoints: {{base: {ckpt}}}\ndata: {data / 'eval.jsonl'}\nsamples: 2\ntemperature: 0.0\n"
                      f"max_new_tokens: 32\n{extra}")
        assert cli.main(["eval", str(ev), "--out", str(tmp_path / f"ev_{engine}")]) == 0
        res = json.loads((tmp_path / f"ev_{engine}" / "results.json").read_text())["base"]
        rs = tmp_path / f"rs_{engine}.yaml"
        rs.write_text(f"checkpoint: {ckpt}\nprompts: {data / 'eval.jsonl'}\nsamples_per_prompt: 2\n"
                      f"temperature: 0.0\nmax_new_tokens: 32\n{extra}")
        rc = cli.main(["rejection", str(rs), "--out", str(tmp_path / f"rs_{engine}")])
        counts = [json.loads(p.read_text())
                  for p in sorted((tmp_path / f"rs_{engine}" / "shards").glob("shard_*.json"))]  # not spec.json
        passed = sum(c["passed_filters"] for c in counts)
        assert rc == (0 if passed else 2)
        out[engine] = {"pass@1": res["pass@1"], "format": res.get("format"), "rejection_rc": rc,
                       "samples": sum(c["samples"] for c in counts), "passed_filters": passed,
                       "incorrect": sum(c["rejected"]["incorrect"] for c in counts)}
    record("sglang_eval_rejection", out)
    assert out["sglang"]["samples"] == out["builtin"]["samples"] == 32
    # greedy bf16 vs fp32: a few answers may differ where two tokens are within bf16 noise of each other
    assert abs(out["sglang"]["pass@1"] - out["builtin"]["pass@1"]) <= 0.25
    assert abs(out["sglang"]["passed_filters"] - out["builtin"]["passed_filters"]) <= 8


def test_fp8_serving_is_the_fp8_rounded_policy(data, tmp_path, monkeypatch):
    """rollout.sglang.quantization=fp8 through the eval/rejection loader: SGLang starts with dummy FP8 weights and
    the checkpoint streams in, quantized to DeepSeek-V3's blockwise format on the way. Its log-probs of its own
    samples are compared with the fp32 reference model whose projections are the same FP8-rounded weights
    (SGLang also quantizes activations per token and 128 channels, so the tolerance is looser than bf16's), and
    with the unrounded model, for the record. Dimensions are multiples of 128 (SGLang's FP8 MoE needs them).
    SGLang's DeepGEMM kernels compile when first used instead of in its start-up sweep (measured on an H200: the
    sweep took over 2 minutes per shape, more than this test's whole budget)."""
    monkeypatch.setenv("SGLANG_JIT_DEEPGEMM_PRECOMPILE", "false")  # SGLang's scheduler processes inherit it
    from r1moe.config import SGLangSection
    from r1moe.data.tokenizer import load_tokenizer
    from r1moe.model import build_model, get_preset, save_pretrained
    from r1moe.model.hf_io import compute_fp8_dequant, compute_fp8_quant, fp8_quantized
    from r1moe.rollout import SamplingParams
    from r1moe.rollout.loader import load_checkpoint_engine

    tok = load_tokenizer(data / "base" / "final")
    cfg = get_preset("tiny-moe").replace(hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                                         q_lora_rank=128, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=64,
                                         v_head_dim=64, num_nextn_predict_layers=0, eos_token_id=2,
                                         vocab_size=tok.get_vocab_size())
    model = build_model(cfg, device="cuda", seed=3).eval()
    ckpt = save_pretrained(model, tmp_path / "ckpt", tokenizer=tok)
    engine, _ = load_checkpoint_engine(ckpt, "sglang", SGLangSection(quantization="fp8", colocate=False,
                                                                    cuda_graph_max_bs=0, mem_fraction_static=0.2),
                                       context_length=256)
    try:
        gens = engine.generate(_prompts(data, tok) * 2, SamplingParams(temperature=1.0, max_new_tokens=32, seed=1))
    finally:
        engine.shutdown()
    rounded = build_model(cfg, device="cuda", seed=3).eval()
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if fp8_quantized(name, cfg.num_hidden_layers):
                p.copy_(compute_fp8_dequant(*compute_fp8_quant(p.detach())))
    _, ref_fp8, b = _teacher_forced(rounded, gens, 1.0)
    _, ref_bf, _ = _teacher_forced(model, gens, 1.0)
    m = b.response_mask_NT
    d8, d = (b.rollout_logp_NT - ref_fp8).abs()[m], (b.rollout_logp_NT - ref_bf).abs()[m]
    record("sglang_engine", {"fp8_serving": {"tokens": int(m.sum()), "mean_abs_diff_vs_fp8_rounded_fp32": float(d8.mean()),
                                             "max_abs_diff_vs_fp8_rounded_fp32": float(d8.max()),
                                             "mean_abs_diff_vs_unrounded_fp32": float(d.mean())}})
    assert int(m.sum()) > 0 and float(d8.mean()) < 0.1


def _grpo(data, run, backend, steps=4, replay=False, nproc=1, extra=None, label=None):
    from r1moe.tracking import read_metrics

    over = _overrides(run, **{
        "model.init": data / "base" / "final", "data.train": data / "train.jsonl", "data.eval": data / "eval.jsonl",
        "train.steps": steps, "train.batch_size": 8, "rollout.group_size": 8, "rollout.max_new_tokens": 64,
        "algo.num_minibatches": 2, "optim.lr": 1e-4, "eval.samples": 2, "train.eval_every": 0,
        "checkpoint.every": 0, "parallel.backend": backend, "rollout.engine": "sglang",
        "rollout.sglang.mem_fraction_static": 0.3, "rollout.sglang.cuda_graph_max_bs": 0,
        "rewards.weights": "{accuracy: 1.0, format: 1.0}", "rollout.routing_replay": str(replay).lower(),
        **(extra or {})})
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = ([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-port=29549", "-m"]
           if backend == "megatron" else [sys.executable, "-m"]) + ["r1moe.train.grpo", GRPO_RECIPE, *over]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=540, check=False)
    steps_m = [m for m in read_metrics(run) if "reward/total" in m] if (run / "metrics.jsonl").exists() else []
    keys = ("reward/total", "train/grad_norm", "train/kl", "rollout/logprob_abs_diff", "perf/rollout_s",
            "perf/logprob_s", "perf/train_s", "perf/sync_s", "perf/step_s", "rollout/response_length",
            "perf/rollout_tokens_per_s", "perf/gpu_used_rollout_gib", "perf/gpu_used_train_gib",
            "perf/trainer_peak_train_gib")
    out = {"returncode": proc.returncode, "seconds": round(time.time() - t0, 1),
           "steps": [{k: m.get(k) for k in keys} for m in steps_m]}
    if proc.returncode:
        out["stderr_tail"] = proc.stderr[-3000:]
    record("sglang_grpo", {label or backend + ("_routing_replay" if replay else ""): out})
    return proc, steps_m


def _check_grpo(data, run, proc, steps):
    from r1moe.model import from_pretrained
    from r1moe.train.rundir import is_complete

    assert proc.returncode == 0, proc.stderr[-3000:]
    assert is_complete(run) and len(steps) == 4
    for m in steps:
        assert all(math.isfinite(m[k]) for k in ("train/pg_loss", "train/kl", "train/grad_norm"))
    # every rollout came from the current policy: SGLang's bf16 logprobs match the trainer's before each update
    # (the sync itself is checked exactly by test_weight_update_changes_generations_and_round_trips)
    assert all(m["rollout/logprob_abs_diff"] < 0.1 for m in steps), json.dumps(steps)
    if not any(m["train/grad_norm"] > 1e-3 for m in steps):
        pytest.fail(f"every group had equal rewards in every step (no policy gradient): {json.dumps(steps)}")
    base, final = from_pretrained(data / "base" / "final"), from_pretrained(run / "final")
    moved = max((a.to(torch.bfloat16).float() - b.to(torch.bfloat16).float()).abs().max().item()
                for a, b in zip(base.parameters(), final.parameters()))
    assert moved > 0


def test_grpo_reference_backend_with_sglang(data, tmp_path):
    proc, steps = _grpo(data, tmp_path / "ref", "reference")
    _check_grpo(data, tmp_path / "ref", proc, steps)


def _require_megatron() -> None:
    # checked in a child: SGLang (imported here) loads a cuDNN that TE's library then clashes with in this process;
    # the GRPO run itself imports megatron/TE first (check_backends), as any r1moe process with both does
    probe = subprocess.run([sys.executable, "-c", "import megatron.core, transformer_engine.pytorch"],
                           capture_output=True, text=True, check=False)
    if probe.returncode:
        pytest.skip(f"needs megatron-core and Transformer Engine ({probe.stderr.strip().splitlines()[-1][:200]})")


def test_grpo_megatron_backend_with_sglang(data, tmp_path):
    _require_megatron()
    proc, steps = _grpo(data, tmp_path / "mcore", "megatron", replay=True)
    _check_grpo(data, tmp_path / "mcore", proc, steps)


def test_grpo_megatron_tp2_with_sglang_tp2_colocated(data, tmp_path):
    """Two GPUs: the megatron policy at TP2 under torchrun and SGLang at tp=2 on the same two GPUs, weights from the
    sharded export every step (CUDA IPC into both SGLang ranks), SGLang's memory released while the policy trains.
    Records per step rollout / log-prob / train / sync time, GPU memory and rollout tokens/s (sglang_grpo.json)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs: the TP2 policy and SGLang tp=2 share both")
    _require_megatron()
    run = tmp_path / "tp2"
    proc, steps = _grpo(data, run, "megatron", nproc=2, label="megatron_tp2_sglang_tp2_colocated",
                        extra={"parallel.tp": 2, "rollout.sglang.tp": 2})
    _check_grpo(data, run, proc, steps)


def test_grpo_with_sglang_on_a_gpu_of_its_own(data, tmp_path):
    """Two GPUs: the trainer on GPU 0, SGLang on GPU 1 (rollout.sglang.base_gpu_id=1, colocate off); the weights go
    by NCCL broadcast every step (SGLang's update_weights_from_distributed), nothing is released."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs: the trainer on GPU 0, SGLang on GPU 1")
    run = tmp_path / "own_gpu"
    proc, steps = _grpo(data, run, "reference", label="reference_sglang_own_gpu_nccl",
                        extra={"rollout.sglang.base_gpu_id": 1, "rollout.sglang.colocate": "false"})
    _check_grpo(data, run, proc, steps)

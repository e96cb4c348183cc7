"""Rollout engines on one GPU, same DeepSeek-V3-architecture MoE weights (MLA, 32 experts top-4, ~1.7B params):
generated tokens/s of raw `sglang.Engine`, `SGLangEngine`, `BuiltinEngine` and `transformers` generate at batch
64 and 256 (prompt 32 tokens, 256 new); weight sync into SGLang (GB/s, 256 MB to 4 GB buckets) from the reference
model and from the megatron export; the engine/trainer logprob mismatch with and without MoE routing replay; one GRPO step split into
rollout / log-probs / train / sync with the built-in engine and with SGLang.

    PYTHONPATH=/root/sgl/site python benchmarks/rollout_engines.py --out benchmarks/results/rollout_engines_h200.json
    ... --only grpo --out grpo.json      # one part at a time where calls are time-limited

Goals (the SGLang issue): SGLangEngine >= 0.9x raw SGLang and >= 5x BuiltinEngine at batch 256; a GRPO step
>= 3x faster with SGLang than with the built-in engine; weight sync >= 20 GB/s colocated on one GPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from r1moe.model import build_model, get_preset, save_pretrained
from r1moe.model.config import count_params

BENCH_CFG = get_preset("tiny-moe").replace(
    vocab_size=32768, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=704, num_hidden_layers=24,
    num_attention_heads=16, num_key_value_heads=16, n_routed_experts=32, num_experts_per_tok=4, n_group=4,
    topk_group=2, q_lora_rank=384, kv_lora_rank=512, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64,
    max_position_embeddings=4096, num_nextn_predict_layers=0)
PROMPT, NEW = 32, 256


def _sync():
    torch.cuda.synchronize()


def _prompts(batch: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 500, (batch, PROMPT), generator=g).tolist()


def _timed(fn, repeat: int = 2) -> tuple[float, object]:
    fn()  # warm-up
    best, out = float("inf"), None
    for _ in range(repeat):
        _sync()
        t0 = time.perf_counter()
        out = fn()
        _sync()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_engines(ckpt: Path, tok, results: dict) -> None:
    from r1moe.config import SGLangSection
    from r1moe.model import from_pretrained
    from r1moe.rollout import BuiltinEngine, SamplingParams
    from r1moe.rollout.sglang_engine import SGLangEngine

    params = SamplingParams(temperature=1.0, max_new_tokens=NEW, seed=0)
    eng = SGLangEngine(ckpt, tok, eos_ids=[], settings=SGLangSection(mem_fraction_static=0.5, colocate=False),
                       context_length=PROMPT + NEW + 8)
    results["sglang_engine_start_s"] = round(eng.start_s, 1)
    for batch in (64, 256):
        prompts = _prompts(batch)
        sp = {"temperature": 1.0, "max_new_tokens": NEW, "ignore_eos": True}
        t_raw, outs = _timed(lambda prompts=prompts, sp=sp: eng.engine.generate(input_ids=prompts, sampling_params=sp,
                                                                             return_logprob=True))
        n_raw = sum(o["meta_info"]["completion_tokens"] for o in outs)
        t_ours, gens = _timed(lambda prompts=prompts: eng.generate(prompts, params))
        n_ours = sum(len(g.token_ids) for g in gens)
        results[f"batch{batch}"] = {"sglang_raw_tok_s": round(n_raw / t_raw), "sglang_engine_tok_s": round(n_ours / t_ours),
                                    "sglang_engine_over_raw": round((n_ours / t_ours) / (n_raw / t_raw), 3)}
    eng.shutdown()
    eng = None  # drop the engine (not `del`: the timing closures above name it)
    torch.cuda.empty_cache()
    model = from_pretrained(ckpt, device="cuda", dtype=torch.bfloat16).eval()
    builtin = BuiltinEngine(model, tok, eos_ids=[])
    for batch in (64, 256):
        prompts = _prompts(batch)
        t_b, gens = _timed(lambda prompts=prompts: builtin.generate(prompts, params), repeat=1)
        r = results[f"batch{batch}"]
        r["builtin_bf16_tok_s"] = round(sum(len(g.token_ids) for g in gens) / t_b)
        r["sglang_engine_over_builtin"] = round(r["sglang_engine_tok_s"] / r["builtin_bf16_tok_s"], 2)
    builtin = model = None  # free the GPU memory before the transformers measurement
    torch.cuda.empty_cache()
    results["batch64"]["transformers_generate_tok_s"] = _transformers(ckpt)


def bench_sync(ckpt: Path, tok, results: dict) -> None:
    """Weight sync into a colocated SGLang (CUDA IPC) at several bucket sizes, with the direct loader
    (rollout.sglang.weight_loader) and SGLang's own, from the reference model's bf16 state dict and from the megatron
    export; `pack_s`: the part spent packing buckets on our side (DirectPacker + pack_direct for the direct loader,
    SGLang's flattened format for its own)."""
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    from r1moe.config import SGLangSection
    from r1moe.model import from_pretrained
    from r1moe.rollout.sglang_engine import SGLangEngine
    from r1moe.rollout.sglang_weights import direct_buckets, pack_direct

    eng = SGLangEngine(ckpt, tok, eos_ids=[], settings=SGLangSection(mem_fraction_static=0.3, cuda_graph_max_bs=0,
                                                                   colocate=False),
                       context_length=PROMPT + NEW + 8)
    model = from_pretrained(ckpt, device="cuda", dtype=torch.bfloat16).eval()
    sd = model.state_dict()
    gb = sum(t.numel() * t.element_size() for t in sd.values()) / 1e9
    rows, direct, dev = {}, eng.direct, torch.device("cuda", torch.cuda.current_device())
    variants = (("direct", 256), ("direct", 1024), ("direct", 4096), ("sglang", 1024), ("sglang", 4096))
    for loader, mb in variants:
        eng.settings.weight_bucket_mb = mb
        eng.direct = direct if loader == "direct" else None
        t_sync, _ = _timed(lambda: eng.update_weights(sd.items()), repeat=3)

        def pack(mb=mb, loader=loader):
            """The packing alone, as update_weights does it for this loader, without the update calls."""
            if loader == "direct":
                for bucket, _, _ in direct_buckets(sd.items(), direct, eng.settings.dtype, mb << 20):
                    pack_direct(bucket, dev)
                return
            bucket, size = [], 0
            for name, t in sd.items():
                bucket.append((name, t))
                size += t.numel() * t.element_size()
                if size >= mb << 20:
                    FlattenedTensorBucket(named_tensors=bucket).get_flattened_tensor()
                    bucket, size = [], 0
            FlattenedTensorBucket(named_tensors=bucket).get_flattened_tensor()

        t_pack, _ = _timed(pack, repeat=3)
        rows[f"{loader}_loader_{mb}MB"] = {"seconds": round(t_sync, 4), "gb_per_s": round(gb / t_sync, 1),
                                           "pack_s": round(t_pack, 4)}
    eng.direct = direct
    # SGLang's own API, one IPC handle per tensor, no buckets: what SGLang's loader alone allows
    t_raw, _ = _timed(lambda: eng.engine.update_weights_from_tensor(list(sd.items()), flush_cache=True), repeat=3)
    results["weight_sync_reference"] = {"gb": round(gb, 3), "tensors": len(sd), "buckets": rows,
                                        "raw_sglang_tensor_list": {"seconds": round(t_raw, 4),
                                                                   "gb_per_s": round(gb / t_raw, 1)}}
    try:
        results["weight_sync_megatron_export"] = _megatron_sync(model, eng)
    except (ImportError, OSError, RuntimeError) as e:
        results["weight_sync_megatron_export"] = f"not measured: {type(e).__name__}: {str(e)[:300]}"
    eng.shutdown()
    eng = model = None
    torch.cuda.empty_cache()


def bench_sync_parts(ckpt: Path, tok, results: dict) -> None:
    """Where a direct-loader sync's time goes (one 4 GB bucket, best of 5 each): the whole sync; our packing alone
    (DirectPacker + pack_direct); an update call carrying nothing (a 256-byte bucket; the same with a bucket as large
    as the model's, which SGLang maps by CUDA IPC); one carrying only the kv_b_proj weights (SGLang's MLA
    post-processing); a cache flush."""
    import json as json_

    from r1moe.config import SGLangSection
    from r1moe.model import from_pretrained
    from r1moe.rollout.sglang_engine import SGLangEngine
    from r1moe.rollout.sglang_weights import DIRECT_LOADER, direct_buckets, pack_direct

    eng = SGLangEngine(ckpt, tok, eos_ids=[], settings=SGLangSection(mem_fraction_static=0.3, cuda_graph_max_bs=0,
                                                                   colocate=False, weight_bucket_mb=4096),
                       context_length=PROMPT + NEW + 8)
    model = from_pretrained(ckpt, device="cuda", dtype=torch.bfloat16).eval()
    sd = model.state_dict()
    gb = sum(t.numel() * t.element_size() for t in sd.values()) / 1e9
    dev = torch.device("cuda", torch.cuda.current_device())

    def packed(names=None):
        (bucket, _, _), = direct_buckets(sd.items(), eng.direct, eng.settings.dtype, float("inf"))
        return [p for p in bucket if names is None or p.name in names]

    def call(spec, flat):
        spec.update(first=False, final=False)
        assert eng.engine.update_weights_from_tensor([(json_.dumps(spec), flat)], load_format=DIRECT_LOADER,
                                                     flush_cache=False)[0]

    kv_b = {n for n in sd if n.endswith("kv_b_proj.weight")}
    big = torch.empty(int(gb * 1e9), dtype=torch.uint8, device=dev)
    parts = {"whole_sync": lambda: eng.update_weights(sd.items()),
             "pack": lambda: pack_direct(packed(), dev),
             "call_empty_small": lambda: call({"tensors": []}, torch.empty(256, dtype=torch.uint8, device=dev)),
             "call_empty_model_size": lambda: call({"tensors": []}, big),
             "call_kv_b_only": lambda: call(*pack_direct(packed(kv_b), dev)),
             "flush_cache": lambda: eng.engine.flush_cache()}
    rows = {}
    for name, fn in parts.items():
        t, _ = _timed(fn, repeat=5)
        rows[name] = round(t, 4)
    rows["whole_sync_gb_per_s"] = round(gb / rows["whole_sync"], 1)
    results["weight_sync_parts"] = {"gb": round(gb, 3), "tensors": len(sd), "seconds": rows}
    eng.shutdown()
    eng = model = big = None
    torch.cuda.empty_cache()


def _megatron_sync(model, eng) -> dict:
    from r1moe.parallel import (
        MegatronOptions,
        ParallelConfig,
        build_mcore_model,
        export_hf_weights,
        initialize_parallel,
    )

    pcfg = ParallelConfig()
    initialize_parallel(pcfg, seed=0)
    sd = model.state_dict()
    models = build_mcore_model(model.cfg, pcfg, MegatronOptions(), hf_weights=sd.__getitem__)
    gb = sum(t_.numel() * t_.element_size() for t_ in sd.values()) / 1e9
    rows, direct = {}, eng.direct
    for loader, mb in (("direct", 1024), ("sglang", 1024)):
        eng.settings.weight_bucket_mb = mb
        eng.direct = direct if loader == "direct" else None

        def sync():
            eng.update_weights(itertools.chain.from_iterable(export_hf_weights(models, model.cfg, pcfg)))

        def export():
            for bucket in export_hf_weights(models, model.cfg, pcfg):
                for _ in bucket:
                    pass

        t, _ = _timed(sync, repeat=3)
        t_export, _ = _timed(export, repeat=3)
        rows[f"{loader}_loader_{mb}MB"] = {"seconds": round(t, 4), "gb_per_s": round(gb / t, 1),
                                           "export_s": round(t_export, 4)}
    eng.direct = direct
    return {"gb": round(gb, 3), "buckets": rows}


def _transformers(ckpt: Path) -> float | str:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        return f"not measured: {e}"
    m = AutoModelForCausalLM.from_pretrained(ckpt, torch_dtype=torch.bfloat16).cuda().eval()
    ids = torch.tensor(_prompts(64), device="cuda")
    new = 64  # fewer new tokens: transformers' generate is ~50x slower here

    def go():
        with torch.no_grad():
            return m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                              do_sample=True, temperature=1.0, top_k=0, pad_token_id=0)

    t, out = _timed(go, repeat=1)
    return round((out.shape[1] - PROMPT) * 64 / t)


def bench_replay(ckpt: Path, tok, results: dict) -> None:
    """SGLang's sampled tokens (T = 1, 64 x 128) teacher-forced through the bf16 reference model, routing freely
    and replaying SGLang's experts: mean/max |logprob difference| and how many token-layer routes agree."""
    from r1moe.config import SGLangSection
    from r1moe.model import from_pretrained
    from r1moe.rollout import SamplingParams
    from r1moe.rollout.sglang_engine import SGLangEngine
    from r1moe.train.policy import build_rl_batch, sequence_logprobs

    eng = SGLangEngine(ckpt, tok, eos_ids=[], settings=SGLangSection(mem_fraction_static=0.3, cuda_graph_max_bs=0,
                                                                   colocate=False),
                       context_length=PROMPT + 136, routing_model=BENCH_CFG)
    gens = eng.generate(_prompts(64, seed=1), SamplingParams(temperature=1.0, max_new_tokens=128, seed=0))
    eng.shutdown()
    model = from_pretrained(ckpt, device="cuda", dtype=torch.bfloat16).eval()
    out = {}
    for mb in range(0, 64, 16):
        b = build_rl_batch(gens[mb:mb + 16], 0, torch.device("cuda"))
        with torch.no_grad():
            replay = sequence_logprobs(model, b)[0]
            own = model(b.input_ids_NT, return_routes=True)
            free = own.logits.float().log_softmax(-1).gather(-1, b.targets_NT[..., None]).squeeze(-1)
        m = b.response_mask_NT
        same = (own.routed_experts.sort(-1).values == b.routes_NTMK.sort(-1).values).all(-1)[b.attention_mask_NT.bool()]
        for k, v in (("replay", (b.rollout_logp_NT - replay).abs()[m]), ("free", (b.rollout_logp_NT - free).abs()[m]),
                     ("same", same.float())):
            out.setdefault(k, []).append(v)
    d_r, d_f, same = (torch.cat(out[k]) for k in ("replay", "free", "same"))
    results["routing_replay_bf16"] = {
        "tokens": int(d_r.numel()), "token_layer_routes_equal": round(float(same.mean()), 4),
        "mean_abs_diff_without_replay": round(float(d_f.mean()), 4), "max_abs_diff_without_replay": round(float(d_f.max()), 3),
        "mean_abs_diff_with_replay": round(float(d_r.mean()), 4), "max_abs_diff_with_replay": round(float(d_r.max()), 3)}
    del model
    torch.cuda.empty_cache()


def bench_grpo(ckpt: Path, root: Path, results: dict, engines: list[str], log_dir: Path) -> None:
    """3 GRPO steps of 32 questions x 8 (256 sequences, up to 256 new tokens) per engine, reference backend bf16.
    Each run's whole output goes to log_dir/grpo_ENGINE.log (SGLang's processes print their tracebacks there)."""
    from r1moe.data import make_dataset, write_jsonl

    write_jsonl(root / "train.jsonl", make_dataset("arithmetic", 256, seed=0))
    for engine in engines:
        run = root / f"grpo_{engine}"
        over = {"model.init": ckpt, "model.dtype": "bfloat16", "data.train": root / "train.jsonl",
                "data.eval": "null", "train.steps": 3, "train.batch_size": 32, "rollout.group_size": 8,
                "rollout.max_new_tokens": NEW, "rollout.stop": "[]", "algo.num_minibatches": 2,
                "train.micro_batch_size": 16, "checkpoint.every": 0, "logging.run_dir": run, "logging.wandb": "disabled",
                "logging.plots": "false", "rollout.engine": engine}
        if engine == "sglang":
            over["rollout.sglang.mem_fraction_static"] = 0.4
        cmd = [sys.executable, "-m", "r1moe.train.grpo", "recipes/tiny/r1_zero/grpo.yaml",
               *[f"{k}={v}" for k, v in over.items()]]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], check=False)
        (log_dir / f"grpo_{engine}.log").write_text(p.stdout + p.stderr)
        if p.returncode:
            results[f"grpo_{engine}"] = {"error": p.stderr[-2000:], "log": str(log_dir / f"grpo_{engine}.log")}
            continue
        from r1moe.tracking import read_metrics

        steps = [m for m in read_metrics(run) if "perf/step_s" in m][1:]  # step 1 includes warm-up
        keys = ("perf/rollout_s", "perf/logprob_s", "perf/train_s", "perf/sync_s", "perf/step_s",
                "rollout/response_length")
        results[f"grpo_{engine}"] = {k: round(sum(m[k] for m in steps) / len(steps), 3) for k in keys}
    if "perf/step_s" in results.get("grpo_builtin", {}) and "perf/step_s" in results.get("grpo_sglang", {}):
        results["grpo_step_speedup_sglang_over_builtin"] = round(
            results["grpo_builtin"]["perf/step_s"] / results["grpo_sglang"]["perf/step_s"], 2)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", nargs="+", choices=["engines", "sync", "sync-parts", "replay", "grpo"],
                    default=["engines", "sync", "replay", "grpo"],
                    help="parts to run (on an H200, engines + replay took under 7 min, sync + grpo 6.6 min)")
    ap.add_argument("--grpo-engines", nargs="+", choices=["builtin", "sglang"], default=["builtin", "sglang"])
    a = ap.parse_args()
    from r1moe.data.tokenizer import build_tiny_tokenizer, default_corpus

    results: dict = {"device": torch.cuda.get_device_name(0), "model": count_params(BENCH_CFG),
                     "prompt_tokens": PROMPT, "new_tokens": NEW}
    root = Path(tempfile.mkdtemp())
    tok = build_tiny_tokenizer(default_corpus(100), 512)
    ckpt = save_pretrained(build_model(BENCH_CFG.replace(eos_token_id=2), device="cuda", dtype=torch.bfloat16, seed=0),
                           root / "ckpt", tokenizer=tok)
    parts = {"engines": lambda: bench_engines(ckpt, tok, results), "sync": lambda: bench_sync(ckpt, tok, results),
             "sync-parts": lambda: bench_sync_parts(ckpt, tok, results),
             "replay": lambda: bench_replay(ckpt, tok, results),
             "grpo": lambda: bench_grpo(ckpt, root, results, a.grpo_engines, Path(a.out).resolve().parent)}
    for name, fn in ((n, parts[n]) for n in a.only):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 -- record what broke and keep the other measurements
            results[f"{name}_error"] = f"{type(e).__name__}: {e}"[:2000]
        Path(a.out).write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""P2: FP8 (blockwise, DeepSeek-V3 style: 1x128 activation / 128x128 weight scales) vs bf16 training step at
hidden 4096, same shape family as P1, same GPU, one run.

Shape: 4 layers, hidden 4096, 32 heads, MLA (q_lora 1536, kv_lora 512, qk 128+64, v 128), 32 routed experts
top-4, moe_ffn 1024, 1 shared expert, vocab 32768, seq 2048, micro-batch 8, 4 micro-batches per step (gradient
accumulation amortises the optimizer as in real training). The two models cannot share the GPU (optimizer state),
so bf16 is timed first, freed, then FP8; both through r1moe.parallel.train_step. Reported: median step time,
tokens/s, ratio, plus the loss of the first step of each (same init seed: a sanity check, not a parity test).

    python benchmarks/p2_fp8_blockwise.py --out /tmp/p2.json [--recipe blockwise]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from p1_train_step import P1_CFG, PEAK_BF16, compare, device_info, make_batches, model_flops_per_token, r1moe_step_fn

P2_CFG = P1_CFG.replace(hidden_size=4096, num_attention_heads=32, q_lora_rank=1536, num_hidden_layers=4,
                        intermediate_size=16384)


def run(fp8: str | None, batches, rounds: int) -> dict:
    from r1moe.parallel import MegatronOptions, ParallelConfig, build_mcore_model, build_optimizer

    torch.manual_seed(0)
    models = build_mcore_model(P2_CFG, ParallelConfig(), MegatronOptions(fp8=fp8))
    opt = build_optimizer(models, lr=1e-5)
    step = r1moe_step_fn(models, opt, batches, P2_CFG)
    first = step()
    times = compare({"s": step}, warmup=2, rounds=rounds, per_round=3)["s"]
    peak = torch.cuda.max_memory_allocated() / 2**30
    del models, opt, step
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return {"first_step_loss": first, "median_step_s": statistics.median(times), "min_step_s": min(times),
            "steps_timed": len(times), "peak_memory_gib": peak}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--recipe", default="blockwise", choices=["blockwise", "tensorwise", "delayed"])
    ap.add_argument("--mbs", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    from r1moe.parallel import ParallelConfig, initialize_parallel

    initialize_parallel(ParallelConfig(), seed=0)
    batches = make_batches(P2_CFG, args.microbatches, args.mbs, args.seq)
    tokens = args.mbs * args.seq * args.microbatches
    flops = model_flops_per_token(P2_CFG, args.seq) * tokens
    res = {"benchmark": f"P2 FP8 {args.recipe} vs bf16 train step", "device": device_info(),
           "shape": {"layers": 4, "hidden": 4096, "heads": 32, "q_lora": 1536, "kv_lora": 512, "qk": "128+64",
                     "v": 128, "experts": 32, "topk": 4, "moe_ffn": 1024, "shared": 1024, "vocab": 32768,
                     "seq": args.seq, "micro_batch": args.mbs, "microbatches": args.microbatches},
           "model_tflop_per_step": flops / 1e12}
    for name, fp8 in (("bf16", None), (f"fp8_{args.recipe}", args.recipe)):
        r = run(fp8, batches, args.rounds)
        r["tokens_per_s"] = tokens / r["median_step_s"]
        r["mfu_vs_bf16_peak"] = flops / r["median_step_s"] / PEAK_BF16
        res[name] = r
        print(name, json.dumps(r), flush=True)
    res["speedup_fp8_over_bf16"] = res["bf16"]["median_step_s"] / res[f"fp8_{args.recipe}"]["median_step_s"]
    res["goal"] = ">= 1.2"
    res["goal_met"] = res["speedup_fp8_over_bf16"] >= 1.2
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print("speedup", res["speedup_fp8_over_bf16"])


if __name__ == "__main__":
    main()

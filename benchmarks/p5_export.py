"""P5: weight export to HF-named buckets (r1moe.parallel.export_hf_weights), GB/s, on the P1 model.

Two numbers per layout, each the median of 3 full passes (bucket 1 GiB):
  export        iterate every bucket (TP/EP all-gathers and PP broadcasts included; on one GPU the tensors are
                views of the parameters, so this is the iterator's own overhead)
  export+load   the same, plus copying every tensor into a separate bf16 r1moe.model CausalLM on the GPU with
                load_hf_tensor: what the built-in rollout engine's update_weights does. Goal: >= 50 GB/s.
GB/s = HF bytes delivered to this rank / seconds (every rank receives the whole model).

    python benchmarks/p5_export.py --out /tmp/p5.json                                 # 1 GPU
    torchrun --nproc-per-node 2 benchmarks/p5_export.py --tp 2 --ep 2 --etp 1 --out /tmp/p5_2gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from p1_train_step import P1_CFG, device_info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--etp", type=int, default=None)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--bucket-mib", type=int, default=1024)
    args = ap.parse_args()

    import torch.distributed as dist

    from r1moe.model import build_model, load_hf_tensor
    from r1moe.parallel import (
        MegatronOptions,
        ParallelConfig,
        build_mcore_model,
        export_hf_weights,
        initialize_parallel,
    )

    pcfg = ParallelConfig(tp=args.tp, ep=args.ep, etp=args.etp, pp=args.pp)
    initialize_parallel(pcfg, seed=0)
    cfg = P1_CFG
    models = build_mcore_model(cfg, pcfg, MegatronOptions(), wrap_ddp=False)
    target = build_model(cfg, device="cuda", dtype=torch.bfloat16)
    bucket = args.bucket_mib << 20

    def one_pass(load: bool) -> tuple[float, int, int]:
        dist.barrier()
        torch.cuda.synchronize()
        t = time.perf_counter()
        nbytes = ntensors = 0
        for b in export_hf_weights(models, cfg, pcfg, bucket_bytes=bucket):
            for name, x in b:
                nbytes += x.numel() * x.element_size()
                ntensors += 1
                if load:
                    load_hf_tensor(target, name, x)
        torch.cuda.synchronize()
        return time.perf_counter() - t, nbytes, ntensors

    one_pass(True)  # warm-up (allocator, NCCL)
    res = {"benchmark": "P5 weight export to HF-named buckets", "device": device_info(),
           "layout": {"tp": pcfg.tp, "ep": pcfg.ep, "etp": pcfg.expert_tp, "pp": pcfg.pp,
                      "world": dist.get_world_size()},
           "model": "P1 shape (8 layers, hidden 2048, 32 experts, vocab 32768), bf16", "bucket_mib": args.bucket_mib}
    for name, load in (("export", False), ("export_and_load", True)):
        runs = [one_pass(load) for _ in range(3)]
        sec = statistics.median(r[0] for r in runs)
        res[name] = {"median_s": sec, "bytes": runs[0][1], "tensors": runs[0][2], "gb_per_s": runs[0][1] / sec / 1e9}
    res["goal"] = ">= 50 GB/s (export_and_load, 1 GPU)"
    res["goal_met"] = res["export_and_load"]["gb_per_s"] >= 50
    # correctness spot check: the loaded reference model holds exactly what was exported last
    sd = target.state_dict()
    res["spot_check_equal"] = all(torch.equal(sd[n], x) for b in export_hf_weights(models, cfg, pcfg, bucket)
                                  for n, x in b[:3])
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        print(json.dumps({k: res[k] for k in ("layout", "export", "export_and_load")}, indent=1))
    from r1moe.parallel import destroy_parallel

    destroy_parallel()


if __name__ == "__main__":
    main()

"""torchrun worker for tests/gpu/test_megatron_multi_gpu.py: the same model, weights and global batch under
several TP/EP/PP layouts in one process group (megatron's parallel_state is rebuilt per layout, as megatron's
own unit tests do). Rank 0 writes one JSON record per layout.

    torchrun --nproc-per-node 2 tests/gpu/layout_worker.py --layouts tp2,ep2,pp2,tp2ep2 --out /tmp/layouts.json

Global batch: 4 sequences of 64 tokens. Each data-parallel replica takes its share and splits it into
micro-batches of 2; the loss is the token mean (compute_sft_loss with the replica's token count, averaged
over replicas), so every layout computes the same number as one GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from _gpu_common import PARITY_CONFIGS, Batch, hf_weights, lm_batches

LAYOUTS = {
    "tp1": {}, "tp2": {"tp": 2}, "ep2": {"ep": 2}, "pp2": {"pp": 2}, "tp2ep2": {"tp": 2, "ep": 2, "etp": 1},
    "tp2pp2": {"tp": 2, "pp": 2}, "ep4": {"ep": 4}, "tp2ep2pp2": {"tp": 2, "ep": 2, "etp": 1, "pp": 2},
    "tp4ep4": {"tp": 4, "ep": 4, "etp": 1},
}
CFG = PARITY_CONFIGS["moe-grouped"]


def _global_scalar(value: float | None) -> float:
    """A value known on the last pipeline stage -> the data-parallel mean, on every rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    t = torch.tensor([0.0 if value is None else value], device="cuda", dtype=torch.float64)
    pp_group = ps.get_pipeline_model_parallel_group()
    dist.broadcast(t, src=dist.get_process_group_ranks(pp_group)[-1], group=pp_group)
    dist.all_reduce(t, group=ps.get_data_parallel_group())
    return t.item() / ps.get_data_parallel_world_size()


def run_layout(name: str, ckpt_save: str | None, ckpt_load: str | None) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from r1moe.algorithms import compute_sft_loss
    from r1moe.parallel import (
        MegatronOptions,
        ParallelConfig,
        build_mcore_model,
        build_optimizer,
        export_hf_weights,
        forward_only,
        initialize_parallel,
        load_dist_checkpoint,
        save_dist_checkpoint,
        train_step,
    )

    t0 = time.time()
    pcfg = ParallelConfig(**LAYOUTS[name])
    initialize_parallel(pcfg, seed=0)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    hf = hf_weights(CFG, seed=11)
    (full,) = lm_batches(CFG.vocab_size, num=1, batch=4, seq=64, seed=12)
    per = 4 // dp
    mine = slice(dp_rank * per, (dp_rank + 1) * per)
    mbs = [Batch(full.input_ids[mine][i:i + 2], full.targets[mine][i:i + 2], full.mask[mine][i:i + 2])
           for i in range(0, per, 2)]
    den = sum(int(b.mask.sum()) for b in mbs)

    def sft(logits, mb):
        return compute_sft_loss(logits, mb.targets, mb.mask, loss_denominator=den)

    def loss_of(models) -> float:
        outs = forward_only(models, mbs, sft, CFG.vocab_size)
        return _global_scalar(None if outs is None else float(sum(outs)))

    models = build_mcore_model(CFG, pcfg, MegatronOptions(), hf_weights=hf.__getitem__)
    opt = build_optimizer(models, lr=1e-3)
    mismatches = 0
    for bucket in export_hf_weights(models, CFG, pcfg, bucket_bytes=1 << 20):
        mismatches += sum(not torch.equal(t.cpu(), hf[n]) for n, t in bucket)
    rec = {"layout": name, "world": dist.get_world_size(), "dp": dp, "export_mismatches_vs_hf": mismatches,
               "loss_before": loss_of(models)}
    r = train_step(models, opt, mbs, lambda lg, mb: (sft(lg, mb), {}), CFG.vocab_size)
    rec.update(step_loss=r.metrics["loss"], grad_norm=r.grad_norm, loss_after=loss_of(models))
    if ckpt_save:
        save_dist_checkpoint(models, opt, ckpt_save, step=1)
    if ckpt_load:
        # "dir" loads model + optimizer; "dir@model" the model only (megatron's ChainedOptimizer has one
        # optimizer when ep == 1 and two (dense, expert) when ep > 1, so optimizer state moves only between
        # layouts of the same kind; model weights re-shard freely)
        path, _, what = ckpt_load.partition("@")
        fresh = build_mcore_model(CFG, pcfg, MegatronOptions())
        fresh_opt = None if what == "model" else build_optimizer(fresh, lr=1e-3)
        load_dist_checkpoint(fresh, fresh_opt, path)
        rec["loaded_loss"] = loss_of(fresh)
        rec["loaded_optimizer"] = fresh_opt is not None
        if fresh_opt is not None:  # the restored optimizer steps like the saved one would
            r2 = train_step(fresh, fresh_opt, mbs, lambda lg, mb: (sft(lg, mb), {}), CFG.vocab_size)
            rec["loaded_step_loss"] = r2.metrics["loss"]
            rec["loaded_loss_after_step"] = loss_of(fresh)
        del fresh, fresh_opt
    rec["seconds"] = round(time.time() - t0, 1)
    del models, opt
    gc.collect()
    torch.cuda.empty_cache()
    return rec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--save-ckpt", default=None, help="layout:dir, save after that layout's step")
    ap.add_argument("--load-ckpt", default=None,
                    help="layout:dir[@model],..., load into that layout (model only with @model) and score")
    args = ap.parse_args()
    save = dict([args.save_ckpt.split(":", 1)]) if args.save_ckpt else {}
    load = dict(x.split(":", 1) for x in args.load_ckpt.split(",")) if args.load_ckpt else {}
    records = []
    for name in args.layouts.split(","):
        failed = None
        try:
            records.append(run_layout(name, save.get(name), load.get(name)))
        except Exception as e:  # noqa: BLE001 -- record it; with one process keep going, with several the group is unusable
            import traceback

            failed = e
            records.append({"layout": name, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]})
        if int(os.environ.get("RANK", "0")) == 0:
            with open(args.out, "w") as f:
                json.dump(records, f, indent=1)
            print(json.dumps(records[-1])[:600], flush=True)
        if failed is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise failed
    from r1moe.parallel import destroy_parallel

    destroy_parallel()


if __name__ == "__main__":
    main()

"""torchrun worker for tests/train/test_rm_scoring.py (gloo, CPU) and tests/gpu/test_megatron_rm.py (nccl, one GPU
per rank): every rank loads the same reward model (load_reward_model: on the GPU of its LOCAL_RANK with nccl), joins
the process group and calls rm.score_shared on the same sequences; rank 0 writes each rank's scores and the rows of
each of its forwards to OUT.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/train/rm_shard_worker.py RM SEQS.json OUT \
        [gloo|nccl]
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from r1moe.train.rm import load_reward_model, score_shared


def main(rm_dir: str, seqs_file: str, out: str, backend: str = "gloo") -> None:
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend)
    rm, _, _ = load_reward_model(rm_dir, device="cpu" if backend == "gloo" else "auto")
    forwards = []
    rm.register_forward_hook(lambda module, args, output: forwards.append(args[0].shape[0]))
    scores = score_shared(rm, json.loads(Path(seqs_file).read_text()), pad_id=0, batch=4)
    records = [None] * dist.get_world_size()
    dist.all_gather_object(records, {"scores": scores.tolist(), "forward_rows": forwards,
                                     "device": str(rm.score_head.weight.device)})
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(records))
    dist.barrier()
    dist.destroy_process_group()
    # seen on torch 2.13 (CPU, gloo): now and then a rank aborts at interpreter exit ("terminate called without an
    # active exception", a joinable thread destroyed in teardown) after its work is done; skip that teardown
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(*sys.argv[1:5])

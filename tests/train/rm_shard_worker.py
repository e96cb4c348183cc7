"""torchrun worker for tests/train/test_rm_scoring.py: every rank loads the same reward model on the CPU, joins a
gloo process group and calls rm.score_shared on the same sequences; rank 0 writes each rank's scores and its number
of forwards to OUT.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/train/rm_shard_worker.py RM SEQS.json OUT
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from r1moe.train.rm import load_reward_model, score_shared


def main(rm_dir: str, seqs_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rm, _, _ = load_reward_model(rm_dir, device="cpu")
    forwards = []
    rm.register_forward_hook(lambda module, args, output: forwards.append(args[0].shape[0]))
    scores = score_shared(rm, json.loads(Path(seqs_file).read_text()), pad_id=0, batch=4)
    records = [None] * dist.get_world_size()
    dist.all_gather_object(records, {"scores": scores.tolist(), "forward_rows": forwards})
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(records))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])

"""HF checkpoint (DeepSeek-V3 incl. its FP8 128x128 weights, Qwen2, Llama) -> megatron shard files for a chosen
TP/PP/EP layout, streaming: one output shard in memory at a time, HF tensors read memory-mapped.

    python tools/convert_hf_to_mcore.py --hf /ckpt/DeepSeek-V3 --out /ckpt/v3-mcore --tp 8 --pp 16 --ep 64 --etp 1

The name mapping is parallel/mapping.py's table (no string edits here); the output layout is described in
parallel/mcore_files.py and loads with r1moe.parallel.mcore_files.load_mcore_files (or tools/convert_mcore_to_hf.py
turns it back into HF safetensors, bit-exact for bf16 inputs).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from r1moe.model import ModelConfig
from r1moe.model.hf_io import HFReader
from r1moe.parallel import ParallelConfig
from r1moe.parallel.mcore_files import write_mcore_files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", required=True, help="HF checkpoint directory (config.json + safetensors)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--etp", type=int, default=None, help="expert tensor parallel size (default: = tp)")
    ap.add_argument("--pp-layers", type=str, default=None, help="explicit layers per stage, e.g. 13,16,16,16")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                    help="dtype of de-quantized FP8 weights and of floating tensors (default bf16)")
    args = ap.parse_args(argv)

    reader = HFReader(args.hf, dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    cfg = ModelConfig.from_hf_dict(reader.config(), source=f"{args.hf}/config.json")
    pcfg = ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp,
                          pp_layers=tuple(int(x) for x in args.pp_layers.split(",")) if args.pp_layers else None)
    t0 = time.time()
    files = write_mcore_files(cfg, pcfg, reader.__getitem__, args.out, log=lambda s: print(s, flush=True))
    print(f"{len(files)} shard files in {time.time() - t0:.1f}s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

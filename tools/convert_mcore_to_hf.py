"""Megatron shard files (tools/convert_hf_to_mcore.py's output, any TP/PP/EP layout) -> HF safetensors, streaming:
shard files are memory-mapped and the HF output is flushed every --max-shard-gb.

    python tools/convert_mcore_to_hf.py --mcore /ckpt/v3-mcore --out /ckpt/v3-hf

A training run's megatron dist checkpoint is exported to HF from the GPUs instead
(r1moe.parallel.export_hf_weights streams the same names).
"""

from __future__ import annotations

import argparse
import sys
import time

from r1moe.parallel.mcore_files import convert_mcore_files_to_hf


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mcore", required=True, help="directory written by convert_hf_to_mcore.py")
    ap.add_argument("--out", required=True, help="output HF directory")
    ap.add_argument("--max-shard-gb", type=float, default=5.0)
    args = ap.parse_args(argv)
    t0 = time.time()
    n = convert_mcore_files_to_hf(args.mcore, args.out, int(args.max_shard_gb * (1 << 30)),
                                  log=lambda s: print(s, flush=True))
    print(f"{n / 1e9:.3f} GB in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The indexed-data loader (r1moe/data/loader.py) against the training step it feeds, on CPU, in one run.

A synthetic corpus of random token documents (lengths uniform in [32, 2*mean], ids below the tiny-moe preset's
512, stored as uint16 as for any vocabulary under 65,500) is written with r1moe.data.indexed.IndexedWriter, then blocks alternate (loader, step, loader, step, ...):
  loader  IndexedRows(...).batches(): plan, memory-mapped reads, packing with pack_examples, tensors; tokens/s =
          batch_size x seq_len per batch
  step    one reference-backend training step of the tiny-moe preset (forward, masked CE, backward, AdamW) on
          batches of the same shape
The ratio loader tokens/s / step tokens/s says how many trainer processes one loader process keeps fed. The loader
is also timed at seq_len 4,096 (the shape real-scale SFT packs to), the plan and the preprocessing tool (JSONL ->
.bin/.idx, tiny tokenizer) once each.

    python benchmarks/indexed_loader.py --out benchmarks/results/indexed_loader_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def write_corpus(prefix: Path, num_docs: int, mean_len: int, vocab: int, seed: int) -> int:
    from r1moe.data.indexed import IndexedMeta, IndexedWriter

    rng = np.random.default_rng(seed)
    tokens = 0
    with IndexedWriter(prefix, np.uint16, IndexedMeta("all", vocab, 2, 1)) as w:
        for n in rng.integers(32, 2 * mean_len, size=num_docs):
            w.add_document([rng.integers(3, vocab, size=int(n))])
            tokens += int(n)
    return tokens


def time_loader(rows, batch_size: int, num_batches: int, start_step: int) -> float:
    it = rows.batches(batch_size, seed=0, start_step=start_step)
    t0 = time.perf_counter()
    for _ in range(num_batches):
        next(it)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--docs", type=int, default=20000)
    p.add_argument("--mean-len", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--blocks", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    from r1moe.algorithms import compute_sft_loss
    from r1moe.data.loader import IndexedRows
    from r1moe.model import build_model, get_preset
    from r1moe.train.packing import IGNORE

    torch.set_num_threads(a.threads)
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "corpus"
        t0 = time.perf_counter()
        cfg = get_preset("tiny-moe")
        cfg.max_position_embeddings = max(cfg.max_position_embeddings, a.seq_len)
        corpus_tokens = write_corpus(prefix, a.docs, a.mean_len, cfg.vocab_size, seed=0)
        write_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        rows = IndexedRows([(prefix, 1.0)], a.seq_len, pad_id=0, vocab_size=cfg.vocab_size)
        plan_s = time.perf_counter() - t0
        rows_4k = IndexedRows([(prefix, 1.0)], 4096, pad_id=0, vocab_size=cfg.vocab_size)

        model = build_model(cfg, seed=0).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        batch = next(rows.batches(a.batch_size, seed=0))

        def step() -> float:
            t = time.perf_counter()
            out = model(batch.input_ids_RT, segment_ids=batch.segment_ids_RT)
            mask = batch.targets_RT != IGNORE
            loss = compute_sft_loss(out.logits, batch.targets_RT.clamp(min=0), mask) + out.aux_loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return time.perf_counter() - t

        step()  # warm-up
        time_loader(rows, a.batch_size, 2, 0)
        loader_s, step_s, loader4k_s = [], [], []
        n_load = 20
        for b in range(a.blocks):
            loader_s.append(time_loader(rows, a.batch_size, n_load, start_step=b * n_load) / n_load)
            step_s.append(step())
            loader4k_s.append(time_loader(rows_4k, a.batch_size, 5, start_step=b * 5) / 5)
        tok_per_batch = a.batch_size * a.seq_len
        loader_tps = tok_per_batch / statistics.median(loader_s)
        step_tps = tok_per_batch / statistics.median(step_s)

        # the preprocessing tool on text (JSONL -> .bin/.idx), tiny tokenizer
        from r1moe.data.tokenizer import build_tiny_tokenizer, save_tokenizer

        words = [f"w{i}" for i in range(2000)]
        rng = np.random.default_rng(1)
        texts = [" ".join(rng.choice(words, size=int(n))) for n in rng.integers(50, 400, size=5000)]
        save_tokenizer(build_tiny_tokenizer(texts[:500], 4000), Path(tmp) / "tok")
        (Path(tmp) / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        r = subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--kind", "pretrain", "--input",
                            str(Path(tmp) / "c.jsonl"), "--tokenizer", str(Path(tmp) / "tok"), "--output-prefix",
                            str(Path(tmp) / "text")], capture_output=True, text=True, check=True)
        pre = json.loads(r.stdout)
        pre.pop("output_prefix")

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    result = {
        "device": f"2-core CPU ({cpu}, {os.cpu_count()} cores visible, shared with other jobs)",
        "load_average_1m_before_after": [load_before[0], os.getloadavg()[0]],
        "torch_threads": a.threads, "torch": torch.__version__, "python": platform.python_version(),
        "corpus": {"documents": a.docs, "tokens": corpus_tokens, "mean_doc_tokens": corpus_tokens / a.docs,
                   "write_s": write_s, "write_tokens_per_s": corpus_tokens / write_s},
        "plan": {"rows": rows.num_rows, "seq_len": a.seq_len, "seconds": plan_s,
                 "documents_per_s": a.docs / plan_s},
        "shape": {"batch_size": a.batch_size, "seq_len": a.seq_len},
        "loader_s_per_batch": loader_s, "step_s": step_s,
        "loader_tokens_per_s": loader_tps,
        "step_tokens_per_s": step_tps, "model": "tiny-moe preset (vocab 512), float32, reference backend",
        "ratio_loader_over_step": loader_tps / step_tps,
        "loader_tokens_per_s_seq4096": a.batch_size * 4096 / statistics.median(loader4k_s),
        "preprocess": {**pre, "tokens_per_s": pre["tokens"] / pre["seconds"],
                       "tokenizer": "tiny BPE (4,000 ids)", "threads": "tokenizers' default pool"},
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Packed training rows from memory-mapped indexed datasets (r1moe/data/indexed.py): packing with the loss mask per
segment, blending of several datasets by weight, and batches of one data-parallel rank's share.

- Packing: the rows `r1moe.train.packing.pack_examples` would build from the same documents in file order
  (next-fit into `seq_len`, one segment per document, a document longer than seq_len + 1 tokens truncated). The
  plan (where each row starts) comes from the index alone; a row's tokens are read from the memory map only when
  the row is used, and the row itself is built by `pack_examples`, so both paths train on identical rows.
- Blending (`sources` = [(prefix, weight), ...]): megatron-core's `BlendedDataset` rule
  (`helpers.cpp: build_blending_indices`): blended row k comes from the dataset whose weight * k most exceeds the
  rows it has given so far. An epoch is as many blended rows as the datasets hold together; each dataset gives its
  share in its own seeded row order, continuing where the last epoch stopped (wrapping): a dataset whose share is
  larger than itself repeats rows only after giving all of them, a smaller share moves on to new rows each epoch.
- Order and sharding: each epoch is a permutation of the blended rows drawn from (seed, epoch); step s of an epoch
  takes the s-th `batch_size` rows of it (the last partial batch is dropped, as `iterate_batches` does), and rank r
  of `world` gets rows [r * batch_size / world, (r + 1) * batch_size / world) of that batch: the ranks together
  read each global batch once, each only its share. Resuming at a step computes its place; nothing is replayed.

Memory: the index arrays are memory-mapped; per dataset the plan holds 8 bytes per row, the blend 16 bytes per
blended row, an epoch's permutation 8 bytes per blended row (about 1.6 GB at 100M rows of 4,096 tokens = 400B
tokens). Building the plan and the blend is a Python loop over documents and rows (a few seconds per million).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from r1moe.data.indexed import IndexedDataset
from r1moe.train.packing import Example, PackedBatch, pack_examples


def plan_rows(document_lengths: Sequence[int], seq_len: int) -> np.ndarray:
    """Row starts (document indices, plus the end) of `pack_examples`' next-fit over documents of these lengths."""
    starts, cur = [0], 0
    for i, length in enumerate(np.asarray(document_lengths).tolist()):
        n = min(max(length - 1, 0), seq_len)  # inputs a document contributes: ids[:-1], truncated to seq_len
        if cur + n > seq_len:
            starts.append(i)
            cur = 0
        cur += n
    if cur == 0 and len(starts) == 1:
        return np.zeros(1, dtype=np.int64)  # no token to train on: no row
    starts.append(len(document_lengths))
    return np.asarray(starts, dtype=np.int64)


def blend_indices(weights: Sequence[float], size: int) -> np.ndarray:
    """Dataset of each blended row (megatron's build_blending_indices rule)."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    counts = [0] * len(w)
    wl = w.tolist()
    out = np.empty(size, dtype=np.int64)
    for k in range(size):
        kk = max(k, 1)
        d = max(range(len(wl)), key=lambda j: wl[j] * kk - counts[j])
        out[k] = d
        counts[d] += 1
    return out


class IndexedRows:
    """The training rows of one or more indexed datasets; `batches()` yields one rank's `PackedBatch`es."""

    def __init__(self, sources: Sequence[tuple[str | Path, float]], seq_len: int, pad_id: int,
                 vocab_size: int | None = None):
        if not sources:
            raise ValueError("no indexed dataset given")
        for prefix, weight in sources:
            if not weight > 0:
                raise ValueError(f"blend weight of {prefix} is {weight}: weights must be > 0")
        self.seq_len, self.pad_id, self.vocab_size = seq_len, pad_id, vocab_size
        self.datasets = [IndexedDataset(p) for p, _ in sources]
        self.plans = [plan_rows(ds.document_lengths(), seq_len) for ds in self.datasets]
        rows = [len(p) - 1 for p in self.plans]
        for (prefix, _), n in zip(sources, rows):
            if n == 0:
                raise ValueError(f"{prefix}: no training row (no document of two tokens or more)")
        self.num_rows = sum(rows)
        self.rows_per_dataset = rows
        if len(sources) == 1:
            self.dataset_of = np.zeros(self.num_rows, dtype=np.int64)
            self.nth_of = np.arange(self.num_rows, dtype=np.int64)
        else:
            self.dataset_of = blend_indices([w for _, w in sources], self.num_rows)
            self.nth_of = np.empty(self.num_rows, dtype=np.int64)
        self.taken = np.bincount(self.dataset_of, minlength=len(rows))
        """Rows each dataset gives per epoch."""
        if len(sources) > 1:
            for d in range(len(rows)):
                where = np.flatnonzero(self.dataset_of == d)
                self.nth_of[where] = np.arange(len(where))
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    def _dataset_order(self, d: int, seed: int) -> np.ndarray:
        key = (d, seed)
        if key not in self._orders:
            self._orders[key] = np.random.default_rng([seed, 1 << 20, d]).permutation(self.rows_per_dataset[d])
        return self._orders[key]

    def row(self, k: int, epoch: int = 0, seed: int = 0) -> tuple[list[int], list[int], list[int]]:
        """Blended row k of `epoch` as (inputs, targets, segments), each seq_len long. Dataset d's rows are taken in
        its own seeded order, epoch after epoch (`taken[d]` per epoch, wrapping), so an undersampled dataset moves on
        to rows it has not given yet and an upsampled one repeats only after giving all of them."""
        d, nth = int(self.dataset_of[k]), int(self.nth_of[k])
        r = int(self._dataset_order(d, seed)[(epoch * int(self.taken[d]) + nth) % self.rows_per_dataset[d]])
        ds, plan = self.datasets[d], self.plans[d]
        examples = [Example(*ds.example(i)) for i in range(int(plan[r]), int(plan[r + 1]))]
        if self.vocab_size is not None:  # megatron's files name no tokenizer: an id past the vocabulary is caught here
            for i, ex in zip(range(int(plan[r]), int(plan[r + 1])), examples):
                if ex.ids and not 0 <= min(ex.ids) <= max(ex.ids) < self.vocab_size:
                    bad = max(ex.ids) if max(ex.ids) >= self.vocab_size else min(ex.ids)
                    raise ValueError(f"{ds.prefix}: document {i} holds token id {bad}; the tokenizer has "
                                     f"{self.vocab_size} ids")
        packed = pack_examples(examples, self.seq_len, self.pad_id)
        assert len(packed) == 1, "the plan packs exactly one row"  # plan_rows mirrors pack_examples
        return packed[0]

    def steps_per_epoch(self, batch_size: int) -> int:
        return self.num_rows // batch_size if self.num_rows >= batch_size else 1

    def batches(self, batch_size: int, seed: int, start_step: int = 0, rank: int = 0,
                world: int = 1) -> Iterator[PackedBatch]:
        """Endless batches of rank `rank`'s share (batch_size / world rows) from step `start_step` on."""
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, world={world})")
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} is not divisible by the {world} data-parallel ranks")
        if world > 1 and self.num_rows < batch_size:
            raise ValueError(f"{self.num_rows} rows cannot make one global batch of {batch_size} for {world} ranks")
        per_epoch = self.steps_per_epoch(batch_size)
        share = batch_size // world if self.num_rows >= batch_size else self.num_rows
        step, cached = start_step, (-1, None)
        while True:
            epoch, s = divmod(step, per_epoch)
            if cached[0] != epoch:
                cached = (epoch, np.random.default_rng([seed, epoch]).permutation(self.num_rows))
            order = cached[1]
            lo = s * batch_size + rank * share
            rows = [self.row(int(k), epoch, seed) for k in order[lo:lo + share]]
            yield PackedBatch(torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows]),
                              torch.tensor([r[2] for r in rows]))
            step += 1


def build_indexed_rows(data, tok, stage: str) -> IndexedRows:
    """The rows a pretrain/sft stage trains on from `data` (config.DataSection, format indexed): `data.train` or
    `data.blend`, checked against the stage's tokenizer and the stage (ValueError naming the file and the key)."""
    from r1moe.data.indexed import meta_path
    from r1moe.data.tokenizer import special_ids

    sources = list(data.blend.items()) if data.blend else [(data.train, 1.0)]
    pad, _, eos = special_ids(tok)
    vocab = max(tok.get_vocab().values()) + 1
    rows = IndexedRows(sources, data.seq_len, pad, vocab)
    for (prefix, _), ds in zip(sources, rows.datasets):
        m, where = ds.meta, meta_path(prefix)
        if m is None:  # megatron's own file: documents of text, every token a target
            if stage == "sft":
                raise ValueError(f"{prefix}: no {where.name}: a pretraining file (every token a target); sft needs "
                                 f"one made by tools/preprocess_data.py --kind sft (the prompt masked)")
            continue
        if (m.loss == "last_sequence") != (stage == "sft"):
            kind = "sft" if m.loss == "last_sequence" else "pretrain"
            raise ValueError(f"{where}: made with --kind {kind}; the {stage} stage needs --kind {stage}")
        if m.vocab_size != vocab or m.eos_id != eos:
            raise ValueError(f"{where}: made with a tokenizer of {m.vocab_size} ids (eos {m.eos_id}); the stage's "
                             f"has {vocab} (eos {eos}): re-run tools/preprocess_data.py with data.tokenizer")
        if (stage == "sft" or m.template is not None) and m.template != data.template:
            raise ValueError(f"{where}: prompts rendered with template {m.template!r}; data.template is "
                             f"{data.template!r}")
    return rows

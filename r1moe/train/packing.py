"""Sequence packing for next-token training (pretrain, SFT, distillation).

Each example is a token list plus a per-token loss mask. Examples are packed greedily into rows of `seq_len`
with segment ids, so attention never crosses examples (the model builds a block-diagonal causal mask and restarts
positions per segment) and no compute is spent on padding beyond each row's tail.

Legend: R rows, T seq_len.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch

IGNORE = -100


@dataclass
class Example:
    ids: list[int]
    """[bos] (when the tokenizer has one) + tokens + [eos]."""
    loss_mask: list[bool]
    """Same length as ids: True where the token is a *target* (predicted from its prefix)."""


@dataclass
class PackedBatch:
    input_ids_RT: torch.Tensor
    targets_RT: torch.Tensor
    """Next token at each position, IGNORE where there is no target or it is masked (prompt, padding)."""
    segment_ids_RT: torch.Tensor
    """Example index within the row; padding gets its own segment (-1)."""

    def to(self, device: torch.device) -> PackedBatch:
        return PackedBatch(self.input_ids_RT.to(device), self.targets_RT.to(device), self.segment_ids_RT.to(device))

    @property
    def num_target_tokens(self) -> int:
        return int((self.targets_RT != IGNORE).sum())


def pack_examples(examples: list[Example], seq_len: int, pad_id: int) -> list[tuple[list[int], list[int], list[int]]]:
    """Greedy first-fit packing -> rows of (inputs, targets, segments), each of length seq_len.
    An example longer than seq_len + 1 tokens is truncated (its tail is lost)."""
    rows: list[tuple[list[int], list[int], list[int]]] = []
    cur_in: list[int] = []
    cur_tg: list[int] = []
    cur_sg: list[int] = []
    seg = 0
    for ex in examples:
        inputs = ex.ids[:-1][:seq_len]
        targets = [t if m else IGNORE for t, m in zip(ex.ids[1:], ex.loss_mask[1:])][:seq_len]
        if len(cur_in) + len(inputs) > seq_len:
            rows.append(_pad_row(cur_in, cur_tg, cur_sg, seq_len, pad_id))
            cur_in, cur_tg, cur_sg, seg = [], [], [], 0
        cur_in += inputs
        cur_tg += targets
        cur_sg += [seg] * len(inputs)
        seg += 1
    if cur_in:
        rows.append(_pad_row(cur_in, cur_tg, cur_sg, seq_len, pad_id))
    return rows


def check_packed(examples: list[Example], rows: list[tuple[list[int], list[int], list[int]]], seq_len: int) -> None:
    """After `pack_examples` of a whole dataset: the examples truncated at seq_len are counted on stderr, and rows
    with no token to train on at all (every SFT prompt longer than seq_len) are a ValueError naming data.seq_len."""
    cut = [ex for ex in examples if len(ex.ids) > seq_len + 1]
    if cut:
        emptied = sum(not any(ex.loss_mask[1:seq_len + 1]) and any(ex.loss_mask[1:]) for ex in cut)
        print(f"[data] {len(cut)} of {len(examples)} examples are longer than data.seq_len={seq_len} and were "
              f"truncated ({emptied} of them lost every loss token)", file=sys.stderr, flush=True)
    if examples and not any(t != IGNORE for _, targets, _ in rows for t in targets):
        raise ValueError(f"no example has a token to train on after truncation at data.seq_len={seq_len} (the loss "
                         f"tokens lie past it in all {len(examples)}); raise data.seq_len")


def _pad_row(inp, tgt, seg, seq_len, pad_id):
    n = seq_len - len(inp)
    return inp + [pad_id] * n, tgt + [IGNORE] * n, seg + [-1] * n


def shuffled_indices(n: int, start: int, count: int, seed: int) -> list[int]:
    """Indices at positions start .. start+count-1 of endless epochs, each a permutation of range(n) shuffled by
    random.Random(seed + epoch): a position gives the same index however it is reached, so resume is exact. One
    shuffle per epoch touched (not per position)."""
    out, orders = [], {}
    for i in range(start, start + count):
        epoch, pos = divmod(i, n)
        if epoch not in orders:
            orders[epoch] = list(range(n))
            random.Random(seed + epoch).shuffle(orders[epoch])
        out.append(orders[epoch][pos])
    return out


def iterate_batches(rows, batch_size: int, seed: int, start_step: int = 0) -> Iterator[PackedBatch]:
    """Endless shuffled batches (reshuffled each epoch, deterministic in seed), resumable at `start_step`."""
    if not rows:
        raise ValueError("no training rows after packing (empty dataset?)")
    step, epoch = 0, 0
    while True:
        order = list(range(len(rows)))
        random.Random(seed + epoch).shuffle(order)
        for i in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            idx = order[i:i + batch_size]
            if step >= start_step:
                yield PackedBatch(torch.tensor([rows[j][0] for j in idx]), torch.tensor([rows[j][1] for j in idx]),
                                  torch.tensor([rows[j][2] for j in idx]))
            step += 1
        epoch += 1


def mtp_targets(targets_RT: torch.Tensor, segments_RT: torch.Tensor, k: int) -> torch.Tensor:
    """Targets for MTP depth k: position i predicts the token k steps after its next token, within its segment."""
    out = torch.full_like(targets_RT, IGNORE)
    out[:, :-k] = targets_RT[:, k:]
    same = torch.zeros_like(segments_RT, dtype=torch.bool)
    same[:, :-k] = segments_RT[:, k:] == segments_RT[:, :-k]
    return out.masked_fill(~same, IGNORE)

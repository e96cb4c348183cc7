"""Packed rows (r1moe/train/packing.py: several examples per row, each a run of one segment id, padding -1) for
attention that never crosses a segment: the runs of a batch of rows (`segment_runs`, also megatron's THD layout in
r1moe.parallel.train), and the reference model's layout of them for fused causal attention (`SegmentLayout`).

Legend: B rows, T positions per row, G segments (runs), h heads, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def segment_runs(segments_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The runs of equal ids of B rows laid end to end (a run never spans two rows): (is_start [B*T] bool, starts
    [G] flat position of each run's first token)."""
    is_start = torch.ones_like(segments_BT, dtype=torch.bool)
    is_start[:, 1:] = segments_BT[:, 1:] != segments_BT[:, :-1]
    is_start = is_start.reshape(-1)
    return is_start, is_start.nonzero().squeeze(-1)


SEGMENTS_PER_CALL = 16
"""Packed segments attend in groups of this many, sorted by length, each group padded to its longest."""


@dataclass
class SegmentLayout:
    """Packed rows regrouped for attention: each segment (an example of a packed row, or a row's padding) becomes a
    row of its own in a group of segments of similar length (sorted by length, SEGMENTS_PER_CALL per group), right-
    padded to the group's longest, so attention is plain causal attention within a segment (the fused kernel,
    skipping the blocks above the diagonal) instead of a [T, T] mask per row that is mostly zeros. Slots: the
    groups' rows laid end to end (group after group, segment after segment)."""

    index_N: torch.Tensor
    """[slots] flat position (b * T + t) of each slot; padding slots point at position 0 (their outputs are never
    read)."""
    groups: list[tuple[int, int]]
    """(segments, slots per segment) of each group, in slot order."""
    slot_BT: torch.Tensor
    """[B * T] the slot of each flat position."""


def build_segment_layout(segments_BT: torch.Tensor) -> SegmentLayout:
    """The layout of rows whose segments are contiguous runs of one id (r1moe/train/packing.py)."""
    B, T = segments_BT.shape
    device = segments_BT.device
    is_start, starts_G = segment_runs(segments_BT)
    lengths_G = torch.diff(starts_G, append=starts_G.new_tensor([B * T]))
    order_G = lengths_G.argsort(descending=True, stable=True)
    lengths = lengths_G[order_G].tolist()
    groups, index, first_slot = [], [], []
    slots = 0
    for i in range(0, len(lengths), SEGMENTS_PER_CALL):
        g, L = min(SEGMENTS_PER_CALL, len(lengths) - i), lengths[i]
        rows_g = order_G[i:i + g]
        offsets_L = torch.arange(L, device=device)
        index.append(torch.where(offsets_L < lengths_G[rows_g, None], starts_G[rows_g, None] + offsets_L, 0).reshape(-1))
        first_slot.append(slots + L * torch.arange(g, device=device))
        groups.append((g, L))
        slots += g * L
    slot_of_segment_G = torch.empty_like(starts_G)
    slot_of_segment_G[order_G] = torch.cat(first_slot)
    seg_BT = is_start.long().cumsum(0) - 1
    slot_BT = slot_of_segment_G[seg_BT] + torch.arange(B * T, device=device) - starts_G[seg_BT]
    return SegmentLayout(torch.cat(index), groups, slot_BT)


def attend_segments(q_BhTD, k_BhTD, v_BhTD, layout: SegmentLayout, scale: float) -> torch.Tensor:
    """Causal attention of each segment to itself only: q, k, v [B, h, T, D] gathered into the layout's groups,
    one fused causal call per group, scattered back to [B, h, T, D]."""
    B, h, T, _ = q_BhTD.shape

    def slots(x_BhTD):  # [slots, h, D]
        return x_BhTD.transpose(1, 2).reshape(B * T, h, -1)[layout.index_N]

    q, k, v = slots(q_BhTD), slots(k_BhTD), slots(v_BhTD)
    outs, at = [], 0
    for g, L in layout.groups:
        def group(x, at=at, g=g, L=L):  # [g, h, L, D]
            return x[at:at + g * L].view(g, L, h, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(group(q), group(k), group(v), is_causal=True, scale=scale)
        outs.append(out.transpose(1, 2).reshape(g * L, h, -1))
        at += g * L
    return torch.cat(outs)[layout.slot_BT].view(B, T, h, -1).transpose(1, 2)

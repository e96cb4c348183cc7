"""The THD layout megatron runs packed rows in (parallel.train.packed_layout, pure part, CPU): every run of equal
segment ids in a row is a sequence of its own, positions restart in each, as the reference model's segment mask."""

import torch

from r1moe.parallel.train import packed_layout
from r1moe.train.packing import Example, pack_examples


def test_runs_of_a_row_are_sequences_and_positions_restart():
    seg = torch.tensor([[0, 0, 0, 1, 1, -1],
                        [0, 0, 0, 0, 0, 0],
                        [-1, -1, -1, -1, -1, -1]])
    pos, cu, longest = packed_layout(seg)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 3, 5, 6, 12, 18]
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]]
    assert longest == 6


def test_layout_of_packed_examples_matches_their_documents():
    """Rows from pack_examples: each example's tokens form one sequence with positions 0..len-1, as if alone."""
    examples = [Example(list(range(1, n + 1)), [True] * n) for n in (4, 6, 3, 9, 2)]
    rows = pack_examples(examples, 10, pad_id=0)
    seg = torch.tensor([r[2] for r in rows])
    pos, cu, _ = packed_layout(seg)
    lengths = (cu[1:] - cu[:-1]).tolist()
    inputs = [len(ex.ids) - 1 for ex in examples]  # a document contributes ids[:-1]
    flat_seg = seg.reshape(-1).tolist()
    docs = [length for length, first in zip(lengths, cu[:-1].tolist()) if flat_seg[first] != -1]
    assert docs == inputs
    for first, length in zip(cu[:-1].tolist(), lengths):
        assert pos[0, first:first + length].tolist() == list(range(length))

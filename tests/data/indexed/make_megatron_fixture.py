"""Writes megatron_written.{bin,idx} with megatron-core's own IndexedDatasetBuilder (megatron-core 0.19.2,
megatron/core/datasets/indexed_dataset.py), and checks megatron's IndexedDataset reads back a file written by
r1moe.data.indexed. The committed fixture is this script's output; run it again where megatron-core imports:

    python tests/data/indexed/make_megatron_fixture.py tests/data/indexed
"""

import sys
from pathlib import Path

import numpy
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

# Three documents (the second of two sequences, as megatron's --split-sentences writes them); ids above 255 and
# 65,499 exercise the uint16 and int32 dtypes.
DOCS = [[[1, 17, 300, 2]], [[1, 5, 6], [7, 8, 2]], [[1, 65000, 2]]]

out = Path(sys.argv[1])
for name, dtype, docs in [("megatron_written", numpy.uint16, DOCS),
                          ("megatron_written_int32", numpy.int32, [[[1, 70000, 2]], [[3, 4]]])]:
    builder = IndexedDatasetBuilder(str(out / f"{name}.bin"), dtype=dtype)
    for doc in docs:
        for seq in doc:
            builder.add_item(torch.tensor(seq))
        builder.end_document()
    builder.finalize(str(out / f"{name}.idx"))

# megatron reads a file r1moe wrote (argv[2], optional: a prefix written by tools/preprocess_data.py)
if len(sys.argv) > 2:
    ds = IndexedDataset(sys.argv[2])
    print(f"megatron read {sys.argv[2]}: {len(ds)} sequences, {len(ds.document_indices) - 1} documents, "
          f"first: {ds[0].tolist()}, last: {ds[len(ds) - 1].tolist()}")

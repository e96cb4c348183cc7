"""Tokenized datasets in megatron-core's indexed format (`PREFIX.bin` + `PREFIX.idx`), written and read here
byte for byte as megatron-core's `megatron/core/datasets/indexed_dataset.py` (`IndexedDatasetBuilder`,
`_IndexWriter`, `_IndexReader`; checked against files its builder wrote, tests/data/indexed/): megatron's
`IndexedDataset` reads our files and we read files its `tools/preprocess_data.py` wrote.

The format (little-endian):

    PREFIX.bin   the tokens of every sequence, back to back, in the index's dtype
    PREFIX.idx   b"MMIDIDX\\x00\\x00"                 9-byte magic
                 u64 version = 1
                 u8  dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16)
                 u64 S = number of sequences
                 u64 D = number of document indices (documents + 1)
                 i32[S] sequence lengths (tokens)
                 i64[S] sequence byte offsets into PREFIX.bin
                 i64[D] document indices: document i is sequences [doc[i], doc[i+1]); doc[0] = 0
                 (i8[S] sequence modes: multimodal datasets only; not written or read here)

Token dtype as megatron chooses it: uint16 for a vocabulary under 65,500 ids, else int32.

Documents and the loss. A document is one training example. Our files say how to mask it in a sidecar
`PREFIX.meta.json` (megatron ignores it): `loss: all` (pretraining: one sequence per document, `[bos] text [eos]`,
every token a target) or `loss: last_sequence` (SFT: two sequences, `[bos] rendered prompt` then `response [eos]`;
only the response is a target, as `r1moe.train.pretrain.build_examples` masks it). A file without the sidecar
(megatron's own) is read as pretraining data: each document, its sequences concatenated, is one example with every
token a target.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Self

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPES: dict[int, type[np.number]] = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
                                      6: np.float64, 7: np.float32, 8: np.uint16}
CODES = {np.dtype(t): c for c, t in DTYPES.items()}
_HEADER_BYTES = 9 + 8 + 1 + 8 + 8
LossRule = Literal["all", "last_sequence"]


def token_dtype(vocab_size: int) -> type[np.number]:
    """megatron's `DType.optimal_dtype`: uint16 below 65,500 ids, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


@dataclass
class IndexedMeta:
    """PREFIX.meta.json: what our reader needs beyond megatron's index."""

    loss: LossRule
    vocab_size: int
    """Ids of the tokenizer the file was made with (len of its vocabulary): the stage's must have as many."""
    eos_id: int | None
    bos_id: int | None
    template: str | None = None
    """SFT: the prompt template the prompts were rendered with."""
    format: str = "r1moe-indexed-1"


def bin_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


def meta_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.meta.json")


class IndexedWriter:
    """Writes PREFIX.bin/.idx (+ .meta.json) as megatron's `IndexedDatasetBuilder` does; the files appear under
    their names only when `close()` completes (temp names, then `os.replace`), so a killed run leaves no prefix that
    looks whole."""

    def __init__(self, prefix: str | Path, dtype: type[np.number], meta: IndexedMeta | None = None):
        if np.dtype(dtype) not in CODES:
            raise ValueError(f"token dtype {np.dtype(dtype)} is not one megatron's index knows")
        self.prefix, self.dtype, self.meta = Path(prefix), np.dtype(dtype), meta
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._tmp_bin = Path(f"{prefix}.bin.tmp{os.getpid()}")
        self._bin = self._tmp_bin.open("wb")
        self.sequence_lengths: list[int] = []
        self.document_indices: list[int] = [0]
        self._max = np.iinfo(self.dtype).max if self.dtype.kind in "iu" else None

    def add_document(self, sequences: Sequence[Sequence[int]]) -> None:
        for seq in sequences:
            arr = np.asarray(seq, dtype=np.int64)
            if arr.size and self._max is not None and (arr.max() > self._max or arr.min() < 0):
                raise ValueError(f"token id {int(arr.max())} does not fit the index dtype {self.dtype}")
            self._bin.write(arr.astype(self.dtype).tobytes(order="C"))
            self.sequence_lengths.append(int(arr.size))
        self.document_indices.append(len(self.sequence_lengths))

    def close(self) -> None:
        self._bin.close()
        lengths = np.asarray(self.sequence_lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths):
            pointers[1:] = np.cumsum(lengths[:-1].astype(np.int64)) * self.dtype.itemsize
        tmp_idx = Path(f"{self.prefix}.idx.tmp{os.getpid()}")
        with tmp_idx.open("wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<Q", VERSION))
            f.write(struct.pack("<B", CODES[self.dtype]))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(self.document_indices)))
            f.write(lengths.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(np.asarray(self.document_indices, dtype=np.int64).tobytes(order="C"))
        if self.meta is not None:
            tmp_meta = Path(f"{self.prefix}.meta.json.tmp{os.getpid()}")
            tmp_meta.write_text(json.dumps(asdict(self.meta), indent=1) + "\n")
            os.replace(tmp_meta, meta_path(self.prefix))
        os.replace(self._tmp_bin, bin_path(self.prefix))
        os.replace(tmp_idx, idx_path(self.prefix))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._bin.close()
            self._tmp_bin.unlink(missing_ok=True)


class IndexedDataset:
    """Memory-mapped reader of PREFIX.bin/.idx; nothing but the index arrays is touched until a sequence is read.
    A malformed pair is a ValueError naming the file and what is wrong."""

    def __init__(self, prefix: str | Path):
        self.prefix = Path(prefix)
        idx, bin_ = idx_path(prefix), bin_path(prefix)
        for p in (idx, bin_):
            if not p.is_file():
                raise FileNotFoundError(f"{p}: not found (an indexed dataset is PREFIX.bin + PREFIX.idx; "
                                        f"tools/preprocess_data.py writes them)")
        size = idx.stat().st_size
        with idx.open("rb") as f:
            head = f.read(_HEADER_BYTES)
        if len(head) < _HEADER_BYTES or head[:9] != MAGIC:
            raise ValueError(f"{idx}: not a megatron indexed-dataset index (bad magic)")
        version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:])
        if version != VERSION:
            raise ValueError(f"{idx}: index version {version}; only version {VERSION} is known")
        if code not in DTYPES:
            raise ValueError(f"{idx}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPES[code])
        need = _HEADER_BYTES + 4 * n_seq + 8 * n_seq + 8 * n_doc
        if size < need:
            raise ValueError(f"{idx}: truncated: {size} bytes, the header announces {need}")
        idx_map = np.memmap(idx, mode="r", dtype=np.uint8)
        off = _HEADER_BYTES
        self.sequence_lengths = np.frombuffer(idx_map, dtype=np.int32, count=n_seq, offset=off)
        self.sequence_pointers = np.frombuffer(idx_map, dtype=np.int64, count=n_seq, offset=off + 4 * n_seq)
        self.document_indices = np.frombuffer(idx_map, dtype=np.int64, count=n_doc, offset=off + 12 * n_seq)
        total = int(self.sequence_lengths.sum(dtype=np.int64))
        if bin_.stat().st_size != total * self.dtype.itemsize:
            raise ValueError(f"{bin_}: {bin_.stat().st_size} bytes, the index describes {total} tokens of "
                             f"{self.dtype} ({total * self.dtype.itemsize} bytes)")
        docs = self.document_indices
        if n_doc < 1 or docs[0] != 0 or docs[-1] != n_seq or (n_doc > 1 and np.any(np.diff(docs) < 0)):
            raise ValueError(f"{idx}: document indices are not a non-decreasing 0..{n_seq} partition of the "
                             f"sequences")
        self.bin = np.memmap(bin_, mode="r", dtype=self.dtype) if total else np.zeros(0, self.dtype)
        self.meta = read_meta(prefix)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def sequence(self, i: int) -> np.ndarray:
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize
        return self.bin[start:start + int(self.sequence_lengths[i])]

    def document_sequences(self, i: int) -> list[np.ndarray]:
        return [self.sequence(j) for j in range(int(self.document_indices[i]), int(self.document_indices[i + 1]))]

    def document_lengths(self) -> np.ndarray:
        """Tokens per document, from the index alone."""
        cum = np.concatenate([[0], np.cumsum(self.sequence_lengths, dtype=np.int64)])
        return cum[self.document_indices[1:]] - cum[self.document_indices[:-1]]

    def example(self, i: int) -> tuple[list[int], list[bool]]:
        """Document i as (ids, loss mask) under the file's loss rule (module docstring); the mask marks targets,
        as `r1moe.train.packing.Example.loss_mask` does."""
        seqs = self.document_sequences(i)
        ids = np.concatenate(seqs).tolist() if seqs else []
        if self.meta is None or self.meta.loss == "all":
            return ids, [True] * len(ids)
        head = sum(len(s) for s in seqs[:-1])
        return ids, [False] * head + [True] * (len(ids) - head)


def read_meta(prefix: str | Path) -> IndexedMeta | None:
    path = meta_path(prefix)
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        meta = IndexedMeta(**obj)
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not an indexed-dataset metadata file ({e})") from None
    if meta.loss not in ("all", "last_sequence"):
        raise ValueError(f"{path}: loss: {meta.loss!r}; expected all or last_sequence")
    return meta

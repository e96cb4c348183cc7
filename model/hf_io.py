"""HF safetensors files, the one implementation of reading and writing them (used by `checkpoint.py` and by
r1moe.parallel's megatron conversion): the weight map (index or single file), FP8 block de-quantization, a lazy
tensor reader and a size-bounded shard writer. Pure CPU (safetensors + torch).

- `read_weight_map(dir)`: HF tensor name -> file, from `model.safetensors.index.json` or a single
  `model.safetensors`; every named shard must exist.
- `compute_fp8_dequant(q, scale_inv, block)`: DeepSeek-V3's released weights are `float8_e4m3fn` + a float32
  `<name>_scale_inv` per 128x128 block (`quantization_config.weight_block_size`); de-quantized with the semantics of
  DeepSeek-V3 `inference/fp8_cast_bf16.py` / `kernel.py:weight_dequant`: w[i, j] = q[i, j] * s[i // bm, j // bn],
  in float32.
- `compute_fp8_quant(w, block)`: the inverse, for serving a trainer's weights in that format (a rollout engine's
  FP8 weights): s = amax(|block|) / 448, q = w / s in float8_e4m3fn; `fp8_quantized(name, layers)` says which HF
  tensors V3's FP8 release stores so (the decoder layers' linear projections, routed and shared experts included).
- `HFReader(dir)`: `reader[name]` loads one tensor from whichever shard holds it, memory-mapped, nothing else
  read; FP8 weights come back de-quantized.
- `ShardWriter(dir, max_shard_bytes)`: `add(name, tensor)` appends to the current shard and flushes it when full,
  so writing holds at most one shard in memory; `close()` names the files (`model.safetensors` when one shard,
  else `model-0000i-of-0000N.safetensors` + the index).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from r1moe.atomic import file_mode

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_BLOCK = (128, 128)
FP8_E4M3_MAX = 448.0
FP8_PROJECTIONS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "k_proj", "v_proj", "o_proj",
                   "gate_proj", "up_proj", "down_proj")
"""The linear projections of a decoder layer (attention, dense MLP, routed and shared experts) DeepSeek-V3's FP8
release stores block-quantized; embeddings, the LM head, norms and the router's gate stay in bf16/fp32."""


# ---------------------------------------------------------------------------------------------- read
def read_weight_map(path: Path) -> dict[str, str]:
    """HF tensor name -> file name, from the index or the single file; every named file must exist."""
    index = path / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        for file in dict.fromkeys(weight_map.values()):
            if not (path / file).is_file():
                raise FileNotFoundError(f"{path / file}: shard named in {index} does not exist")
        return weight_map
    single = path / SINGLE_FILE
    if not single.is_file():
        raise FileNotFoundError(f"{path}: neither {SINGLE_FILE} nor {INDEX_NAME} found (only safetensors checkpoints "
                                f"are supported)")
    with open_safetensors(single) as f:
        return dict.fromkeys(f.keys(), SINGLE_FILE)


def fp8_block_size(raw_config: dict[str, Any], source: Path) -> tuple[int, int]:
    """The FP8 scale block (rows, cols) of an HF config.json's quantization_config; 128x128 when unset."""
    qc = raw_config.get("quantization_config") or {}
    block = qc.get("weight_block_size") or list(FP8_BLOCK)
    if len(block) != 2:
        raise ValueError(f"{source}: quantization_config.weight_block_size={block!r}: expected [rows, cols]")
    return int(block[0]), int(block[1])


def compute_fp8_dequant(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = FP8_BLOCK,
                        name: str = "weight") -> torch.Tensor:
    """Block-wise FP8 de-quantization (DeepSeek-V3 `weight_dequant`), in float32:
    w[i, j] = q[i, j] * s[i // bm, j // bn] (edges: partial blocks)."""
    if weight.dim() != 2:
        raise ValueError(f"tensor {name!r}: FP8 block de-quantization expects a 2-D weight, got {tuple(weight.shape)}")
    M, N = weight.shape
    bm, bn = block
    want = (math.ceil(M / bm), math.ceil(N / bn))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"tensor {name!r}: {name}{SCALE_SUFFIX} has shape {tuple(scale_inv.shape)}, expected {want} "
                         f"for a {tuple(weight.shape)} weight in {bm}x{bn} blocks")
    s = scale_inv.float().repeat_interleave(bm, dim=0)[:M].repeat_interleave(bn, dim=1)[:, :N]
    return weight.float() * s


def fp8_quantized(name: str, num_hidden_layers: int) -> bool:
    """Whether the HF tensor `name` is stored block-quantized in DeepSeek-V3's FP8 format: the weight of one of
    FP8_PROJECTIONS in decoder layers 0 .. num_hidden_layers - 1 (MTP layers, which rollout engines skip, are not)."""
    m = re.fullmatch(r"model\.layers\.(\d+)\..*\.([a-z_]+)\.weight", name)
    return m is not None and int(m.group(1)) < num_hidden_layers and m.group(2) in FP8_PROJECTIONS


def compute_fp8_quant(weight: torch.Tensor, block: tuple[int, int] = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise FP8 quantization, the inverse of `compute_fp8_dequant`: per (bm, bn) block (partial at the edges)
    s = amax(|w|) / 448 (1 for an all-zero block), q = w / s rounded to float8_e4m3fn. Returns (q [M, N],
    scale_inv [ceil(M / bm), ceil(N / bn)] float32), on the weight's device."""
    if weight.dim() != 2:
        raise ValueError(f"FP8 block quantization expects a 2-D weight, got {tuple(weight.shape)}")
    M, N = weight.shape
    bm, bn = block
    rows, cols = math.ceil(M / bm), math.ceil(N / bn)
    w = torch.nn.functional.pad(weight.float(), (0, cols * bn - N, 0, rows * bm - M))
    blocks = w.view(rows, bm, cols, bn)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_E4M3_MAX, torch.ones_like(amax))
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q.view(rows * bm, cols * bn)[:M, :N].contiguous(), scale


def _safe_open(file_path: Path):
    try:
        return safe_open(file_path, framework="pt", device="cpu")
    except SafetensorError as e:
        raise ValueError(f"{file_path}: not a readable safetensors file ({e}); the file is truncated or "
                         f"corrupt") from None


@contextmanager
def open_safetensors(file_path: Path) -> Iterator[Any]:
    """safe_open, with a truncated or garbled file (safetensors checks the header against the file size) as a
    ValueError naming it."""
    with _safe_open(file_path) as f:
        yield f


def get_tensor(handle, name: str, file_path: Path) -> torch.Tensor:
    try:
        return handle.get_tensor(name)
    except SafetensorError as e:
        raise ValueError(f"{file_path}: tensor {name!r} cannot be read ({e}); the file is corrupt") from None


class HFReader:
    """Random access to the tensors of an HF checkpoint directory; FP8 weights come back de-quantized, floating
    tensors in `dtype` (the router's `e_score_correction_bias` keeps its stored dtype)."""

    def __init__(self, path: str | Path, dtype: torch.dtype = torch.bfloat16):
        self.path = Path(path)
        self.dtype = dtype
        self.weight_map: dict[str, str] = read_weight_map(self.path)
        config = self.path / CONFIG_NAME
        self.block = fp8_block_size(json.loads(config.read_text()), config) if config.is_file() else FP8_BLOCK
        self._open: dict[str, object] = {}

    def _file(self, shard: str):
        if shard not in self._open:
            if len(self._open) >= 4:  # bounded number of memory maps
                self._open.pop(next(iter(self._open)))
            self._open[shard] = _safe_open(self.path / shard)
        return self._open[shard]

    def names(self) -> list[str]:
        return list(self.weight_map)

    def raw(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise KeyError(f"{self.path}: checkpoint has no tensor {name!r}")
        shard = self.weight_map[name]
        return get_tensor(self._file(shard), name, self.path / shard)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self.raw(name)
        if t.dtype in FP8_DTYPES:
            scale_name = name + SCALE_SUFFIX
            if scale_name not in self.weight_map:
                raise ValueError(f"{name} is {t.dtype} but {scale_name} is missing")
            return compute_fp8_dequant(t, self.raw(scale_name), self.block, name).to(self.dtype)
        if t.is_floating_point() and t.dtype != self.dtype and not name.endswith("e_score_correction_bias"):
            return t.to(self.dtype)
        return t

    def config(self) -> dict:
        return json.loads((self.path / CONFIG_NAME).read_text())


# ---------------------------------------------------------------------------------------------- write
def parse_size(size: str | int) -> int:
    """Bytes from an int or "5GB" / "500MB" / "2GiB" (decimal units for B/KB/MB/GB, binary for KiB/MiB/GiB)."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"max_shard_size={size}: must be > 0")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size={size!r}: expected bytes as an int or a string like '5GB' or '500MB'")
    unit = m.group(2).upper()
    powers = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    value = int(float(m.group(1)) * powers[unit])
    if value <= 0:
        raise ValueError(f"max_shard_size={size!r}: must be > 0")
    return value


def write_json(file: Path, obj: Any) -> None:
    file.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


class ShardWriter:
    """Writes the weights of an HF directory in shards of at most max_shard_bytes (greedy, in `add` order; a tensor
    bigger than the limit gets a shard of its own). The directory is the caller's (for atomicity: r1moe.atomic)."""

    def __init__(self, path: str | Path, max_shard_bytes: int = 5 << 30):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._buf: dict[str, torch.Tensor] = {}
        self._bytes = 0
        self._shards: list[list[str]] = []
        self._names: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name!r} written twice")
        n = tensor.numel() * tensor.element_size()
        if self._buf and self._bytes + n > self.max_shard_bytes:
            self._flush()
        # a copy: expert slices and MTP copies share storage with other tensors, which safetensors rejects
        self._buf[name] = tensor.detach().to("cpu", copy=True).contiguous()
        self._names.add(name)
        self._bytes += n
        self.total_bytes += n

    def _temp_name(self, idx: int) -> str:
        return f"model-{idx:05d}.tmp.safetensors"

    def _flush(self) -> None:
        file = self.path / self._temp_name(len(self._shards))
        save_file(self._buf, file, metadata={"format": "pt"})
        os.chmod(file, file_mode())  # safetensors writes 0600; teammates on a shared cluster must read it
        self._shards.append(list(self._buf))
        self._buf, self._bytes = {}, 0

    def close(self) -> int:
        """Flush the last shard, give the shards their final names, write the index (several shards); returns the
        bytes written."""
        if self._buf or not self._shards:
            self._flush()
        n = len(self._shards)
        files = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for i, (file, names) in enumerate(zip(files, self._shards)):
            (self.path / self._temp_name(i)).rename(self.path / file)  # the count is known only now
            weight_map.update(dict.fromkeys(names, file))
        if n > 1:
            write_json(self.path / INDEX_NAME, {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map})
        return self.total_bytes

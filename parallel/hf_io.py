"""HF checkpoint directories, read lazily and written in size-bounded shards. Pure CPU (safetensors + torch).

- `HFReader(dir)`: `reader[name]` loads one tensor from whichever shard holds it (`model.safetensors.index.json`
  or a single `model.safetensors`), memory-mapped, nothing else read. DeepSeek-V3's released checkpoint stores
  linear weights as float8_e4m3fn with a float32 `weight_scale_inv` per 128x128 block; those are de-quantized
  on read (`dequantize_fp8_blockwise`, the inverse of DeepSeek-V3 inference/fp8_cast_bf16.py's input).
- `HFShardWriter(dir, max_shard_bytes)`: `add(name, tensor)` appends to the current shard and flushes it when
  full, so writing holds at most one shard in memory; `close()` writes the index.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FP8_BLOCK = 128


def dequantize_fp8_blockwise(w_fp8: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK,
                             dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """w[i, j] = w_fp8[i, j] * scale_inv[i // block, j // block] (edges: partial blocks), computed in float32."""
    rows, cols = w_fp8.shape
    s = scale_inv.float().repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return (w_fp8.float() * s).to(dtype)


class HFReader:
    """Random access to the tensors of an HF checkpoint directory; FP8 weights come back de-quantized."""

    def __init__(self, path: str | Path, dtype: torch.dtype = torch.bfloat16):
        self.path = Path(path)
        self.dtype = dtype
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        else:
            single = self.path / "model.safetensors"
            if not single.exists():
                raise FileNotFoundError(f"{self.path}: neither model.safetensors.index.json nor model.safetensors")
            with safe_open(single, framework="pt") as f:
                self.weight_map = {k: single.name for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        self._open: dict[str, object] = {}

    def _file(self, shard: str):
        if shard not in self._open:
            if len(self._open) >= 4:  # bounded number of memory maps
                self._open.pop(next(iter(self._open)))
            self._open[shard] = safe_open(self.path / shard, framework="pt")
        return self._open[shard]

    def names(self) -> list[str]:
        return list(self.weight_map)

    def raw(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise KeyError(f"{self.path}: checkpoint has no tensor {name!r}")
        return self._file(self.weight_map[name]).get_tensor(name)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self.raw(name)
        if t.dtype == torch.float8_e4m3fn:
            scale_name = name.removesuffix("weight") + "weight_scale_inv"
            if scale_name not in self.weight_map:
                raise ValueError(f"{name} is float8_e4m3fn but {scale_name} is missing")
            return dequantize_fp8_blockwise(t, self.raw(scale_name), dtype=self.dtype)
        if t.is_floating_point() and t.dtype != self.dtype and not name.endswith("e_score_correction_bias"):
            return t.to(self.dtype)
        return t

    def config(self) -> dict:
        return json.loads((self.path / "config.json").read_text())


class HFShardWriter:
    """Writes `model-XXXXX-of-YYYYY.safetensors` shards of at most max_shard_bytes plus the index."""

    def __init__(self, path: str | Path, max_shard_bytes: int = 5 << 30):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._buf: dict[str, torch.Tensor] = {}
        self._bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._buf or any(name in s for s in self._shards):
            raise ValueError(f"tensor {name!r} written twice")
        n = tensor.numel() * tensor.element_size()
        if self._buf and self._bytes + n > self.max_shard_bytes:
            self._flush()
        self._buf[name] = tensor.detach().to("cpu", copy=True).contiguous()  # copy: safetensors rejects shared storage
        self._bytes += n
        self.total_bytes += n

    def _flush(self) -> None:
        idx = len(self._shards)
        save_file(self._buf, str(self.path / f"model-{idx:05d}.tmp.safetensors"), metadata={"format": "pt"})
        self._shards.append(list(self._buf))
        self._buf, self._bytes = {}, 0

    def close(self) -> None:
        if self._buf or not self._shards:
            self._flush()
        n = len(self._shards)
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.path / f"model-{i:05d}.tmp.safetensors").rename(self.path / final)
            weight_map.update({k: final for k in names})
        (self.path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, indent=1))

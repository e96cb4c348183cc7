"""The policy's weights as SGLang takes them, both sides of the hand-over: what `SGLangEngine.update_weights` sends
(r1moe/rollout/sglang_engine.py) and, for the direct format, what runs inside SGLang's scheduler process to take it.

Two formats, `rollout.sglang.weight_loader`:
- sglang: HF-named tensors (`engine_tensors`: fp32 matrices in the engine's dtype, or DeepSeek-V3's blockwise FP8)
  in SGLang's `flattened_bucket` format (`aligned_order`), read by SGLang's own checkpoint loader.
- direct: SGLang's own parameters, packed whole by the trainer (`DirectPacker`: routed experts stacked into
  `mlp.experts.w13_weight` / `w2_weight`, gate/up into `gate_up_proj`, q_a/kv_a into `fused_qkv_a_proj_with_mqa`)
  into one uint8 CUDA tensor per bucket (`pack_direct`, one CUDA IPC handle) with a JSON spec
  {"tensors": [[name, dtype, shape, byte offset], ...], "first": bool, "final": bool}. SGLang calls `load_direct`
  by its import path (`custom_weight_loader`) in its scheduler process: each tensor is copied into the parameter
  of that name, one copy per parameter instead of SGLang's per-HF-tensor loader calls; then the step SGLang's own
  loader ends with, `post_load_weights`, recomputes MLA's absorbed w_kc / w_vc from the new kv_b_proj. Checked there,
  with an error naming the parameter: a name SGLang's model lacks, a shape that does not fit (the allowed
  differences: SGLang's vocabulary padding of the embedding and LM head, and the slot after the routed experts
  where SGLang fuses the shared expert), and, at the last bucket of a sync, a parameter the sync did not write (it
  would keep stale weights).
`write_engine_dir`: a directory SGLang starts from with dummy weights, the weights coming by update.

This module is imported inside SGLang's scheduler processes: its module-level imports stay light.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch


def engine_tensors(named_tensors: Iterable[tuple[str, torch.Tensor]], dtype: str, fp8_layers: int | None
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """The trainer's HF-named tensors as SGLang loads them: fp32 matrices in the engine's `dtype`; with FP8 serving
    (`fp8_layers`: the model's num_hidden_layers), each projection model/hf_io.py `fp8_quantized` names as
    (name, float8_e4m3fn weight) + (name_scale_inv, float32 128x128 block scales), DeepSeek-V3's release format."""
    from r1moe.model.hf_io import SCALE_SUFFIX, compute_fp8_quant, fp8_quantized

    cast = _engine_dtype(dtype)
    for name, t in named_tensors:
        t = t.detach()
        if fp8_layers is not None and fp8_quantized(name, fp8_layers):
            q, scale = compute_fp8_quant(t)
            yield name, q
            yield name + SCALE_SUFFIX, scale
            continue
        if cast is not None and t.dtype == torch.float32 and t.dim() >= 2:
            t = t.to(cast)
        yield name, t


def aligned_order(bucket: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """The bucket with wider elements first. SGLang views each tensor out of the bucket's flat bytes, which needs
    its byte offset divisible by its element size (a float32 after an odd number of bf16 or fp8 elements cannot be
    viewed): in this order every offset is a sum of sizes of equal or wider elements."""
    return sorted(bucket, key=lambda nt: -nt[1].element_size())


def _engine_dtype(name: str) -> torch.dtype | None:
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "half": torch.float16}.get(name)


FP8_QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                           "weight_block_size": [128, 128]}
"""config.json's quantization_config of DeepSeek-V3's FP8 release (rollout.sglang.quantization=fp8)."""


def write_engine_dir(model_cfg, out_dir: Path, dtype: torch.dtype = torch.bfloat16, quantization: str = "none"
                     ) -> Path:
    """A directory SGLang can start from with dummy weights (`load_format=dummy`): the config files of a checkpoint
    (model.checkpoint.write_config_files), no weights (they come by `update_weights`); `quantization="fp8"` adds
    V3's FP8 quantization_config, so SGLang builds its FP8 layers."""
    from r1moe.model.checkpoint import write_config_files

    if quantization not in ("none", "fp8"):
        raise ValueError(f"quantization={quantization!r}: expected none or fp8")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_config_files(model_cfg, out_dir, dtype,
                       extra={"quantization_config": FP8_QUANTIZATION_CONFIG} if quantization == "fp8" else None)
    return out_dir


DIRECT_LOADER = f"{__name__}.load_direct"
"""SGLang's custom weight loader (its import path) for `rollout.sglang.weight_loader: direct`."""


def resolve_direct_loader(settings, config: dict, nccl_sync: bool) -> dict | None:
    """The served model's config.json where `weight_loader` resolves to direct, else None (SGLang's own loader)."""
    reasons = []
    if config.get("model_type") != "deepseek_v3":
        reasons.append(f"model_type {config.get('model_type')!r} (direct packs the DeepSeek-V3 architecture)")
    if not settings.direct_fits:
        reasons.append(f"tp={settings.tp}, ep={settings.ep}, quantization={settings.quantization} (direct copies "
                       f"whole, unsharded, unquantized parameters)")
    if nccl_sync:
        reasons.append("SGLang on GPUs of its own (the weights go by NCCL broadcast)")
    if settings.weight_loader == "direct" and reasons:
        raise ValueError("rollout.sglang.weight_loader=direct cannot serve " + "; ".join(reasons)
                         + ": use weight_loader: sglang or auto")
    if settings.weight_loader == "sglang" or reasons:
        return None
    return config


_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


class Packed:
    """One SGLang parameter: the HF tensors whose row-major bytes, in order, are its bytes."""

    __slots__ = ("name", "parts", "shape")

    def __init__(self, name: str, shape: tuple[int, ...], parts: list[torch.Tensor]):
        self.name, self.shape, self.parts = name, shape, parts

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    @property
    def nbytes(self) -> int:
        return sum(p.numel() for p in self.parts) * self.dtype.itemsize


class DirectPacker:
    """HF-named tensors (any order, as the trainer exports them) -> SGLang's DeepSeek-V3 parameters at tp = 1
    (sglang/srt/models/deepseek_common/deepseek_weight_loader.py, what its loader builds from the same tensors):
    - `mlp.experts.{e}.{gate,up}_proj` -> `mlp.experts.w13_weight` [E, 2 I, H] (gate then up, per expert),
      `mlp.experts.{e}.down_proj` -> `mlp.experts.w2_weight` [E, H, I];
    - `{mlp,mlp.shared_experts}.{gate,up}_proj` -> `gate_up_proj` (gate rows then up rows);
    - with q_lora_rank: `self_attn.q_a_proj` + `self_attn.kv_a_proj_with_mqa` -> `fused_qkv_a_proj_with_mqa`;
    - everything else as it is; layers past num_hidden_layers (multi-token prediction) are not served and dropped,
      as SGLang's loader drops them.
    A fused parameter is handed on once all its parts arrived; `finish` names any left incomplete."""

    def __init__(self, config: dict):
        self.layers = int(config["num_hidden_layers"])
        self.experts = int(config.get("n_routed_experts") or 0)
        self.fuse_qkv_a = config.get("q_lora_rank") is not None
        self.pending: dict[str, _Pending] = {}  # SGLang parameter -> its parts so far

    def slot(self, name: str) -> tuple[str, int, int] | None:
        """(SGLang parameter, index of this tensor among its parts, number of parts), None: not served."""
        m = _LAYER.fullmatch(name)
        if m is None:
            return name, 0, 1
        layer, rest = int(m[1]), m[2]
        if layer >= self.layers:
            return None
        prefix = f"model.layers.{layer}."
        if self.fuse_qkv_a and rest in ("self_attn.q_a_proj.weight", "self_attn.kv_a_proj_with_mqa.weight"):
            return prefix + "self_attn.fused_qkv_a_proj_with_mqa.weight", int("kv_a" in rest), 2
        for mlp in ("mlp.", "mlp.shared_experts."):
            if rest in (mlp + "gate_proj.weight", mlp + "up_proj.weight"):
                return prefix + mlp + "gate_up_proj.weight", int(rest.endswith("up_proj.weight")), 2
        expert = _EXPERT.fullmatch(rest)
        if expert:
            e, proj = int(expert[1]), expert[2]
            if not 0 <= e < self.experts:
                raise ValueError(f"weight sync: {name}: expert {e} of n_routed_experts={self.experts}")
            if proj == "down_proj":
                return prefix + "mlp.experts.w2_weight", e, self.experts
            return prefix + "mlp.experts.w13_weight", 2 * e + (proj == "up_proj"), 2 * self.experts
        return name, 0, 1

    def add(self, name: str, t: torch.Tensor) -> Iterator[Packed]:
        where = self.slot(name)
        if where is None:
            return
        target, index, count = where
        if count == 1:
            yield Packed(target, tuple(t.shape), [t])
            return
        pending = self.pending.get(target)
        if pending is None:
            pending = self.pending[target] = _Pending(count, t)
        parts = pending.parts
        if parts[index] is not None:
            raise ValueError(f"weight sync: {name} sent twice")
        first = pending.first
        if t.dim() != 2 or t.dtype != first.dtype or t.shape[1:] != first.shape[1:]:
            raise ValueError(f"weight sync: {name} {tuple(t.shape)} {t.dtype} differs from the other parts of "
                             f"{target}")
        parts[index] = t
        pending.left -= 1
        if not pending.left:
            del self.pending[target]
            rows, cols = sum(p.shape[0] for p in parts), parts[0].shape[1]
            if target.endswith(("w13_weight", "w2_weight")):  # every expert the same [rows, cols]
                if any(p.shape != first.shape for p in parts):
                    raise ValueError(f"weight sync: the experts of {target} differ in shape")
                shape = (self.experts, rows // self.experts, cols)
            else:
                shape = (rows, cols)
            yield Packed(target, shape, parts)

    def finish(self) -> None:
        if self.pending:
            target, pending = next(iter(self.pending.items()))
            raise ValueError(f"weight sync ended with {len(self.pending)} of SGLang's parameters incomplete, e.g. "
                             f"{target}: {pending.left} of its {len(pending.parts)} HF tensors never came")


class _Pending:
    """A fused parameter's parts so far (None: not yet come), how many are still to come, and the first to arrive
    (the others must match its dtype and row width)."""

    __slots__ = ("first", "left", "parts")

    def __init__(self, count: int, first: torch.Tensor):
        self.parts: list[torch.Tensor | None] = [None] * count
        self.left, self.first = count, first


def direct_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], config: dict, dtype: str, limit_bytes: float
                   ) -> Iterator[tuple[list[Packed], bool, bool]]:
    """HF-named tensors (any order) -> (bucket, first, final): SGLang's parameters packed whole (`DirectPacker`,
    fp32 matrices in the engine's `dtype`), a bucket handed on once it holds `limit_bytes`; the last one (maybe
    empty) has final=True, and the packer's completeness check has run before it."""
    packer, bucket, size, first = DirectPacker(config), [], 0, True
    for name, t in engine_tensors(named_tensors, dtype, None):
        for group in packer.add(name, t):
            bucket.append(group)
            size += group.nbytes
            if size >= limit_bytes:
                yield bucket, first, False
                bucket, size, first = [], 0, False
    packer.finish()
    yield bucket, first, True


ALIGN = 256


def pack_direct(bucket: list[Packed], device: torch.device) -> tuple[dict, torch.Tensor]:
    """({"tensors": [[name, dtype, shape, byte offset], ...]}, one uint8 tensor on `device` holding them all,
    each at an offset aligned to 256 bytes). One concatenation: a copy per part would cost more in Python than the
    copying does on a GPU (2.5k HF tensors in a 1.8B MoE)."""
    spec, pieces, offset = [], [], 0
    zeros = torch.zeros(ALIGN, dtype=torch.uint8, device=device)
    for p in bucket:
        spec.append([p.name, str(p.dtype).removeprefix("torch."), list(p.shape), offset])
        pieces += [part.reshape(-1).view(torch.uint8) for part in p.parts]
        pad = -p.nbytes % ALIGN
        if pad:
            pieces.append(zeros[:pad])
        offset += p.nbytes + pad
    if not pieces:
        return {"tensors": spec}, zeros
    pieces = [x.to(device, non_blocking=True) if x.device != device else x for x in pieces]
    return {"tensors": spec}, torch.cat(pieces)


# ------------------------------------------------------------------ the direct format, inside SGLang's scheduler
SHARED = ".mlp.shared_experts."
"""SGLang may fuse the shared expert into the routed ones' kernel as expert n_routed (`num_fused_shared_experts`)."""


class _Params:
    """SGLang's parameters by every name they go by (tied ones under each), cached on the model."""

    def __init__(self, model):
        self.by_name = dict(model.named_parameters(remove_duplicate=False))
        self.unique = dict(model.named_parameters())


def _params(model) -> _Params:
    params = getattr(model, "_r1moe_params", None)
    if params is None:
        params = model._r1moe_params = _Params(model)
    return params


class _Written:
    """What one sync has written: parameters (by identity: a tied parameter under any of its names), and the fused
    expert parameters whose shared-expert slot is still to come."""

    def __init__(self):
        self.ids: set[int] = set()
        self.routed_only: set[str] = set()  # fused expert parameters whose routed experts were written
        self.shared: set[str] = set()  # ... and those whose shared-expert slot was (the two come in either order)


def _check_servable(model) -> None:
    if getattr(model, "_r1moe_checked", False):
        return
    if getattr(model, "quant_config", None) is not None:
        raise RuntimeError("rollout.sglang.weight_loader=direct: SGLang serves this model quantized; the direct "
                           "loader copies unquantized parameters only (use weight_loader: sglang)")
    for name, module in model.named_modules():
        if not hasattr(module, "w13_weight"):
            continue
        if getattr(module, "moe_tp_size", 1) != 1 or getattr(module, "moe_ep_size", 1) != 1:
            raise RuntimeError(f"rollout.sglang.weight_loader=direct: {name} is sharded over SGLang's TP/EP ranks "
                               f"(use weight_loader: sglang)")
        method = getattr(module, "quant_method", None)
        if getattr(module, "use_padded_loading", False) or getattr(method, "load_up_proj_weight_first", False):
            raise RuntimeError(f"rollout.sglang.weight_loader=direct: {name}'s MoE kernel keeps its expert weights in "
                               f"another layout (padded or up-projection first); use weight_loader: sglang")
    model._r1moe_checked = True


def _fused_shared_slot(params: _Params, name: str) -> str | None:
    """SGLang fused the shared expert into the routed experts: the parameter whose last expert slot takes it."""
    if SHARED not in name:
        return None
    prefix, rest = name.split(SHARED)
    target = {"gate_up_proj.weight": "w13_weight", "down_proj.weight": "w2_weight"}.get(rest)
    fused = f"{prefix}.mlp.experts.{target}"
    return fused if target and fused in params.by_name else None


def _copy(params: _Params, name: str, src: torch.Tensor, written: _Written) -> None:
    """Copy `src` into SGLang's parameter `name` (or the fused shared-expert slot standing for it)."""
    where = f"rollout.sglang.weight_loader=direct: {name}"
    param = params.by_name.get(name)
    if param is None:
        fused = _fused_shared_slot(params, name)
        if fused is None:
            raise KeyError(f"rollout.sglang.weight_loader=direct: SGLang's model has no parameter {name!r}")
        param = params.by_name[fused]
        if tuple(param.shape[1:]) != tuple(src.shape):
            raise ValueError(f"{where} {tuple(src.shape)} does not fit the fused shared-expert slot of {fused} "
                             f"{tuple(param.shape)}")
        param.data[-1].copy_(src)
        written.shared.add(fused)
        return
    same_rows = param.dim() == src.dim() and tuple(param.shape[1:]) == tuple(src.shape[1:])
    if tuple(param.shape) == tuple(src.shape):
        param.data.copy_(src)
    elif same_rows and name.endswith(("embed_tokens.weight", "lm_head.weight")) and param.shape[0] > src.shape[0]:
        param.data[: src.shape[0]].copy_(src)  # SGLang pads the vocabulary
    elif same_rows and name.endswith(("w13_weight", "w2_weight")) and param.shape[0] == src.shape[0] + 1:
        param.data[:-1].copy_(src)  # the routed experts; the last slot is the fused shared expert's
        written.routed_only.add(name)
    else:
        raise ValueError(f"{where}: sent {tuple(src.shape)}, SGLang's parameter is {tuple(param.shape)}")
    written.ids.add(id(param))


def load_direct(model, named_tensors) -> None:
    """SGLang's custom weight loader entry point: (model, [(spec JSON, flat uint8 tensor), ...])."""
    _check_servable(model)
    params = _params(model)
    for spec_json, flat in named_tensors:
        spec = json.loads(spec_json)
        if spec.get("first") or not hasattr(model, "_r1moe_written"):
            model._r1moe_written = _Written()
        written = model._r1moe_written
        kv_b = []
        for name, dtype, shape, offset in spec["tensors"]:
            dt = getattr(torch, dtype)
            nbytes = math.prod(shape) * dt.itemsize
            _copy(params, name, flat[offset: offset + nbytes].view(dt).view(shape), written)
            if name.endswith("kv_b_proj.weight"):
                kv_b.append(name)
        if kv_b and hasattr(model, "post_load_weights"):
            model.post_load_weights(weight_names=kv_b)
        if spec.get("final"):
            _check_complete(params, written)
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the sender frees (and may reuse) the bucket's memory as soon as this returns


def _check_complete(params: _Params, written: _Written) -> None:
    missing = sorted(n for n, p in params.unique.items() if id(p) not in written.ids)
    missing += sorted(f"{n} (its fused shared-expert slot)" for n in written.routed_only - written.shared)
    if missing:
        raise RuntimeError(f"rollout.sglang.weight_loader=direct: the weight sync left {len(missing)} of SGLang's "
                           f"parameters unwritten (they would keep stale weights): {missing[:6]}")

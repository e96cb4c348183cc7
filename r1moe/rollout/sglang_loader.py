"""The receiving half of `rollout.sglang.weight_loader: direct`: runs inside SGLang's scheduler process, where SGLang
calls it by its import path (`custom_weight_loader`) with what `SGLangEngine.update_weights` sent.

What arrives: one (spec, flat) pair per bucket. `flat` is a uint8 CUDA tensor (one CUDA IPC handle) holding
parameters already in SGLang's layout (r1moe/rollout/sglang_engine.py `direct_groups`: routed experts stacked into
`mlp.experts.w13_weight` / `w2_weight`, gate/up into `gate_up_proj`, q_a/kv_a into `fused_qkv_a_proj_with_mqa`);
`spec` is JSON: {"tensors": [[name, dtype, shape, byte offset], ...], "first": bool, "final": bool}. Each tensor is
copied into the parameter of that name, one copy per parameter instead of SGLang's per-HF-tensor loader calls. Then
the step SGLang's own loader ends with: `post_load_weights` recomputes MLA's absorbed w_kc / w_vc from the new
kv_b_proj.

Checked, with an error naming the parameter: a name SGLang's model lacks, a shape that does not fit (the one
allowed difference: a longer first dimension, SGLang's vocabulary padding of the embedding and LM head, or the slot
after the routed experts where SGLang fuses the shared expert), and, at the last bucket of a sync, a parameter of the
model that the sync did not write (it would keep stale weights).
"""

from __future__ import annotations

import json
import math

import torch

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
    missing += sorted(f"{n} (its routed experts)" for n in written.shared - written.routed_only)
    if missing:
        raise RuntimeError(f"rollout.sglang.weight_loader=direct: the weight sync left {len(missing)} of SGLang's "
                           f"parameters unwritten (they would keep stale weights): {missing[:6]}")

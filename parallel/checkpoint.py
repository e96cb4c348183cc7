"""Megatron distributed checkpoints (torch_dist format) of the model and its distributed optimizer.

A dist checkpoint stores global tensors with their shard offsets, so it loads into any TP/EP/PP/DP layout of the
same model (megatron.core.dist_checkpointing re-shards on load). Upstream: megatron-core 0.19
`examples/run_simple_mcore_train_loop.py` (save/load), `MegatronOptimizer.sharded_state_dict`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .model import unwrap

# 'fully_reshardable': optimizer state in canonical per-parameter form, so a checkpoint loads under another
# TP/PP/EP/DP layout. megatron-core 0.19's default ('fully_sharded_model_space') is deprecated and its
# flattened ShardedTensors are rejected at save ("ShardedTensor.flattened_range is not supported").
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


def _model_sharded_state_dict(models: list[torch.nn.Module]) -> dict:
    if len(models) != 1:
        raise ValueError("virtual pipeline stages (several model chunks per rank) are not supported")
    return unwrap(models[0]).sharded_state_dict(prefix="")


def save_dist_checkpoint(models: list[torch.nn.Module], optimizer, path: str | Path, step: int = 0) -> None:
    """Collective: every rank calls it. optimizer=None saves the model only."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {"model": _model_sharded_state_dict(models), "step": step}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state["model"], metadata=_OPTIM_METADATA)
    dist_checkpointing.save(sharded_state_dict=state, checkpoint_dir=str(path))


def load_dist_checkpoint(models: list[torch.nn.Module], optimizer, path: str | Path) -> int:
    """Collective. Loads the model (and optimizer state if given) in place; returns the saved step."""
    from megatron.core import dist_checkpointing

    model_sd = _model_sharded_state_dict(models)
    state = {"model": model_sd, "step": 0}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=_OPTIM_METADATA)
    loaded = dist_checkpointing.load(sharded_state_dict=state, checkpoint_dir=str(path))
    result = unwrap(models[0]).load_state_dict(loaded["model"], strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks model tensors {missing[:8]}")
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    return int(loaded.get("step", 0))

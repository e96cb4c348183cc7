"""r1moe.parallel: the megatron-core + Transformer Engine backend (TP/EP/PP/DP, FP8).

CPU-importable (no megatron needed): ParallelConfig, MegatronOptions, the HF<->megatron name table and its
sharding functions (mapping), config translation (mcore_config). HF safetensors directories are read and
written by r1moe.model.hf_io (`HFReader`, `ShardWriter`), the code the reference model's checkpoints use. The GPU
API imports megatron lazily on first use:

    from r1moe.parallel import (ParallelConfig, MegatronOptions, initialize_parallel, build_mcore_model,
                                build_optimizer, train_step, forward_only, export_hf_weights,
                                save_dist_checkpoint, load_dist_checkpoint)

See parallel/README.md for the trainer-facing contract.
"""

from .config import ParallelConfig
from .mapping import RULES, hf_names, hf_to_mcore_state, mcore_to_hf_state, stage_entries
from .mcore_config import MegatronOptions, transformer_config_kwargs

_LAZY = {
    "initialize_parallel": "model", "destroy_parallel": "model", "build_mcore_model": "model",
    "load_hf_weights": "model", "rank_coords": "model", "unwrap": "model",
    "build_optimizer": "train", "train_step": "train", "forward_only": "train", "set_learning_rate": "train",
    "StepResult": "train", "all_finite": "train",
    "export_hf_weights": "export",
    "save_dist_checkpoint": "checkpoint", "load_dist_checkpoint": "checkpoint",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["RULES", "MegatronOptions", "ParallelConfig", "StepResult", "all_finite", "build_mcore_model",
           "build_optimizer", "destroy_parallel", "export_hf_weights", "forward_only",
           "hf_names", "hf_to_mcore_state", "initialize_parallel", "load_dist_checkpoint", "load_hf_weights",
           "mcore_to_hf_state", "rank_coords", "save_dist_checkpoint", "set_learning_rate", "stage_entries",
           "train_step", "transformer_config_kwargs", "unwrap"]

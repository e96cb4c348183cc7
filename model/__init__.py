"""r1moe.model: the reference DeepSeek-V3 MoE transformer and dense GQA students in pure PyTorch.

State-dict names are HF checkpoint names, so `from_pretrained`/`save_pretrained` read and write HF safetensors
directly. No torch.distributed, no megatron: parallelism is applied from outside (r1moe.parallel).
"""

from .config import PRESETS, ModelConfig, count_params, get_preset

__all__ = ["PRESETS", "ModelConfig", "count_params", "get_preset"]

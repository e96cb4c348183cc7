"""r1moe.model: the reference DeepSeek-V3 MoE transformer and dense GQA students in pure PyTorch.

State-dict names are HF checkpoint names, so `from_pretrained`/`save_pretrained` read and write HF safetensors
directly. No torch.distributed, no megatron: parallelism is applied from outside (r1moe.parallel).
"""

from .checkpoint import check_checkpoint_files, from_pretrained, save_pretrained
from .config import PRESETS, ModelConfig, count_params, get_preset
from .layers import KVCache
from .transformer import CausalLM, ModelOutput, build_model, hf_tensor_slot, load_hf_tensor, resolve_device

__all__ = ["PRESETS", "CausalLM", "KVCache", "ModelConfig", "ModelOutput", "build_model", "check_checkpoint_files",
           "count_params", "from_pretrained", "get_preset", "hf_tensor_slot", "load_hf_tensor", "resolve_device",
           "save_pretrained"]

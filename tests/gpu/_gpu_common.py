"""Shared pieces of the GPU tests: the skip guard, test model shapes, deterministic HF weights, result records.

Results: when R1MOE_GPU_OUT names a directory, each check appends its measured numbers to
$R1MOE_GPU_OUT/<name>.json (the GPU runs copy them into benchmarks/results/ with the device named).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from r1moe.model import ModelConfig, build_model, get_preset


def require_gpu_stack(min_gpus: int = 1) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: the megatron backend runs on GPUs only")
    if torch.cuda.device_count() < min_gpus:
        pytest.skip(f"needs {min_gpus} GPUs, found {torch.cuda.device_count()}")
    try:
        import megatron.core  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except ImportError as e:
        pytest.skip(f"needs megatron-core and Transformer Engine ({e})")


def record(name: str, payload: dict) -> None:
    out = os.environ.get("R1MOE_GPU_OUT")
    if not out:
        return
    path = Path(out) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(payload)
    path.write_text(json.dumps(data, indent=1, default=str))


_TINY_MOE = get_preset("tiny-moe")
_TINY_DENSE = get_preset("tiny-dense")

# Every architecture path of the megatron backend, at CPU-test size.
PARITY_CONFIGS: dict[str, ModelConfig] = {
    # group-limited routing (4 groups of 2, keep 2 groups: 4 // 2 = top-2 group score as in V3), scaling 2.5,
    # dense first layer, q LoRA, MTP
    "moe-grouped": _TINY_MOE.replace(n_group=4, topk_group=2, num_experts_per_tok=4, routed_scaling_factor=2.5),
    # YaRN RoPE with mscale_all_dim (softmax scale mscale^2 / sqrt(d)) as in DeepSeek-V3's config
    "moe-yarn": _TINY_MOE.replace(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256,
                                                "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                                                "mscale_all_dim": 1.0}),
    # no q LoRA (Moonlight / V2-Lite shape): plain q projection, no q norm
    "moe-no-q-lora": _TINY_MOE.replace(q_lora_rank=None),
    # dense students
    "qwen2": _TINY_DENSE,
    "llama3": _TINY_DENSE.replace(model_type="llama", attention_bias=False, tie_word_embeddings=False,
                                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}


def hf_weights(cfg: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Random HF-named weights (CPU, deterministic): norms and biases perturbed away from 1 / 0 so that a norm
    or bias mapped to the wrong place changes the logits."""
    model = build_model(cfg, dtype=torch.float32, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    out = {}
    for name, t in model.state_dict().items():
        t = t.clone()
        if name.endswith(("norm.weight", "enorm.weight", "hnorm.weight")) or "layernorm" in name:
            t = 1.0 + 0.2 * torch.randn(t.shape, generator=g)
        elif name.endswith(".bias"):
            t = 0.1 * torch.randn(t.shape, generator=g)
        elif name.endswith("e_score_correction_bias"):
            t = 0.05 * torch.randn(t.shape, generator=g)
        out[name] = t if name.endswith("e_score_correction_bias") else t.to(dtype)
    # tied/copied names must stay copies of their source
    from r1moe.parallel.mapping import hf_copies

    for copy_name, src in hf_copies(cfg).items():
        out[copy_name] = out[src]
    return out


@dataclass
class Batch:
    """A micro-batch as train_step / forward_only see it (input_ids) plus the SFT targets and mask."""

    input_ids: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor


def lm_batches(vocab: int, num: int, batch: int, seq: int, seed: int = 0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        tokens = torch.randint(3, vocab, (batch, seq + 1), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.bool)
        mask[:, : seq // 4] = False  # a "prompt" that the loss skips
        out.append(Batch(tokens[:, :-1].cuda(), tokens[:, 1:].cuda(), mask.cuda()))
    return out

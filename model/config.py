"""ModelConfig: one dataclass for DeepSeek-V3 MoE models and the dense Qwen2/Llama students.

Field names are the HF `config.json` keys (DeepseekV3Config, Qwen2Config, LlamaConfig), so a checkpoint's
config loads 1:1 (`ModelConfig.from_hf_dict`) and writes back (`to_hf_dict`). Presets hold the released
configs (DeepSeek-V3 671B, Moonlight-16B-A3B shape, the paper's six distilled students) and tiny CPU shapes.
Parameter counts are computed analytically from the config: nothing is allocated.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

ModelType = Literal["deepseek_v3", "qwen2", "llama"]

ARCHITECTURES = {
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
}

# Keys HF configs carry that do not change the math of the forward pass; accepted and dropped on load.
IGNORED_HF_KEYS = frozenset({
    "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype", "use_cache", "attention_dropout",
    "initializer_range", "pretraining_tp", "mlp_bias", "use_sliding_window", "sliding_window", "max_window_layers",
    "layer_types", "quantization_config", "aux_loss_alpha", "seq_aux", "ep_size", "moe_layer_freq", "topk_method",
    "scoring_func", "model_type", "_name_or_path", "output_router_logits", "router_aux_loss_coef", "pad_token_id",
    "bos_token_id", "eos_token_id", "rope_interleave", "head_dim", "rope_parameters", "use_mla", "is_encoder_decoder",
    "hidden_act", "qk_head_dim", "id2label", "label2id", "problem_type", "tie_encoder_decoder", "return_dict", "chunk_size_feed_forward",
})


@dataclass
class ModelConfig:
    """Architecture of one causal LM. `model_type` picks DeepSeek-V3 (MLA + DeepSeekMoE) or a dense GQA student."""

    model_type: ModelType = "deepseek_v3"
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    """FFN width of dense layers (all layers of a dense model; the first `first_k_dense_replace` of an MoE)."""
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int = 128
    """GQA kv heads for dense models; MLA ignores it (every head has its own k/v from the latent)."""
    head_dim: int | None = None
    """Dense attention head size; None means hidden_size // num_attention_heads."""
    max_position_embeddings: int = 163840
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    """None, YaRN ({"type": "yarn", factor, original_max_position_embeddings, beta_fast, beta_slow, mscale,
    mscale_all_dim}) or Llama-3 ({"rope_type": "llama3", factor, low_freq_factor, high_freq_factor, ...})."""
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    """Bias on q/k/v projections (Qwen2: True)."""
    hidden_act: str = "silu"
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    # --- DeepSeek-V3 MLA ---
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # --- DeepSeekMoE ---
    moe_intermediate_size: int = 2048
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 3
    num_nextn_predict_layers: int = 0
    """MTP depth D (DeepSeek-V3 §2.2); the released checkpoint has 1."""
    # --- training-side knobs that are not HF keys (kept out of config.json) ---
    aux_loss_alpha: float = 0.0
    """Sequence-wise balance loss weight alpha (V3 eq. 17-20; V3 used 1e-4). 0 disables it."""

    def __post_init__(self) -> None:
        if self.model_type not in ARCHITECTURES:
            raise ValueError(f"model_type={self.model_type!r}: expected one of {sorted(ARCHITECTURES)}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.is_moe:
            if self.n_routed_experts % self.n_group:
                raise ValueError(f"n_routed_experts={self.n_routed_experts} must be divisible by n_group={self.n_group}")
            if not 1 <= self.topk_group <= self.n_group:
                raise ValueError(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
            per_group = self.n_routed_experts // self.n_group
            if self.num_experts_per_tok > self.topk_group * per_group:
                raise ValueError(
                    f"num_experts_per_tok={self.num_experts_per_tok} exceeds topk_group*experts_per_group="
                    f"{self.topk_group * per_group}")
            if self.first_k_dense_replace > self.num_hidden_layers:
                raise ValueError(f"first_k_dense_replace={self.first_k_dense_replace} > num_hidden_layers")
        else:
            if self.num_attention_heads % self.num_key_value_heads:
                raise ValueError(f"num_attention_heads={self.num_attention_heads} must be divisible by "
                                 f"num_key_value_heads={self.num_key_value_heads}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("yarn", "llama3", "default", "linear"):
                raise ValueError(f"rope_scaling type {kind!r}: expected yarn, llama3, linear or default")

    # ------------------------------------------------------------------ derived
    @property
    def is_moe(self) -> bool:
        return self.model_type == "deepseek_v3"

    @property
    def architecture(self) -> str:
        return ARCHITECTURES[self.model_type]

    @property
    def dense_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.is_moe and layer_idx >= self.first_k_dense_replace

    def moe_layer_ids(self) -> list[int]:
        """The main model's MoE layers (MTP layers excluded), in order."""
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from an HF config dict. Unknown keys and missing required keys are errors naming the key."""
        d = dict(d)
        model_type = d.get("model_type")
        if model_type is None:
            arch = (d.get("architectures") or [None])[0]
            model_type = {v: k for k, v in ARCHITECTURES.items()}.get(arch)
        if model_type not in ARCHITECTURES:
            raise ValueError(f"{source}: unsupported model_type {model_type!r} (architectures="
                             f"{d.get('architectures')}); supported: {sorted(ARCHITECTURES)}")
        # transformers>=5 writes rope settings as `rope_parameters`; fold them back into the classic keys.
        rp = d.get("rope_parameters")
        if isinstance(rp, dict):
            d.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
            if d.get("rope_scaling") is None and rp.get("rope_type", "default") != "default":
                d["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
        names = {f.name for f in dataclasses.fields(cls)} - {"aux_loss_alpha"}
        required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
        if model_type != "deepseek_v3":
            required += ("intermediate_size",)
        for key in required:
            if key not in d:
                raise ValueError(f"{source}: missing required key {key!r}")
        kwargs: dict[str, Any] = {"model_type": model_type}
        for key, value in d.items():
            if key in names:
                kwargs[key] = value
            elif key not in IGNORED_HF_KEYS:
                raise ValueError(f"{source}: unknown key {key!r} for model_type {model_type!r}")
        for k in ("bos_token_id", "eos_token_id", "pad_token_id", "head_dim"):
            if k in d and k in names:
                kwargs[k] = d[k]
        if model_type == "deepseek_v3":
            # transformers writes head_dim = qk_rope_head_dim for DeepSeek-V3; MLA does not use head_dim.
            kwargs.pop("head_dim", None)
        else:
            if kwargs.get("head_dim") == d["hidden_size"] // d["num_attention_heads"]:
                kwargs.pop("head_dim")  # the default; keeps round trips equal
            kwargs.setdefault("q_lora_rank", None)
            kwargs.setdefault("num_key_value_heads", d.get("num_attention_heads"))
            kwargs.setdefault("attention_bias", model_type == "qwen2")
            kwargs.setdefault("first_k_dense_replace", 0)
            kwargs.setdefault("num_nextn_predict_layers", 0)
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: config.json not found") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
        return cls.from_hf_dict(d, source=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json `transformers.AutoConfig` reads (only keys relevant to the model type)."""
        common = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
                  "tie_word_embeddings", "attention_bias", "hidden_act", "bos_token_id", "eos_token_id",
                  "pad_token_id", "initializer_range"]
        moe = ["q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
               "moe_intermediate_size", "n_shared_experts", "n_routed_experts", "num_experts_per_tok", "n_group",
               "topk_group", "routed_scaling_factor", "norm_topk_prob", "first_k_dense_replace",
               "num_nextn_predict_layers"]
        keys = common + (moe if self.is_moe else [])
        d: dict[str, Any] = {"architectures": [self.architecture], "model_type": self.model_type}
        d.update({k: getattr(self, k) for k in keys})
        if self.is_moe:
            d.update(scoring_func="sigmoid", topk_method="noaux_tc", moe_layer_freq=1, rope_interleave=True)
        elif self.head_dim is not None:
            d["head_dim"] = self.head_dim
        return copy.deepcopy(d)  # callers (transformers.AutoConfig) mutate nested dicts such as rope_scaling

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(copy.deepcopy(self), **changes)


# ---------------------------------------------------------------------------------------------- presets
_V3_YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def _dense(model_type: ModelType, **kw: Any) -> ModelConfig:
    base = {"model_type": model_type, "first_k_dense_replace": 0, "num_nextn_predict_layers": 0,
            "attention_bias": model_type == "qwen2", "q_lora_rank": None}
    base.update(kw)
    return ModelConfig(**base)


PRESETS: dict[str, ModelConfig] = {
    # deepseek-ai/DeepSeek-V3 config.json (released values). MTP (1 layer) is part of the checkpoint.
    "deepseek-v3-671b": ModelConfig(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1,
        n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4, routed_scaling_factor=2.5,
        norm_topk_prob=True, first_k_dense_replace=3, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, rope_theta=10000.0, rope_scaling=dict(_V3_YARN),
        max_position_embeddings=163840, rms_norm_eps=1e-6, num_nextn_predict_layers=1, bos_token_id=0,
        eos_token_id=1),
    # DeepSeek-V3 architecture at the Moonlight-16B-A3B shape (moonshotai/Moonlight-16B-A3B config.json).
    "deepseek-v3-16b-a3b": ModelConfig(
        vocab_size=163840, hidden_size=2048, intermediate_size=11264, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2,
        n_routed_experts=64, num_experts_per_tok=6, n_group=1, topk_group=1, routed_scaling_factor=2.446,
        norm_topk_prob=True, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, rope_theta=50000.0, rope_scaling=None, max_position_embeddings=8192,
        rms_norm_eps=1e-5, num_nextn_predict_layers=0, bos_token_id=163584, eos_token_id=163585),
    # CPU-sized DeepSeek-V3: every feature on (group-limited routing, q LoRA, dense first layer, MTP).
    "tiny-moe": ModelConfig(
        vocab_size=512, hidden_size=128, intermediate_size=384, moe_intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
        num_experts_per_tok=2, n_group=2, topk_group=2, routed_scaling_factor=1.0, norm_topk_prob=True,
        first_k_dense_replace=1, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, rope_theta=10000.0, max_position_embeddings=1024, rms_norm_eps=1e-6,
        num_nextn_predict_layers=1, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False),
    # The paper's six distillation students (v1 §2.4): base models' released configs.
    "qwen2.5-1.5b": _dense("qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                           num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                           max_position_embeddings=131072, rope_theta=1e6, rms_norm_eps=1e-6,
                           tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643),
    "qwen2.5-7b": _dense("qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                         num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                         max_position_embeddings=131072, rope_theta=1e6, rms_norm_eps=1e-6,
                         bos_token_id=151643, eos_token_id=151643),
    "qwen2.5-14b": _dense("qwen2", vocab_size=152064, hidden_size=5120, intermediate_size=13824,
                          num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
                          max_position_embeddings=131072, rope_theta=1e6, rms_norm_eps=1e-5,
                          bos_token_id=151643, eos_token_id=151643),
    "qwen2.5-32b": _dense("qwen2", vocab_size=152064, hidden_size=5120, intermediate_size=27648,
                          num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
                          max_position_embeddings=131072, rope_theta=1e6, rms_norm_eps=1e-5,
                          bos_token_id=151643, eos_token_id=151643),
    "llama3.1-8b": _dense("llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                          num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                          max_position_embeddings=131072, rope_theta=500000.0, rope_scaling=dict(_LLAMA3_ROPE),
                          rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001),
    "llama3.3-70b": _dense("llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                           num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                           max_position_embeddings=131072, rope_theta=500000.0, rope_scaling=dict(_LLAMA3_ROPE),
                           rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=[128001, 128008, 128009]),
    "tiny-dense": _dense("qwen2", vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; available: {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


# ---------------------------------------------------------------------------------------------- param counts
def _attention_params(c: ModelConfig) -> int:
    h = c.hidden_size
    if c.is_moe:
        n = c.num_attention_heads
        q = (h * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * n * c.qk_head_dim) if c.q_lora_rank \
            else h * n * c.qk_head_dim
        kv = h * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank \
            + c.kv_lora_rank * n * (c.qk_nope_head_dim + c.v_head_dim)
        o = n * c.v_head_dim * h
        bias = (c.q_lora_rank or 0) + c.kv_lora_rank + c.qk_rope_head_dim + h if c.attention_bias else 0
        return q + kv + o + bias
    d = c.dense_head_dim
    q, kv = c.num_attention_heads * d, c.num_key_value_heads * d
    bias = (q + 2 * kv) if c.attention_bias else 0
    return h * q + 2 * h * kv + q * h + bias


def _layer_params(c: ModelConfig, layer_idx: int) -> tuple[int, int]:
    """(total, activated-per-token) parameters of one decoder layer."""
    h = c.hidden_size
    attn_norms = _attention_params(c) + 2 * h
    if not c.is_moe_layer(layer_idx):
        mlp = 3 * h * c.intermediate_size
        return attn_norms + mlp, attn_norms + mlp
    expert = 3 * h * c.moe_intermediate_size
    router = c.n_routed_experts * h + c.n_routed_experts  # gate weight + e_score_correction_bias
    total = attn_norms + router + (c.n_routed_experts + c.n_shared_experts) * expert
    active = attn_norms + router + (c.num_experts_per_tok + c.n_shared_experts) * expert
    return total, active


def count_params(c: ModelConfig, include_mtp: bool = False) -> dict[str, int]:
    """Analytic parameter counts. `active_params` counts what one token touches (top-k + shared experts)."""
    h = c.hidden_size
    embed = c.vocab_size * h
    head = 0 if c.tie_word_embeddings else c.vocab_size * h
    total = active = embed + head + h  # + final norm
    for i in range(c.num_hidden_layers):
        t, a = _layer_params(c, i)
        total += t
        active += a
    mtp = 0
    if c.num_nextn_predict_layers:
        # MTP module (V3 §2.2): its own decoder layer (MoE), enorm, hnorm, eh_proj [h, 2h] and head norm;
        # embedding and output head are shared with the main model but the HF checkpoint stores copies.
        t, _ = _layer_params(c, c.num_hidden_layers)
        mtp = c.num_nextn_predict_layers * (t + 3 * h + 2 * h * h)
    out = {"total_params": total, "active_params": active, "embedding_params": embed + head, "mtp_params": mtp}
    if include_mtp:
        out["total_params"] += mtp
    return out

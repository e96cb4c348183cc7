"""ModelConfig + ParallelConfig -> megatron-core `MLATransformerConfig` / `TransformerConfig` and GPTModel kwargs.

Every field that changes the math is set explicitly from our config: MLATransformerConfig's defaults are traps
(q_lora_rank=512, rotary_scaling_factor=40, mscale_all_dim=0.0, rope_type="yarn", ...), and so are
TransformerConfig's (softmax router, aux_loss, allgather dispatcher, learned position embeddings in GPTModel).
`transformer_config_kwargs` is pure (tested on CPU without megatron); `build_transformer_config` instantiates it.

Semantics checked against megatron-core 0.19.2:
- router: `topk_routing_with_score_function` with score_function="sigmoid" gathers sigmoid scores at the top-k of
  (scores + expert_bias), divides by their sum (always: norm_topk_prob must be True) and multiplies by
  moe_router_topk_scaling_factor = routed_scaling_factor; router logits in fp32 (moe_router_dtype="fp32").
- group-limited routing (`group_limited_topk`): a group's score is the sum of its top-(topk // group_topk)
  scores. DeepSeek-V3 sums the top-2 (8 // 4 = 2), so group routing is accepted only where that holds; with
  topk_group == n_group every group is kept and routing is plain top-k.
- MLA softmax scale: mscale(rotary_scaling_factor, mscale_all_dim)^2 / sqrt(qk_head_dim) (MultiLatentAttention
  .__init__); without YaRN we pass rope_type="yarn" with factor 1.0, which is exact RoPE (inv_freq_inter ==
  inv_freq_extra, concentration factor 1) and lets the fused MLA RoPE kernel run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from r1moe.model import ModelConfig

from .config import ParallelConfig
from .mapping import padded_vocab_size

FP8Recipe = Literal["delayed", "tensorwise", "blockwise"]
Recompute = Literal["selective", "full"]


@dataclass(frozen=True)
class MegatronOptions:
    """Training-side knobs of the megatron model (what the recipe's `parallel`/`optim` sections choose)."""

    fp8: FP8Recipe | None = None
    """FP8 GEMMs through Transformer Engine: None (bf16), delayed (per-tensor, amax history), tensorwise
    (per-tensor current scaling) or blockwise (DeepSeek-V3's 1x128 activations / 128x128 weights)."""
    recompute: Recompute | None = None
    """Activation recompute: selective (recompute_modules) or full (every layer, uniform)."""
    recompute_modules: tuple[str, ...] = ("core_attn",)
    mtp_loss_scale: float = 0.1
    """lambda of V3 eq. 25 (0.3 early, 0.1 late in V3 pre-training); only used when the model has MTP layers."""
    expert_bias_rate: float = 1e-3
    """gamma of the aux-loss-free bias update (V3 §2.1.2, 0.001); 0 freezes the routing bias."""
    fused_rope: bool = True
    """Fused MLA RoPE (triton kernel in megatron.core.fusions); the unfused path computes the same rotation."""
    grad_accum_fusion: bool = False
    """Accumulate weight gradients straight into the DDP buffer's main_grad. Off by default: megatron's
    non-TE ColumnParallelLinear (the output layer) then needs APEX's fused_weight_gradient_mlp_cuda, which the
    GPU image lacks (seen on megatron-core 0.19.2: RuntimeError at GPTModel construction)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Escape hatch: more TransformerConfig fields (e.g. {"moe_permute_fusion": False}); applied last."""


def _rope_kwargs_mla(cfg: ModelConfig) -> dict[str, Any]:
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind not in ("default", "yarn"):
        raise ValueError(f"rope_scaling type {kind!r}: megatron MLA supports only YaRN or none")
    if kind == "yarn":
        factor = rs.get("factor") or cfg.max_position_embeddings / rs["original_max_position_embeddings"]
        return {"rope_type": "yarn", "rotary_base": cfg.rope_theta, "rotary_scaling_factor": float(factor),
                "original_max_position_embeddings": int(rs["original_max_position_embeddings"]),
                "beta_fast": float(rs.get("beta_fast") or 32), "beta_slow": float(rs.get("beta_slow") or 1),
                "mscale": float(rs.get("mscale") or 1.0), "mscale_all_dim": float(rs.get("mscale_all_dim") or 0.0)}
    return {"rope_type": "yarn", "rotary_base": cfg.rope_theta, "rotary_scaling_factor": 1.0,
            "original_max_position_embeddings": cfg.max_position_embeddings, "beta_fast": 32.0, "beta_slow": 1.0,
            "mscale": 1.0, "mscale_all_dim": 0.0}


def _router_groups(cfg: ModelConfig) -> tuple[int | None, int | None]:
    if cfg.n_group <= 1 or cfg.topk_group >= cfg.n_group:
        return None, None  # every group selectable: plain top-k
    if cfg.num_experts_per_tok // cfg.topk_group != 2:
        raise ValueError(
            f"group-limited routing with num_experts_per_tok={cfg.num_experts_per_tok}, topk_group="
            f"{cfg.topk_group}: megatron scores a group by its top-{cfg.num_experts_per_tok // cfg.topk_group} "
            f"experts, DeepSeek-V3 by its top-2; only num_experts_per_tok // topk_group == 2 is identical")
    return cfg.n_group, cfg.topk_group


def check_supported(cfg: ModelConfig) -> None:
    """ValueError for architectures the megatron backend cannot reproduce exactly."""
    if cfg.hidden_act != "silu":
        raise ValueError(f"hidden_act={cfg.hidden_act!r}: the megatron backend implements SwiGLU (silu) only")
    if cfg.is_moe:
        if cfg.attention_bias:
            raise ValueError("attention_bias=True: megatron MLA has no projection biases")
        if cfg.num_experts_per_tok > 1 and not cfg.norm_topk_prob:
            raise ValueError("norm_topk_prob=False: megatron's sigmoid router always normalises the top-k weights")
        _router_groups(cfg)
        _rope_kwargs_mla(cfg)
    else:
        rs = cfg.rope_scaling or {}
        kind = rs.get("rope_type", rs.get("type", "default"))
        if kind == "llama3" and (rs.get("low_freq_factor"), rs.get("high_freq_factor"),
                                 rs.get("original_max_position_embeddings")) != (1.0, 4.0, 8192):
            raise ValueError(f"llama3 rope_scaling {rs}: megatron's RotaryEmbedding hard-codes "
                             f"low_freq_factor=1, high_freq_factor=4, original_max_position_embeddings=8192")
        if kind == "yarn":
            raise ValueError("YaRN on a dense model is not wired to megatron's RotaryEmbedding")


def transformer_config_kwargs(cfg: ModelConfig, pcfg: ParallelConfig, opts: MegatronOptions = MegatronOptions(),
                              dtype: torch.dtype = torch.bfloat16) -> tuple[str, dict[str, Any]]:
    """("MLATransformerConfig" | "TransformerConfig", kwargs). Pure: no megatron import."""
    check_supported(cfg)
    L = cfg.num_hidden_layers
    kw: dict[str, Any] = {
        # parallel layout
        "tensor_model_parallel_size": pcfg.tp, "pipeline_model_parallel_size": pcfg.pp,
        "expert_model_parallel_size": pcfg.ep, "expert_tensor_parallel_size": pcfg.expert_tp,
        "context_parallel_size": pcfg.cp, "sequence_parallel": pcfg.sequence_parallel,
        "pipeline_dtype": dtype, "params_dtype": dtype, "bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16,
        # architecture
        "num_layers": L, "hidden_size": cfg.hidden_size, "num_attention_heads": cfg.num_attention_heads,
        "ffn_hidden_size": cfg.intermediate_size, "normalization": "RMSNorm", "layernorm_epsilon": cfg.rms_norm_eps,
        "gated_linear_unit": True, "activation_func": torch.nn.functional.silu, "add_bias_linear": False,
        "hidden_dropout": 0.0, "attention_dropout": 0.0, "init_method_std": cfg.initializer_range,
        "rotary_interleaved": False, "apply_rope_fusion": opts.fused_rope,
        # fusions (same numerics, fewer kernels)
        "bias_activation_fusion": True, "masked_softmax_fusion": True, "bias_dropout_fusion": True, "persist_layer_norm": True,
        "gradient_accumulation_fusion": opts.grad_accum_fusion,
    }
    if pcfg.pp_layers is not None:
        # megatron's layout list: one inner list per stage, 'embedding' first, 'loss' (and MTP) last
        stages = [["decoder"] * n for n in pcfg.pp_layers]
        stages[0] = ["embedding"] + stages[0]
        stages[-1] = stages[-1] + ["mtp"] * cfg.num_nextn_predict_layers + ["loss"]
        kw["pipeline_model_parallel_layout"] = stages
    if cfg.is_moe:
        groups, group_topk = _router_groups(cfg)
        kw.update(
            multi_latent_attention=True, q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
            qk_head_dim=cfg.qk_nope_head_dim, qk_pos_emb_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
            qk_layernorm=True,  # q_a_layernorm / kv_a_layernorm, fused into linear_{q,kv}_up_proj
            kv_channels=cfg.qk_head_dim, num_query_groups=cfg.num_attention_heads,
            cache_mla_latents=False, mla_down_proj_fusion=False,
            **_rope_kwargs_mla(cfg),
            # DeepSeekMoE
            num_moe_experts=cfg.n_routed_experts, moe_ffn_hidden_size=cfg.moe_intermediate_size,
            moe_shared_expert_intermediate_size=(cfg.moe_intermediate_size * cfg.n_shared_experts
                                                 if cfg.n_shared_experts else None),
            moe_shared_expert_overlap=False,
            moe_layer_freq=[1 if cfg.is_moe_layer(i) else 0 for i in range(L)],
            moe_router_topk=cfg.num_experts_per_tok, moe_router_score_function="sigmoid",
            moe_router_pre_softmax=False, moe_router_topk_scaling_factor=cfg.routed_scaling_factor,
            moe_router_enable_expert_bias=True, moe_router_bias_update_rate=opts.expert_bias_rate,
            moe_router_num_groups=groups, moe_router_group_topk=group_topk, moe_router_dtype="fp32",
            moe_router_load_balancing_type="seq_aux_loss" if cfg.aux_loss_alpha > 0 else "none",
            moe_aux_loss_coeff=cfg.aux_loss_alpha, moe_z_loss_coeff=None, moe_input_jitter_eps=None,
            moe_token_dispatcher_type="alltoall", moe_grouped_gemm=True, moe_permute_fusion=True,
            moe_router_fusion=False, moe_token_dropping=False, moe_expert_capacity_factor=None,
        )
        if cfg.num_nextn_predict_layers:
            kw.update(mtp_num_layers=cfg.num_nextn_predict_layers, mtp_loss_scaling_factor=opts.mtp_loss_scale)
        cls = "MLATransformerConfig"
    else:
        kw.update(num_query_groups=cfg.num_key_value_heads, kv_channels=cfg.dense_head_dim,
                  add_qkv_bias=cfg.attention_bias, qk_layernorm=False, multi_latent_attention=False)
        cls = "TransformerConfig"
    if opts.fp8 is not None:
        if opts.fp8 not in ("delayed", "tensorwise", "blockwise"):
            raise ValueError(f"fp8={opts.fp8!r}: expected null, delayed, tensorwise or blockwise")
        # blockwise and tensorwise quantise everything to e4m3 (DeepSeek-V3 §3.3.1); delayed keeps e5m2 grads
        kw.update(fp8="hybrid" if opts.fp8 == "delayed" else "e4m3", fp8_recipe=opts.fp8,
                  fp8_margin=0, fp8_amax_history_len=1024 if opts.fp8 == "delayed" else 1,
                  fp8_amax_compute_algo="max" if opts.fp8 == "delayed" else "most_recent")
        if cfg.is_moe:
            kw["moe_router_padding_for_quantization"] = True
    if opts.recompute == "full":
        kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif opts.recompute == "selective":
        kw.update(recompute_granularity="selective", recompute_modules=list(opts.recompute_modules))
    elif opts.recompute is not None:
        raise ValueError(f"recompute={opts.recompute!r}: expected null, selective or full")
    kw.update(opts.extra)
    return cls, kw


def gpt_model_kwargs(cfg: ModelConfig, pcfg: ParallelConfig) -> dict[str, Any]:
    """GPTModel constructor kwargs other than config/spec/pre_process/post_process. Pure."""
    kw: dict[str, Any] = {
        "vocab_size": padded_vocab_size(cfg, pcfg.tp), "max_sequence_length": cfg.max_position_embeddings,
        "parallel_output": True, "share_embeddings_and_output_weights": cfg.tie_word_embeddings,
        "position_embedding_type": "rope",  # GPTModel skips its own RoPE for MLA (RoPE lives inside MLA)
        "rotary_percent": 1.0, "rotary_base": cfg.rope_theta,
    }
    if not cfg.is_moe:
        rs = cfg.rope_scaling or {}
        kind = rs.get("rope_type", rs.get("type", "default"))
        if kind == "llama3":
            kw.update(rope_scaling=True, rope_scaling_factor=float(rs["factor"]))
        elif kind == "linear":
            kw.update(seq_len_interpolation_factor=float(rs["factor"]))
    return kw


def build_transformer_config(cfg: ModelConfig, pcfg: ParallelConfig, opts: MegatronOptions = MegatronOptions(),
                             dtype: torch.dtype = torch.bfloat16):
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    cls, kw = transformer_config_kwargs(cfg, pcfg, opts, dtype)
    return (MLATransformerConfig if cls == "MLATransformerConfig" else TransformerConfig)(**kw)

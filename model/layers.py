"""Building blocks: RMSNorm, RoPE (default / YaRN / Llama-3), MLA, GQA attention, DeepSeekMoE, the KV cache.

References: DeepSeek-V3 `inference/model.py` (MLA with weight absorption for decode, the sigmoid gate with the
aux-loss-free bias and group-limited top-k), DeepSeek-V3 paper §2.1 (eq. 12-20), transformers'
`modeling_deepseek_v3.py` / `modeling_qwen2.py` / `modeling_llama.py` (numerics we are parity-tested against).

Legend: B batch, T new tokens, S key positions (cache + new), H hidden, N tokens (B*T), E routed experts,
K experts per token, nh heads, D head dim, R kv_lora_rank, P rope dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .segments import SegmentLayout, attend_segments


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# ---------------------------------------------------------------------------------------------- RoPE
def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def compute_rope_frequencies(cfg: ModelConfig, dim: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [dim/2], attention_factor applied to cos/sin), computed in float32 on CPU like transformers."""
    base = cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "linear":
        return inv_freq / rs["factor"], 1.0
    if kind == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / lo, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) * ~(wavelen > old / lo)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        factor = rs.get("factor") or cfg.max_position_embeddings / rs["original_max_position_embeddings"]
        mscale, mscale_all = rs.get("mscale"), rs.get("mscale_all_dim")
        attn_factor = rs.get("attention_factor")
        if attn_factor is None:
            attn_factor = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
                           if mscale and mscale_all else _yarn_mscale(factor))
        beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1
        orig = rs["original_max_position_embeddings"]

        def correction_dim(rot: float) -> float:
            return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if rs.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp
        inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
        return inv_freq, float(attn_factor)
    return inv_freq, 1.0


def mla_softmax_scale(cfg: ModelConfig) -> float:
    """qk_head_dim^-0.5, times mscale^2 under YaRN (DeepSeek-V3 inference/model.py MLA.__init__)."""
    scale = cfg.qk_head_dim ** -0.5
    rs = cfg.rope_scaling or {}
    if rs.get("rope_type", rs.get("type")) == "yarn" and rs.get("mscale_all_dim"):
        m = _yarn_mscale(rs["factor"], rs["mscale_all_dim"])
        scale *= m * m
    return scale


class Rotary(nn.Module):
    """cos/sin for given positions, recomputed on the fly (cheap; no buffers to re-create after meta init)."""

    def __init__(self, cfg: ModelConfig, dim: int, interleaved: bool):
        super().__init__()
        self.cfg, self.dim, self.interleaved = cfg, dim, interleaved
        self._cache: tuple[torch.device, torch.Tensor, float] | None = None

    def _inv_freq(self, device: torch.device) -> tuple[torch.Tensor, float]:
        if self._cache is None or self._cache[0] != device:
            inv, factor = compute_rope_frequencies(self.cfg, self.dim)
            self._cache = (device, inv.to(device), factor)
        return self._cache[1], self._cache[2]

    def forward(self, position_ids_BT: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv, factor = self._inv_freq(position_ids_BT.device)
        freqs = position_ids_BT[..., None].float() * inv  # [B, T, P/2]
        return (freqs.cos() * factor).to(dtype), (freqs.sin() * factor).to(dtype)

    def apply(self, x_BhTP: torch.Tensor, cos_BTQ: torch.Tensor, sin_BTQ: torch.Tensor) -> torch.Tensor:
        cos, sin = cos_BTQ.unsqueeze(1), sin_BTQ.unsqueeze(1)
        if self.interleaved:
            # DeepSeek layout: pairs (x0,x1),(x2,x3),... rotated; output de-interleaved like transformers.
            x1, x2 = x_BhTP[..., 0::2], x_BhTP[..., 1::2]
        else:
            x1, x2 = x_BhTP.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


# ---------------------------------------------------------------------------------------------- KV cache
@dataclass
class KVCache:
    """Preallocated per-layer cache. MLA stores the normalised latent [B,S,R] and the roped key [B,S,P];
    GQA stores k, v [B,nkv,S,D]. `valid_BS` marks real (non-pad) key positions; `length` is shared by all rows."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    valid_BS: torch.Tensor
    next_pos_B: torch.Tensor
    length: int = 0
    max_len: int = field(default=0)

    def select_rows(self, rows: torch.Tensor) -> KVCache:
        """A new cache holding these rows (ids into this one; repeats allowed) in this order: a prompt prefilled
        once serves each of its samples, and rows that finished decoding are dropped."""
        return KVCache([(a.index_select(0, rows), b.index_select(0, rows)) for a, b in self.layers],
                       self.valid_BS.index_select(0, rows), self.next_pos_B.index_select(0, rows), self.length,
                       self.max_len)


def build_kv_cache(cfg: ModelConfig, batch_size: int, max_len: int, device, dtype) -> KVCache:
    layers = []
    for _ in range(cfg.num_hidden_layers):
        if cfg.is_moe:
            a = torch.zeros(batch_size, max_len, cfg.kv_lora_rank, device=device, dtype=dtype)
            b = torch.zeros(batch_size, max_len, cfg.qk_rope_head_dim, device=device, dtype=dtype)
        else:
            shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.dense_head_dim)
            a = torch.zeros(shape, device=device, dtype=dtype)
            b = torch.zeros(shape, device=device, dtype=dtype)
        layers.append((a, b))
    valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
    return KVCache(layers, valid, torch.zeros(batch_size, dtype=torch.long, device=device), 0, max_len)


def build_attention_mask(valid_BS: torch.Tensor | None, start: int, T: int, S: int, device,
                         segments_BT: torch.Tensor | None = None) -> torch.Tensor | None:
    """Boolean [B|1, 1, T, S] mask (True = attend): causal over absolute positions and key validity; with
    `segments_BT` (packed sequences, no cache) a token attends only within its own segment.
    Every query may attend to itself so rows of pad queries never become all -inf (their outputs are unused)."""
    q_pos = torch.arange(start, start + T, device=device)[:, None]
    k_pos = torch.arange(S, device=device)[None, :]
    mask = (k_pos <= q_pos)[None]  # [1, T, S]
    if valid_BS is not None:
        mask = mask & valid_BS[:, None, :S]
    if segments_BT is not None:
        mask = mask & (segments_BT[:, :, None] == segments_BT[:, None, :])
    if valid_BS is not None or segments_BT is not None:
        mask = mask | (k_pos == q_pos)[None]
    return mask[:, None]


def _attend(q, k, v, mask, scale: float, causal_no_mask: bool, gqa: bool = False) -> torch.Tensor:
    """`gqa`: k and v have fewer heads than q, each shared by a group of consecutive query heads (SDPA reads them in
    place; copying the KV cache to every head each decode step cost 7x the attention itself on a CPU)."""
    if causal_no_mask:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if isinstance(mask, SegmentLayout):
        if gqa:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        return attend_segments(q, k, v, mask, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


# ---------------------------------------------------------------------------------------------- attention
class MLA(nn.Module):
    """Multi-head Latent Attention (DeepSeek-V2/V3 §2.1.1): optional q LoRA, compressed kv latent, decoupled RoPE."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h, nh = cfg.hidden_size, cfg.num_attention_heads
        bias = cfg.attention_bias
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(h, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, nh * cfg.qk_head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(h, nh * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(nh * cfg.v_head_dim, h, bias=bias)
        self.rotary = Rotary(cfg, cfg.qk_rope_head_dim, interleaved=True)
        self.scale = mla_softmax_scale(cfg)

    def forward(self, x_BTH, cos, sin, mask, cache_layer, start: int, causal_no_mask: bool) -> torch.Tensor:
        c = self.cfg
        B, T, _ = x_BTH.shape
        nh, dn, dr, dv = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTH))) if c.q_lora_rank else self.q_proj(x_BTH)
        q = q.view(B, T, nh, dn + dr).transpose(1, 2)
        q_nope, q_rope = q.split([dn, dr], dim=-1)
        q_rope = self.rotary.apply(q_rope, cos, sin)
        kv_nope, k_rope = self.kv_a_proj_with_mqa(x_BTH).split([c.kv_lora_rank, dr], dim=-1)
        kv_nope = self.kv_a_layernorm(kv_nope)  # [B, T, R]
        k_rope = self.rotary.apply(k_rope.unsqueeze(1), cos, sin).squeeze(1)  # [B, T, P]

        if cache_layer is None:  # training / scoring: expand the latent into per-head k, v
            kv = self.kv_b_proj(kv_nope).view(B, T, nh, dn + dv).transpose(1, 2)
            k_nope, v = kv.split([dn, dv], dim=-1)
            k = torch.cat([k_nope, k_rope.unsqueeze(1).expand(B, nh, T, dr)], dim=-1)
            qf = torch.cat([q_nope, q_rope], dim=-1)
            # v zero-padded to the q/k head dim (V3: 192 vs 128): fused (flash) attention kernels need one head dim
            # for q, k and v, and without them SDPA falls back to its unfused math path (on CPU 1.8x slower forward
            # + backward at tiny-moe's 48 vs 32). The padded output columns are zeros and are dropped.
            v = F.pad(v, (0, max(0, dn + dr - dv)))
            out = _attend(qf, k, v, mask, self.scale, causal_no_mask)[..., :dv]
            return self.o_proj(out.transpose(1, 2).reshape(B, T, nh * dv))

        # Decode with weight absorption (DeepSeek-V3 inference/model.py, attn_impl="absorb"): attention runs in
        # the latent space, so the cache holds only [R + P] numbers per token.
        lat_cache, rope_cache = cache_layer
        lat_cache[:, start:start + T] = kv_nope
        rope_cache[:, start:start + T] = k_rope
        S = start + T
        w = self.kv_b_proj.weight.view(nh, dn + dv, c.kv_lora_rank)
        q_lat = torch.einsum("bhtd,hdr->bhtr", q_nope, w[:, :dn])  # [B, nh, T, R]
        scores = torch.einsum("bhtr,bsr->bhts", q_lat, lat_cache[:, :S]) \
            + torch.einsum("bhtp,bsp->bhts", q_rope, rope_cache[:, :S])
        scores = (scores.float() * self.scale).masked_fill(~mask, float("-inf"))
        probs = scores.softmax(-1).to(q.dtype)
        out_lat = torch.einsum("bhts,bsr->bhtr", probs, lat_cache[:, :S])
        out = torch.einsum("bhtr,hvr->bhtv", out_lat, w[:, dn:])
        return self.o_proj(out.transpose(1, 2).reshape(B, T, nh * dv))


class GQA(nn.Module):
    """Grouped-query attention of the dense students (Qwen2: qkv bias; Llama: none)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h, d = cfg.hidden_size, cfg.dense_head_dim
        self.q_proj = nn.Linear(h, cfg.num_attention_heads * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, cfg.num_key_value_heads * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, cfg.num_key_value_heads * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_attention_heads * d, h, bias=False)
        self.rotary = Rotary(cfg, d, interleaved=False)
        self.scale = d ** -0.5

    def forward(self, x_BTH, cos, sin, mask, cache_layer, start: int, causal_no_mask: bool) -> torch.Tensor:
        c = self.cfg
        B, T, _ = x_BTH.shape
        nh, nkv, d = c.num_attention_heads, c.num_key_value_heads, c.dense_head_dim
        q = self.rotary.apply(self.q_proj(x_BTH).view(B, T, nh, d).transpose(1, 2), cos, sin)
        k = self.rotary.apply(self.k_proj(x_BTH).view(B, T, nkv, d).transpose(1, 2), cos, sin)
        v = self.v_proj(x_BTH).view(B, T, nkv, d).transpose(1, 2)
        if cache_layer is not None:
            k_cache, v_cache = cache_layer
            k_cache[:, :, start:start + T] = k
            v_cache[:, :, start:start + T] = v
            k, v = k_cache[:, :, :start + T], v_cache[:, :, :start + T]
        out = _attend(q, k, v, mask, self.scale, causal_no_mask, gqa=nkv != nh)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, nh * d))


# ---------------------------------------------------------------------------------------------- FFN / MoE
class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Sigmoid gate with the aux-loss-free bias (V3 eq. 15-16): the bias shifts which experts are *selected*;
    the gating weights use the unbiased affinities. Group-limited: keep the `topk_group` groups whose top-2
    biased scores sum highest, then top-k within them."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        # Kept in float32 whatever the model dtype: the bias moves in steps of ~1e-3 (V3 §4.2).
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x_NH: torch.Tensor, replay_NK: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gating weights [N, K], expert ids [N, K], affinities [N, E]). `replay_NK`: routing replay (R3): use
        these expert ids (the rollout engine's) instead of choosing; the weights are still this router's
        affinities of those experts, so the gate keeps its gradient."""
        c = self.cfg
        scores_NE = torch.sigmoid(F.linear(x_NH.float(), self.weight.float()))
        if replay_NK is not None:
            idx_NK = replay_NK.to(device=scores_NE.device, dtype=torch.long)
            return self._gating_weights(scores_NE, idx_NK), idx_NK, scores_NE
        choice_NE = scores_NE + self.e_score_correction_bias.float()
        if c.n_group > 1 and c.topk_group < c.n_group:
            N = choice_NE.shape[0]
            grouped = choice_NE.view(N, c.n_group, -1)
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1)[0].sum(-1)  # [N, n_group]
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(c.topk_group, dim=-1)[1], True)
            # -inf as in DeepSeek-V3 inference/model.py Gate: an excluded group can never win.
            choice_NE = grouped.masked_fill(~keep[..., None], float("-inf")).view(N, -1)
        idx_NK = choice_NE.topk(c.num_experts_per_tok, dim=-1)[1]
        return self._gating_weights(scores_NE, idx_NK), idx_NK, scores_NE

    def _gating_weights(self, scores_NE: torch.Tensor, idx_NK: torch.Tensor) -> torch.Tensor:
        weights_NK = scores_NE.gather(1, idx_NK)
        if self.cfg.norm_topk_prob:
            weights_NK = weights_NK / (weights_NK.sum(-1, keepdim=True) + 1e-20)
        return weights_NK * self.cfg.routed_scaling_factor


class GroupedExperts(nn.Module):
    """Routed experts stored stacked ([E, I, H]) for grouped GEMM; the state dict exposes them under the per-expert
    HF names (`experts.{e}.gate_proj.weight`), so checkpoints and rollout engines see the HF layout."""

    NAMES = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, num_experts: int, hidden: int, inter: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_proj = nn.Parameter(torch.empty(num_experts, inter, hidden))
        self.up_proj = nn.Parameter(torch.empty(num_experts, inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inter))
        self.register_state_dict_post_hook(GroupedExperts._to_hf_names)
        self.register_load_state_dict_pre_hook(GroupedExperts._from_hf_names)

    @staticmethod
    def _to_hf_names(module, state_dict, prefix, local_metadata):
        for name in GroupedExperts.NAMES:
            stacked = state_dict.pop(prefix + name)
            for e in range(module.num_experts):
                state_dict[f"{prefix}{e}.{name}.weight"] = stacked[e]

    @staticmethod
    def _from_hf_names(module, state_dict, prefix, *args):
        for name in GroupedExperts.NAMES:
            keys = [f"{prefix}{e}.{name}.weight" for e in range(module.num_experts)]
            if all(k in state_dict for k in keys):
                state_dict[prefix + name] = torch.stack([state_dict.pop(k) for k in keys])

    def forward(self, x_NH: torch.Tensor, weights_NK: torch.Tensor, idx_NK: torch.Tensor) -> torch.Tensor:
        K = idx_NK.shape[1]
        flat = idx_NK.reshape(-1)
        order = flat.argsort(stable=True)  # sort (token, slot) pairs by expert: compute touches routed tokens only
        token_of = order // K
        x_sorted = x_NH[token_of]
        counts = torch.bincount(flat, minlength=self.num_experts)
        if _use_grouped_mm(x_sorted, self.gate_proj):
            offs = counts.cumsum(0).to(torch.int32)
            g = torch._grouped_mm(x_sorted, self.gate_proj.transpose(-2, -1), offs=offs)
            u = torch._grouped_mm(x_sorted, self.up_proj.transpose(-2, -1), offs=offs)
            y_sorted = torch._grouped_mm(F.silu(g) * u, self.down_proj.transpose(-2, -1), offs=offs)
        else:
            y_sorted = torch.empty_like(x_sorted)
            begin = 0
            for e, n in enumerate(counts.tolist()):
                if n:
                    xe = x_sorted[begin:begin + n]
                    h = F.silu(xe @ self.gate_proj[e].t()) * (xe @ self.up_proj[e].t())
                    y_sorted[begin:begin + n] = h @ self.down_proj[e].t()
                    begin += n
        y_sorted = y_sorted * weights_NK.reshape(-1)[order].unsqueeze(-1).to(y_sorted.dtype)
        out = torch.zeros_like(x_NH)
        return out.index_add_(0, token_of, y_sorted)


def _use_grouped_mm(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (x.is_cuda and hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16
            and w.shape[-1] % 8 == 0 and w.shape[-2] % 8 == 0)


@dataclass
class MoEStats:
    counts_E: torch.Tensor
    aux_loss: torch.Tensor
    idx_NK: torch.Tensor
    """The experts each token was routed to (chosen, or replayed)."""


class MoE(nn.Module):
    """DeepSeekMoE (V3 §2.1.2): shared experts + fine-grained routed experts."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg)
        self.experts = GroupedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)

    def forward(self, x_BTH: torch.Tensor, valid_BT: torch.Tensor | None, replay_BTK: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, MoEStats]:
        B, T, H = x_BTH.shape
        x_NH = x_BTH.reshape(-1, H)
        replay_NK = None if replay_BTK is None else replay_BTK.reshape(B * T, -1)
        weights_NK, idx_NK, scores_NE = self.gate(x_NH, replay_NK)
        y = self.experts(x_NH, weights_NK, idx_NK).view(B, T, H)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x_BTH)
        with torch.no_grad():
            routed = idx_NK if valid_BT is None else idx_NK[valid_BT.reshape(-1)]
            counts_E = torch.bincount(routed.reshape(-1), minlength=self.cfg.n_routed_experts)
        aux = compute_sequence_aux_loss(scores_NE, idx_NK, B, T, self.cfg) if (
            self.training and self.cfg.aux_loss_alpha > 0) else x_BTH.new_zeros((), dtype=torch.float32)
        return y, MoEStats(counts_E, aux, idx_NK)


def compute_sequence_aux_loss(scores_NE, idx_NK, B: int, T: int, cfg: ModelConfig) -> torch.Tensor:
    """Sequence-wise balance loss (V3 eq. 17-20): alpha * sum_i f_i P_i, averaged over the batch's sequences."""
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    picked = torch.zeros(B * T, E, device=scores_NE.device).scatter_(1, idx_NK, 1.0).view(B, T, E)
    f_BE = picked.sum(1) * E / (K * T)
    p_BE = (scores_NE / scores_NE.sum(-1, keepdim=True)).view(B, T, E).mean(1)
    return cfg.aux_loss_alpha * (f_BE * p_BE).sum(-1).mean()

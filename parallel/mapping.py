"""HF checkpoint names <-> megatron-core GPTModel (Transformer Engine spec) names: ONE table, pure torch.

Every conversion in r1moe goes through `RULES` below: the offline converters (tools/convert_*), loading HF weights
into the megatron model, and the weight export for rollouts (parallel/export.py). Nothing here imports megatron,
so the table and the sharding math are unit-tested on CPU (tests/parallel/test_mapping.py) and checked against
the real module names on GPU (tests/gpu/test_megatron_backend.py).

A rule maps one megatron tensor to one or more HF tensors:
  split  how TP shards the megatron tensor: "rep" replicated, "col" dim 0, "row" dim 1, "vocab" dim 0 with
         the vocabulary padded to a multiple of tp (megatron's VocabParallelEmbedding needs V % tp == 0)
  fuse   "one" 1:1; "cat" [gate; up] stacked per TP shard (SwiGLU linear_fc1; megatron chunks x into
         (act-input, linear) halves); "qkv" megatron's GQA layout, rows grouped per kv head
         [q_heads_of_group, k, v] (megatron.core.transformer.attention.SelfAttention.get_query_key_value_tensors)
Layer rules use {L} for the global HF layer index; expert rules use {E} for the global expert index. Megatron's
names use the layer index local to the pipeline stage and the expert index local to the EP rank (TEGroupedMLP
registers `weight{i}` per local expert; global expert = ep_rank * experts_per_rank + i).

MLA needs no re-layout: q_b_proj / kv_b_proj rows are per head [nope | rope] and [k_nope | v] in both, and
megatron's MLA applies RoPE with `mla_rotary_interleaved=True` (pairs (x0,x1),(x2,x3),..., the DeepSeek layout).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch

from r1moe.model import ModelConfig

from .config import ParallelConfig

Split = Literal["rep", "col", "row", "vocab"]
Fuse = Literal["one", "cat", "qkv"]


@dataclass(frozen=True)
class Rule:
    mcore: str
    hf: tuple[str, ...]
    split: Split = "rep"
    fuse: Fuse = "one"


def _r(mcore: str, hf: str | tuple[str, ...], split: Split = "rep", fuse: Fuse = "one") -> Rule:
    return Rule(mcore, (hf,) if isinstance(hf, str) else hf, split, fuse)


# ---------------------------------------------------------------------------------------------- THE table
# Per-layer rules: megatron suffix under `decoder.layers.{l}.` (or `mtp.layers.{j}.mtp_model_layer.`),
# HF suffix under `model.layers.{L}.`.
RULES: dict[str, tuple[Rule, ...]] = {
    "mla": (
        _r("input_layernorm.weight", "input_layernorm.weight"),
        _r("self_attention.linear_kv_down_proj.weight", "self_attn.kv_a_proj_with_mqa.weight"),
        _r("self_attention.linear_kv_up_proj.layer_norm_weight", "self_attn.kv_a_layernorm.weight"),
        _r("self_attention.linear_kv_up_proj.weight", "self_attn.kv_b_proj.weight", "col"),
        _r("self_attention.linear_proj.weight", "self_attn.o_proj.weight", "row"),
    ),
    "mla_q_lora": (
        _r("self_attention.linear_q_down_proj.weight", "self_attn.q_a_proj.weight"),
        _r("self_attention.linear_q_up_proj.layer_norm_weight", "self_attn.q_a_layernorm.weight"),
        _r("self_attention.linear_q_up_proj.weight", "self_attn.q_b_proj.weight", "col"),
    ),
    "mla_q": (
        _r("self_attention.linear_q_proj.weight", "self_attn.q_proj.weight", "col"),
    ),
    "gqa": (
        _r("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
        _r("self_attention.linear_qkv.weight",
           ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), "col", "qkv"),
        _r("self_attention.linear_proj.weight", "self_attn.o_proj.weight", "row"),
    ),
    "gqa_bias": (
        _r("self_attention.linear_qkv.bias",
           ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), "col", "qkv"),
    ),
    "dense_mlp": (
        _r("mlp.linear_fc1.layer_norm_weight", "post_attention_layernorm.weight"),
        _r("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "col", "cat"),
        _r("mlp.linear_fc2.weight", "mlp.down_proj.weight", "row"),
    ),
    "moe": (
        _r("pre_mlp_layernorm.weight", "post_attention_layernorm.weight"),
        _r("mlp.router.weight", "mlp.gate.weight"),
        _r("mlp.router.expert_bias", "mlp.gate.e_score_correction_bias"),
    ),
    "shared_experts": (
        _r("mlp.shared_experts.linear_fc1.weight",
           ("mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight"), "col", "cat"),
        _r("mlp.shared_experts.linear_fc2.weight", "mlp.shared_experts.down_proj.weight", "row"),
    ),
    # routed experts: {e} local index in megatron, {E} global index in HF; split by etp, not tp
    "experts": (
        _r("mlp.experts.linear_fc1.weight{e}",
           ("mlp.experts.{E}.gate_proj.weight", "mlp.experts.{E}.up_proj.weight"), "col", "cat"),
        _r("mlp.experts.linear_fc2.weight{e}", "mlp.experts.{E}.down_proj.weight", "row"),
    ),
    # MTP module j (DeepSeek-V3 §2.2): megatron `mtp.layers.{j}.`, HF `model.layers.{L}.` with L = layers + j
    "mtp": (
        _r("enorm.weight", "enorm.weight"),
        _r("hnorm.weight", "hnorm.weight"),
        _r("eh_proj.weight", "eh_proj.weight", "col"),
        _r("final_layernorm.weight", "shared_head.norm.weight"),
    ),
    # whole-model tensors (full names on both sides)
    "embedding": (_r("embedding.word_embeddings.weight", "model.embed_tokens.weight", "vocab"),),
    "final_norm": (_r("decoder.final_layernorm.weight", "model.norm.weight"),),
    "output": (_r("output_layer.weight", "lm_head.weight", "vocab"),),
    "output_tied": (_r("output_layer.weight", "model.embed_tokens.weight", "vocab"),),
}

# HF tensors that are copies of others (the released DeepSeek-V3 checkpoint stores the MTP module's embedding
# and head); megatron shares them, so import skips them and export re-emits them.
def hf_copies(cfg: ModelConfig) -> dict[str, str]:
    L = cfg.num_hidden_layers
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    out = {}
    for j in range(cfg.num_nextn_predict_layers):
        out[f"model.layers.{L + j}.embed_tokens.weight"] = "model.embed_tokens.weight"
        out[f"model.layers.{L + j}.shared_head.head.weight"] = head
    return out


# ---------------------------------------------------------------------------------------------- entries
@dataclass(frozen=True)
class Entry:
    """One megatron tensor on one (pipeline stage, expert rank), with the HF tensors it is made of."""

    mcore: str
    hf: tuple[str, ...]
    split: Split
    fuse: Fuse
    expert: bool
    """Routed-expert tensor: sharded by etp (not tp) and distributed by ep."""
    copy: bool = False
    """A second megatron copy of a tensor owned elsewhere (tied head on the last stage, MTP's embedding)."""


def padded_vocab_size(cfg: ModelConfig, tp: int) -> int:
    return -(-cfg.vocab_size // tp) * tp


def _layer_rules(cfg: ModelConfig, layer_idx: int) -> list[tuple[Rule, bool]]:
    """(rule, is_expert) for one decoder layer (layer_idx may be an MTP layer's HF index)."""
    out: list[tuple[Rule, bool]] = []
    if cfg.is_moe:
        out += [(r, False) for r in RULES["mla"]]
        out += [(r, False) for r in RULES["mla_q_lora" if cfg.q_lora_rank else "mla_q"]]
    else:
        out += [(r, False) for r in RULES["gqa"]]
        if cfg.attention_bias:
            out += [(r, False) for r in RULES["gqa_bias"]]
    if cfg.is_moe_layer(layer_idx):
        out += [(r, False) for r in RULES["moe"]]
        if cfg.n_shared_experts:
            out += [(r, False) for r in RULES["shared_experts"]]
        out += [(r, True) for r in RULES["experts"]]
    else:
        out += [(r, False) for r in RULES["dense_mlp"]]
    return out


def _expand_layer(cfg: ModelConfig, pcfg: ParallelConfig, ep_rank: int, hf_layer: int, mcore_prefix: str
                  ) -> list[Entry]:
    out = []
    n_local = cfg.n_routed_experts // pcfg.ep if cfg.is_moe else 0
    for rule, expert in _layer_rules(cfg, hf_layer):
        hf = tuple(f"model.layers.{hf_layer}.{h}" for h in rule.hf)
        if not expert:
            out.append(Entry(mcore_prefix + rule.mcore, hf, rule.split, rule.fuse, False))
            continue
        for e in range(n_local):
            E = ep_rank * n_local + e
            out.append(Entry(mcore_prefix + rule.mcore.format(e=e), tuple(h.format(E=E) for h in hf),
                             rule.split, rule.fuse, True))
    return out


def stage_entries(cfg: ModelConfig, pcfg: ParallelConfig, pp_rank: int, ep_rank: int = 0) -> list[Entry]:
    """Every megatron tensor held by ranks of pipeline stage `pp_rank` and expert rank `ep_rank` (the TP rank
    only chooses the shard), in HF checkpoint order."""
    L = cfg.num_hidden_layers
    first, last = pp_rank == 0, pp_rank == pcfg.pp - 1
    mtp = cfg.num_nextn_predict_layers
    out: list[Entry] = []
    if first:
        out += [Entry(r.mcore, r.hf, r.split, r.fuse, False) for r in RULES["embedding"]]
    elif last and mtp:
        # GPTModel builds an embedding on the MTP stage too; it is the same tensor as stage 0's
        out += [Entry(r.mcore, r.hf, r.split, r.fuse, False, copy=True) for r in RULES["embedding"]]
    for layer, (stage, local) in enumerate(pcfg.stage_of_layer(L)):
        if stage == pp_rank:
            out += _expand_layer(cfg, pcfg, ep_rank, layer, f"decoder.layers.{local}.")
    if last:
        out += [Entry(r.mcore, r.hf, r.split, r.fuse, False) for r in RULES["final_norm"]]
        if not cfg.tie_word_embeddings:
            out += [Entry(r.mcore, r.hf, r.split, r.fuse, False) for r in RULES["output"]]
        elif not first:
            # tied head with pp > 1: the last stage keeps its own copy of the embedding (synced by megatron)
            out += [Entry(r.mcore, r.hf, r.split, r.fuse, False, copy=True) for r in RULES["output_tied"]]
        for j in range(mtp):
            pre = f"mtp.layers.{j}."
            out += [Entry(pre + r.mcore, (f"model.layers.{L + j}.{r.hf[0]}",), r.split, r.fuse, False)
                    for r in RULES["mtp"]]
            out += _expand_layer(cfg, pcfg, ep_rank, L + j, pre + "mtp_model_layer.")
    return out


# ---------------------------------------------------------------------------------------------- sharding
def _chunk(t: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    if t.shape[dim] % size:
        raise ValueError(f"cannot split dim {dim} of size {t.shape[dim]} into {size} shards")
    return t.chunk(size, dim=dim)[rank]


def _qkv_groups(cfg: ModelConfig) -> tuple[int, int, int]:
    """(kv groups, query heads per group, head dim) of a dense GQA model."""
    return cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads, cfg.dense_head_dim


def shard(entry: Entry, parts: list[torch.Tensor], rank: int, size: int, cfg: ModelConfig) -> torch.Tensor:
    """Full HF tensor(s) -> this TP rank's megatron tensor (a view where possible)."""
    if entry.fuse == "qkv":
        q, k, v = parts
        ng, qpg, d = _qkv_groups(cfg)
        rest = q.shape[1:]
        q = q.reshape(ng, qpg * d, *rest)
        k, v = k.reshape(ng, d, *rest), v.reshape(ng, d, *rest)
        fused = torch.cat([q, k, v], dim=1)  # [ng, (qpg + 2) d, ...]
        return _chunk(fused, 0, rank, size).reshape(-1, *rest)
    if entry.fuse == "cat":
        return torch.cat([_chunk(p, 0, rank, size) for p in parts], dim=0)
    (t,) = parts
    if entry.split == "rep":
        return t
    if entry.split == "row":
        return _chunk(t, 1, rank, size)
    if entry.split == "vocab":
        V = t.shape[0]
        Vp = -(-V // size) * size
        if Vp != V:
            t = torch.cat([t, t.new_zeros(Vp - V, *t.shape[1:])])
    return _chunk(t, 0, rank, size)


def unshard(entry: Entry, shards: list[torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """All TP ranks' megatron tensors (rank order) -> the full HF tensor(s)."""
    size = len(shards)
    if entry.fuse == "qkv":
        ng, qpg, d = _qkv_groups(cfg)
        rest = shards[0].shape[1:]
        fused = torch.cat([s.reshape(ng // size, (qpg + 2) * d, *rest) for s in shards], dim=0)
        q, k, v = fused.split([qpg * d, d, d], dim=1)
        return dict(zip(entry.hf, (q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest))))
    if entry.fuse == "cat":
        halves = [s.chunk(len(entry.hf), dim=0) for s in shards]
        return {name: torch.cat([h[i] for h in halves], dim=0) for i, name in enumerate(entry.hf)}
    (name,) = entry.hf
    if entry.split == "rep" or size == 1:
        full = shards[0]
    else:
        full = torch.cat(shards, dim=1 if entry.split == "row" else 0)
    if entry.split == "vocab":
        full = full[: cfg.vocab_size]
    return {name: full}


# ---------------------------------------------------------------------------------------------- whole states
def hf_to_mcore_state(cfg: ModelConfig, pcfg: ParallelConfig, get_hf: Callable[[str], torch.Tensor], *,
                      pp_rank: int, tp_rank: int, ep_rank: int, etp_rank: int,
                      experts: bool | None = None) -> dict[str, torch.Tensor]:
    """This rank's megatron state dict (without TE `_extra_state`). `get_hf(name)` returns a full HF tensor.
    experts=True/False restricts to routed-expert / other tensors (None: both)."""
    out = {}
    for entry in stage_entries(cfg, pcfg, pp_rank, ep_rank):
        if experts is not None and entry.expert != experts:
            continue
        rank, size = (etp_rank, pcfg.expert_tp) if entry.expert else (tp_rank, pcfg.tp)
        out[entry.mcore] = shard(entry, [get_hf(n) for n in entry.hf], rank, size, cfg).contiguous()
    return out


def mcore_to_hf_state(cfg: ModelConfig, pcfg: ParallelConfig,
                      get_shards: Callable[[Entry, int, int], list[torch.Tensor]]
                      ) -> Iterable[tuple[str, torch.Tensor]]:
    """Full HF tensors, in checkpoint order. `get_shards(entry, pp_rank, ep_rank)` returns the TP shards (rank
    order) of the megatron tensor `entry.mcore` held by pipeline stage `pp_rank` and expert rank `ep_rank`. Copies are emitted after
    their source: the MTP module's embedding/head as the released DeepSeek-V3 checkpoint stores them."""
    pending: dict[str, list[str]] = {}
    for copy_name, src in hf_copies(cfg).items():
        pending.setdefault(src, []).append(copy_name)
    for pp_rank in range(pcfg.pp):
        for ep_rank in range(pcfg.ep if cfg.is_moe else 1):
            for entry in stage_entries(cfg, pcfg, pp_rank, ep_rank):
                if entry.copy or (ep_rank > 0 and not entry.expert):
                    continue
                for name, t in unshard(entry, get_shards(entry, pp_rank, ep_rank), cfg).items():
                    yield name, t
                    for copy_name in pending.get(name, ()):
                        yield copy_name, t


def hf_names(cfg: ModelConfig) -> list[str]:
    """Every HF tensor name of this architecture (what the reference model's state_dict holds)."""
    one = ParallelConfig()
    names = []
    for entry in stage_entries(cfg, one, 0, 0):
        if not entry.copy:
            names += list(entry.hf)
    names += list(hf_copies(cfg))
    return names

"""Parity with transformers, both directions, through real safetensors directories.

HF -> ours: a random transformers model (built from `AutoConfig.for_model(**cfg.to_hf_dict())`, eager attention)
is saved with its own `save_pretrained` and loaded with `r1moe.model.from_pretrained`. Ours -> HF: our random
model saved with our `save_pretrained` is loaded by `AutoModelForCausalLM.from_pretrained`. Logits must agree to
1e-4 in float32, on an unpadded batch and on a left-padded batch with an attention mask.

Weights are re-drawn with a larger spread than the default init (std 0.02 makes every layer nearly the identity),
norm weights around 1, and the router bias nonzero, so routing, the bias and the rope variants all move logits.
"""

import copy
import dataclasses
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from r1moe.model import ModelConfig, build_model
from r1moe.model.checkpoint import from_pretrained, save_pretrained

TOL = 1e-4
T = 11

_MOE = {"model_type": "deepseek_v3", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
        "moe_intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
        "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "n_shared_experts": 1,
        "n_routed_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True, "max_position_embeddings": 128,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
_DENSE = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "rope_theta": 10000.0,
          "rms_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "first_k_dense_replace": 0,
          "num_nextn_predict_layers": 0, "q_lora_rank": None}

CONFIGS = {
    # group-limited routing (4 groups, keep 2), q LoRA, YaRN as in V3 (mscale = mscale_all_dim = 1), one dense
    # layer, routed scaling 2.5, and an MTP layer (HF drops it on save; HF ignores it on load).
    "deepseek_v3-qlora-yarn-groups": ModelConfig(
        **_MOE, q_lora_rank=24, n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
        num_nextn_predict_layers=1,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
    # no q LoRA, 2 groups keep 1, two dense layers, 2 shared experts worth of width, no rope scaling.
    "deepseek_v3-noqlora": ModelConfig(
        **{**_MOE, "n_shared_experts": 2}, q_lora_rank=None, n_group=2, topk_group=1, first_k_dense_replace=2,
        routed_scaling_factor=1.7, num_nextn_predict_layers=0),
    "qwen2-gqa-bias": ModelConfig(model_type="qwen2", attention_bias=True, tie_word_embeddings=False, **_DENSE),
    "llama-tied-llama3rope": ModelConfig(
        model_type="llama", attention_bias=False, tie_word_embeddings=True, **{**_DENSE, "rope_theta": 500000.0},
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16}),
    "llama-untied": ModelConfig(model_type="llama", attention_bias=False, tie_word_embeddings=False, **_DENSE),
}


@torch.no_grad()
def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Same recipe for an HF or an r1moe model: names are the same, only the storage layout differs."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.dim() == 1 and name.endswith("norm.weight"):
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        elif p.dim() == 1:  # qkv biases
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.08 * torch.randn(p.shape, generator=g))
    for name, b in module.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.05 * torch.randn(b.shape, generator=g))


def _batches(vocab: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    g = torch.Generator().manual_seed(7)
    x = torch.randint(3, vocab, (3, T), generator=g)
    mask = torch.ones(3, T, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[2, :6] = 0
    return [(x, None), (x.masked_fill(mask == 0, 0), mask)]


def _hf_logits(hf, x, mask):
    if mask is None:
        return hf(input_ids=x).logits
    # HF takes positions from cache_position, not the mask; generation passes mask-derived ones like these.
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return hf(input_ids=x, attention_mask=mask, position_ids=pos).logits


def _assert_same_logits(ours, hf, vocab):
    ours.eval()
    hf.eval()
    with torch.no_grad():
        for x, mask in _batches(vocab):
            a = ours(x, attention_mask=mask).logits
            b = _hf_logits(hf, x, mask)
            keep = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool()
            diff = (a - b)[keep].abs().max().item()
            assert diff < TOL, f"max |logits diff| {diff:.3g} (mask={mask is not None})"


def _architecture(cfg: ModelConfig) -> dict:
    """The config fields that shape the math; see test_dense_config_round_trip for the two that do not."""
    d = dataclasses.asdict(cfg)
    d["head_dim"] = None if cfg.is_moe else cfg.dense_head_dim  # MLA has no single head_dim
    if not cfg.is_moe:
        d["q_lora_rank"] = None
    if cfg.rope_scaling:  # transformers writes {"rope_type": ...} next to (or instead of) the legacy "type"
        rs = dict(cfg.rope_scaling)
        rs["rope_type"] = rs.pop("type", None) or rs["rope_type"]
        d["rope_scaling"] = rs
    return d


def _hf_from_config(cfg: ModelConfig):
    # deepcopy: transformers edits rope_scaling in place, and to_hf_dict hands out the config's own dict (see
    # test_to_hf_dict_does_not_alias_the_config).
    hf_cfg = transformers.AutoConfig.for_model(**copy.deepcopy(cfg.to_hf_dict()))
    return transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager", dtype=torch.float32)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_to_ours(name, tmp_path):
    cfg = CONFIGS[name]
    hf = _hf_from_config(cfg)
    _randomize(hf, seed=1)
    hf.save_pretrained(tmp_path / "hf")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = from_pretrained(tmp_path / "hf")
    mtp_warnings = [w for w in caught if "num_nextn_predict_layers" in str(w.message)]
    # transformers has no MTP and drops it on save: we load with MTP disabled and say so.
    assert len(mtp_warnings) == (1 if cfg.num_nextn_predict_layers else 0)
    assert _architecture(ours.cfg) == _architecture(cfg.replace(num_nextn_predict_layers=0))
    assert ours.lm_head.weight.dtype == torch.float32
    _assert_same_logits(ours, hf, cfg.vocab_size)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ours_to_hf(name, tmp_path):
    cfg = CONFIGS[name]
    ours = build_model(cfg, seed=0)
    _randomize(ours, seed=2)
    save_pretrained(ours, tmp_path / "ours")
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "ours", attn_implementation="eager", output_loading_info=True)
    assert type(hf).__name__ == cfg.architecture
    assert hf.dtype == torch.float32
    assert not info["missing_keys"] and not info["mismatched_keys"]
    # Only our MTP layer is unknown to transformers.
    assert all(k.startswith(f"model.layers.{cfg.num_hidden_layers}.") for k in info["unexpected_keys"])
    assert bool(info["unexpected_keys"]) == bool(cfg.num_nextn_predict_layers)
    _assert_same_logits(ours, hf, cfg.vocab_size)


def test_router_bias_and_group_limit_change_the_logits():
    """Guards the parity tests against passing vacuously: the nonzero bias and the group limit change outputs."""
    cfg = CONFIGS["deepseek_v3-qlora-yarn-groups"]
    ours = build_model(cfg, seed=0).eval()
    _randomize(ours, seed=2)
    x, _ = _batches(cfg.vocab_size)[0]
    with torch.no_grad():
        ref = ours(x).logits
        no_groups = build_model(cfg.replace(topk_group=cfg.n_group), device="meta")
        no_groups.to_empty(device="cpu").load_state_dict(ours.state_dict())
        assert (no_groups.eval()(x).logits - ref).abs().max() > 1e-3
        for name, b in ours.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()
        assert (ours(x).logits - ref).abs().max() > 1e-3


def test_dense_config_round_trip(tmp_path):
    cfg = CONFIGS["qwen2-gqa-bias"]
    _hf_from_config(cfg).save_pretrained(tmp_path / "hf")
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    assert ModelConfig.from_json(tmp_path / "hf" / "config.json") == cfg


def test_to_hf_dict_does_not_alias_the_config():
    cfg = CONFIGS["llama-tied-llama3rope"].replace(rope_scaling=dict(CONFIGS["llama-tied-llama3rope"].rope_scaling))
    before = copy.deepcopy(cfg)
    transformers.AutoConfig.for_model(**cfg.to_hf_dict())
    assert cfg == before

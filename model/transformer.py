"""The causal LM: DeepSeek-V3 (MLA + DeepSeekMoE + MTP) or a dense Qwen2/Llama student, one class.

Module names follow the HF checkpoints (`model.layers.{i}.self_attn.kv_b_proj`, `model.layers.{i}.mlp.experts.{e}
.gate_proj`, `lm_head`), so `state_dict()` *is* an HF checkpoint. MTP (V3 §2.2, D = num_nextn_predict_layers)
lives at `model.layers.{L + j}` as in the released DeepSeek-V3 checkpoint; its embedding and output head are the
main model's (shared, as the paper says) and appear under the MTP names only in the state dict.

    model = build_model(get_preset("tiny-moe"))
    out = model(input_ids_BT)                   # out.logits [B, T, V]
    cache = model.new_cache(B, max_len)         # incremental decoding (see r1moe/rollout)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .layers import GQA, MLA, MLP, KVCache, MoE, RMSNorm, build_attention_mask, build_kv_cache
from .segments import build_segment_layout


@dataclass
class ModelOutput:
    logits: torch.Tensor
    """[B, T, V] next-token logits."""
    hidden: torch.Tensor
    """[B, T, H] final hidden states after the last norm (a reward model's scalar head reads these)."""
    aux_loss: torch.Tensor
    """Sum over MoE layers of the sequence-wise balance loss (0 when disabled or in eval mode)."""
    expert_counts: torch.Tensor | None
    """[num_moe_layers, E] tokens routed to each expert in this forward (real tokens only): drives the bias update."""
    mtp_logits: list[torch.Tensor] | None = None
    """Per MTP depth k: [B, T, V] logits predicting token t+1+k (only with compute_mtp=True)."""
    routed_experts: torch.Tensor | None = None
    """[B, T, num_moe_layers, K] the experts each token was routed to (only with return_routes=True)."""


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MLA(cfg) if cfg.is_moe else GQA(cfg)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache_layer, start, causal_no_mask, valid_BT, replay_BTK=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_layer, start, causal_no_mask)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            y, stats = self.mlp(h, valid_BT, replay_BTK)
            return x + y, stats
        return x + self.mlp(h), None


class SharedHead(nn.Module):
    """The MTP output norm; the head itself is the main model's lm_head (shared, V3 §2.2)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPLayer(DecoderLayer):
    """One MTP module: h' = eh_proj([enorm(Emb(t_{i+k})); hnorm(h_i)]) -> decoder layer -> shared head."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = SharedHead(cfg)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        L = cfg.num_hidden_layers
        self.layers = nn.ModuleList([DecoderLayer(cfg, i) for i in range(L)]
                                    + [MTPLayer(cfg, L + j) for j in range(cfg.num_nextn_predict_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Transformer(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False
        self.register_state_dict_post_hook(CausalLM._hf_state_dict)
        self.register_load_state_dict_pre_hook(CausalLM._drop_hf_copies)

    # -------------------------------------------------------------------- state dict <-> HF names
    def _mtp_copies(self) -> dict[str, str]:
        """MTP names the HF checkpoint stores as copies of shared tensors -> the main tensor's name."""
        L = self.cfg.num_hidden_layers
        out = {}
        for j in range(self.cfg.num_nextn_predict_layers):
            out[f"model.layers.{L + j}.embed_tokens.weight"] = "model.embed_tokens.weight"
            out[f"model.layers.{L + j}.shared_head.head.weight"] = (
                "model.embed_tokens.weight" if self.cfg.tie_word_embeddings else "lm_head.weight")
        return out

    @staticmethod
    def _hf_state_dict(module, state_dict, prefix, local_metadata):
        if module.cfg.tie_word_embeddings:
            state_dict.pop(prefix + "lm_head.weight", None)
        for copy_name, main in module._mtp_copies().items():
            state_dict[prefix + copy_name] = state_dict[prefix + main]

    @staticmethod
    def _drop_hf_copies(module, state_dict, prefix, *args):
        for copy_name in module._mtp_copies():
            state_dict.pop(prefix + copy_name, None)
        if (module.cfg.tie_word_embeddings and prefix + "lm_head.weight" not in state_dict
                and prefix + "model.embed_tokens.weight" in state_dict):
            state_dict[prefix + "lm_head.weight"] = state_dict[prefix + "model.embed_tokens.weight"]

    # -------------------------------------------------------------------- forward
    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        p = self.lm_head.weight
        return build_kv_cache(self.cfg, batch_size, max_len, p.device, p.dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                compute_mtp: bool = False, segment_ids: torch.Tensor | None = None,
                routed_experts: torch.Tensor | None = None, return_routes: bool = False) -> ModelOutput:
        """input_ids [B, T]; attention_mask [B, T] (1 = token, 0 = pad; left or right padding);
        with `cache`, the T tokens are appended after the cache's `length` positions. `segment_ids` [B, T]
        (packed training sequences): attention stays within a segment and positions restart at each segment.
        `routed_experts` [B, T, num_moe_layers, K]: routing replay, every MoE layer uses these experts (a rollout
        engine's) instead of choosing its own; `return_routes` fills `ModelOutput.routed_experts`."""
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids (packed sequences) cannot be combined with a KV cache")
        cfg = self.cfg
        B, T = input_ids.shape
        device = input_ids.device
        start = cache.length if cache is not None else 0
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"KV cache overflow: {start} + {T} tokens > max_len {cache.max_len}")
        valid_BT = attention_mask.bool() if attention_mask is not None else None
        if cache is not None:
            cache.valid_BS[:, start:start + T] = True if valid_BT is None else valid_BT
        if position_ids is None and segment_ids is not None:
            position_ids = _segment_positions(segment_ids)
        if position_ids is None:
            if valid_BT is None:
                base = torch.arange(T, device=device)[None].expand(B, T)
                position_ids = base + (cache.next_pos_B[:, None] if cache is not None else start)
            else:
                offset = cache.next_pos_B[:, None] if cache is not None else 0
                position_ids = (valid_BT.long().cumsum(-1) - 1).clamp(min=0) + offset
        if cache is not None:
            cache.next_pos_B += T if valid_BT is None else valid_BT.long().sum(-1)

        S = start + T
        causal_no_mask = cache is None and valid_BT is None and segment_ids is None
        if causal_no_mask:
            mask = None
        elif segment_ids is not None and valid_BT is None:  # packed rows: causal attention within each segment
            mask = build_segment_layout(segment_ids)
        else:
            valid_BS = cache.valid_BS if cache is not None else valid_BT
            mask = build_attention_mask(valid_BS, start, T, S, device, segment_ids)

        x = self.model.embed_tokens(input_ids)
        rotary = self.model.layers[0].self_attn.rotary
        cos, sin = rotary(position_ids, x.dtype)
        counts, routes, aux = [], [], x.new_zeros((), dtype=torch.float32)
        moe_layers = cfg.moe_layer_ids()
        if routed_experts is not None and tuple(routed_experts.shape[:3]) != (B, T, len(moe_layers)):
            raise ValueError(f"routed_experts: shape {tuple(routed_experts.shape)} does not match [B={B}, T={T}, "
                             f"num_moe_layers={len(moe_layers)}, K]")
        for i in range(cfg.num_hidden_layers):
            layer = self.model.layers[i]
            cache_layer = cache.layers[i] if cache is not None else None
            replay = routed_experts[:, :, moe_layers.index(i)] if routed_experts is not None and i in moe_layers \
                else None
            if self.gradient_checkpointing and self.training:
                x, stats = checkpoint(layer, x, cos, sin, mask, cache_layer, start, causal_no_mask, valid_BT, replay,
                                      use_reentrant=False)
            else:
                x, stats = layer(x, cos, sin, mask, cache_layer, start, causal_no_mask, valid_BT, replay)
            if stats is not None:
                counts.append(stats.counts_E)
                aux = aux + stats.aux_loss
                if return_routes:
                    routes.append(stats.idx_NK.view(B, T, -1))
        if cache is not None:
            cache.length = S
        hidden = self.model.norm(x)
        out = ModelOutput(logits=self.lm_head(hidden), hidden=hidden, aux_loss=aux,
                          expert_counts=torch.stack(counts) if counts else None,
                          routed_experts=torch.stack(routes, dim=2) if routes else None)
        if compute_mtp and cfg.num_nextn_predict_layers:
            # MTP depth 1 reads the main model's final *normed* hidden state, as megatron-core's MTP block and
            # SGLang's DeepSeek NextN draft model do (both serve the released MTP weights).
            out.mtp_logits = self._mtp_forward(hidden, input_ids, cos, sin, mask, causal_no_mask, valid_BT)
        return out

    def _mtp_forward(self, h, input_ids, cos, sin, mask, causal_no_mask, valid_BT) -> list[torch.Tensor]:
        """Depth k consumes h^{k-1}_i and Emb(t_{i+k}); position i then predicts t_{i+1+k}. The last k positions
        have no next token: their input embedding is token 0 and their logits must be masked by the loss."""
        logits = []
        for k, layer in enumerate(self.model.layers[self.cfg.num_hidden_layers:], start=1):
            nxt = torch.roll(input_ids, shifts=-k, dims=1)
            nxt[:, -k:] = 0
            e = layer.enorm(self.model.embed_tokens(nxt))
            h = layer.eh_proj(torch.cat([e, layer.hnorm(h)], dim=-1))
            h, _ = DecoderLayer.forward(layer, h, cos, sin, mask, None, 0, causal_no_mask, valid_BT)
            logits.append(self.lm_head(layer.shared_head.norm(h)))
        return logits


def _segment_positions(segments_BT: torch.Tensor) -> torch.Tensor:
    """Positions restarting at 0 at each new segment id along the row."""
    T = segments_BT.shape[1]
    idx = torch.arange(T, device=segments_BT.device).expand_as(segments_BT)
    is_start = torch.ones_like(segments_BT, dtype=torch.bool)
    is_start[:, 1:] = segments_BT[:, 1:] != segments_BT[:, :-1]
    start_idx = torch.where(is_start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx


def _init_weights(model: CausalLM) -> None:
    std = model.cfg.initializer_range
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, RMSNorm):
            nn.init.ones_(m.weight)
    for name, p in model.named_parameters():
        if name.endswith(("experts.gate_proj", "experts.up_proj", "experts.down_proj", "gate.weight")):
            nn.init.normal_(p, 0.0, std)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.zero_()


def resolve_device(name: str) -> torch.device:
    """"auto" = cuda when torch sees a GPU, else cpu; any other name as torch spells it. A name torch does not know,
    or a CUDA device this machine does not have, is a ValueError naming it (before anything is built)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r} is not a device torch knows; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise ValueError(f"device {name!r}: this machine has {count} CUDA device(s) torch can use; use auto or "
                             f"cpu" + (f", or cuda:0..cuda:{count - 1}" if count else ""))
    return device


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                seed: int | None = None) -> CausalLM:
    """A new randomly initialised model. device="meta" allocates nothing (then stream weights in with
    `load_hf_tensor` after `model.to_empty(device=...)`). Weights are drawn on the CPU and then moved, so one seed
    gives the same model on every device (CUDA's generator draws other numbers)."""
    if seed is not None:
        torch.manual_seed(seed)
    meta = str(device) == "meta"
    with torch.device("meta" if meta else "cpu"):
        model = CausalLM(cfg)
    if not meta:
        _init_weights(model)
    model.to(device=device, dtype=dtype)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.data = b.data.float()
    return model


# ---------------------------------------------------------------------------------------------- HF tensors
def hf_tensor_slot(model: CausalLM, name: str) -> torch.Tensor:
    """The tensor (or the expert slice of a stacked tensor) that the HF tensor `name` is stored in.
    KeyError naming the tensor if the model has no such tensor."""
    slots = getattr(model, "_hf_slots", None)
    if slots is None:
        slots = {}
        for n, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
            slots[n] = t
        for mod_name, mod in model.named_modules():
            if hasattr(mod, "num_experts") and hasattr(mod, "NAMES"):
                for w in mod.NAMES:
                    stacked = getattr(mod, w)
                    for e in range(mod.num_experts):
                        slots[f"{mod_name}.{e}.{w}.weight"] = (stacked, e)
        for copy_name, main in model._mtp_copies().items():
            slots[copy_name] = slots[main]
        if model.cfg.tie_word_embeddings:
            slots["lm_head.weight"] = slots["model.embed_tokens.weight"]
        model._hf_slots = slots
    if name not in slots:
        raise KeyError(f"tensor {name!r} does not exist in a {model.cfg.architecture} with this config")
    slot = slots[name]
    return slot[0][slot[1]] if isinstance(slot, tuple) else slot


@torch.no_grad()
def load_hf_tensor(model: CausalLM, name: str, tensor: torch.Tensor) -> None:
    """Copy one HF-named tensor into the model; shape disagreements name the tensor and both shapes."""
    dst = hf_tensor_slot(model, name)
    if tuple(dst.shape) != tuple(tensor.shape):
        raise ValueError(f"tensor {name!r}: checkpoint shape {tuple(tensor.shape)} != model shape "
                         f"{tuple(dst.shape)} from config")
    dst.copy_(tensor.to(dst.dtype))



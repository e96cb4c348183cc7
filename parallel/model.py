"""Process groups and the megatron-core GPTModel (Transformer Engine spec) built from our ModelConfig.

    initialize_parallel(pcfg, seed=1234)                 # torch.distributed + megatron parallel_state
    models = build_mcore_model(cfg, pcfg, MegatronOptions(fp8="blockwise"), hf_weights=get_hf)
    ...                                                  # parallel/train.py: build_optimizer, train_step

Upstream: megatron-core 0.19 `examples/run_simple_mcore_train_loop.py` (init, GPTModel, DDP), `gpt_layer_specs`
(`get_gpt_decoder_block_spec`, `get_gpt_mtp_block_spec`). megatron is imported inside the functions, so this
module imports on machines without it.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import socket
from collections.abc import Callable

import torch

from r1moe.model import ModelConfig

from .config import ParallelConfig
from .mapping import hf_to_mcore_state
from .mcore_config import MegatronOptions, build_transformer_config, gpt_model_kwargs


def initialize_parallel(pcfg: ParallelConfig, seed: int = 1234, *, timeout_minutes: int = 30) -> None:
    """Start torch.distributed (env:// as set by torchrun; a 1-process group when run as plain python) and
    megatron's process groups. Keyword arguments only: initialize_model_parallel's positional order changed
    between megatron-core 0.16 and 0.19."""
    import datetime

    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain `python script.py`: a world of one
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(port))
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl", timeout=datetime.timedelta(minutes=timeout_minutes))
    pcfg.validate(None, dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=pcfg.tp,
        pipeline_model_parallel_size=pcfg.pp,
        context_parallel_size=pcfg.cp,
        expert_model_parallel_size=pcfg.ep,
        expert_tensor_parallel_size=pcfg.expert_tp,
        distributed_timeout_minutes=timeout_minutes,
    )
    model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_coords() -> dict[str, int]:
    """This rank's (pp, tp, ep, etp) coordinates: what selects its shard in parallel/mapping.py."""
    from megatron.core import parallel_state as ps

    return {"pp_rank": ps.get_pipeline_model_parallel_rank(), "tp_rank": ps.get_tensor_model_parallel_rank(),
            "ep_rank": ps.get_expert_model_parallel_rank(), "etp_rank": ps.get_expert_tensor_parallel_rank()}


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside megatron's DDP (and Float16Module) wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _mla_without_q_norm_spec(spec, tcfg):
    """q_lora_rank=None (DeepSeek-V2-Lite / Moonlight shape): megatron 0.19's QKNormConfigResolver fuses an extra
    RMSNorm into linear_q_proj whenever qk_layernorm=True, a norm the checkpoint does not have. This MLA subclass
    keeps a plain column-parallel q projection (kv_a_layernorm stays fused into linear_kv_up_proj)."""
    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    class MLASelfAttentionNoQNorm(MLASelfAttention):
        def _resolve_qk_norm_config(self, submodules):
            resolved = super()._resolve_qk_norm_config(submodules)
            resolved["linear_q_proj"] = TEColumnParallelLinear
            return resolved

    spec = copy.deepcopy(spec)  # the TE layer specs are shared objects; leave them untouched for other models
    for layer_spec in spec.layer_specs:
        layer_spec.submodules.self_attention.module = MLASelfAttentionNoQNorm
    return spec


def build_mcore_model(cfg: ModelConfig, pcfg: ParallelConfig, opts: MegatronOptions | None = None, *,
                      dtype: torch.dtype = torch.bfloat16, wrap_ddp: bool = True,
                      hf_weights: Callable[[str], torch.Tensor] | None = None,
                      prepare: Callable[[torch.nn.Module], None] | None = None) -> list[torch.nn.Module]:
    """The megatron model chunks of this rank (one chunk: no virtual pipeline stages).

    hf_weights: `get(hf_name) -> full tensor` (r1moe.model.hf_io.HFReader reads an HF directory lazily); loaded before
    the DDP wrapper and the optimizer exist, so the optimizer's fp32 master copy starts from these weights.
    wrap_ddp: megatron DDP with the distributed-optimizer grad buffer (needed by train_step; off for scoring).
    prepare: called with the GPTModel once its weights are loaded, before DDP builds its grad buffers from the
    trainable parameters (a reward model adds its score head and freezes the unused LM head here).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec

    pcfg.validate(cfg, dist.get_world_size())
    opts = opts or MegatronOptions()
    if not wrap_ddp and opts.grad_accum_fusion:
        opts = dataclasses.replace(opts, grad_accum_fusion=False)
    tcfg = build_transformer_config(cfg, pcfg, opts, dtype)
    spec = get_gpt_decoder_block_spec(tcfg, use_transformer_engine=True)
    if cfg.is_moe and cfg.q_lora_rank is None:
        spec = _mla_without_q_norm_spec(spec, tcfg)
    mtp_spec = get_gpt_mtp_block_spec(tcfg, spec, use_transformer_engine=True) if tcfg.mtp_num_layers else None
    model = GPTModel(config=tcfg, transformer_layer_spec=spec,
                     pre_process=parallel_state.is_pipeline_first_stage(),
                     post_process=parallel_state.is_pipeline_last_stage(),
                     mtp_block_spec=mtp_spec, **gpt_model_kwargs(cfg, pcfg))
    model.cuda(torch.cuda.current_device())
    if hf_weights is not None:
        load_hf_weights([model], cfg, pcfg, hf_weights)
    if prepare is not None:
        prepare(model)
    if wrap_ddp:
        ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                use_distributed_optimizer=True, check_for_nan_in_grad=False)
        model = DistributedDataParallel(config=tcfg, ddp_config=ddp_cfg, module=model)
        tcfg.finalize_model_grads_func = finalize_model_grads
    return [model]


def _local_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by state-dict name, without TE's `_extra_state` (FP8 metadata)."""
    out = dict(module.named_parameters())
    out.update({n: b for n, b in module.named_buffers() if n.endswith("expert_bias")})
    return out


@torch.no_grad()
def load_hf_weights(models: list[torch.nn.Module], cfg: ModelConfig, pcfg: ParallelConfig,
                    get_hf: Callable[[str], torch.Tensor]) -> None:
    """Copy full HF tensors into this rank's megatron shards. Every local tensor must be covered and every
    shape must match; errors name the tensor. After the optimizer exists call optimizer.reload_model_params()."""
    module = unwrap(models[0])
    local = _local_tensors(module)
    state = hf_to_mcore_state(cfg, pcfg, get_hf, **rank_coords())
    missing = sorted(set(local) - set(state))
    unknown = sorted(set(state) - set(local))
    if missing or unknown:
        raise ValueError(f"mapping/model mismatch: megatron tensors without an HF source {missing[:8]}, "
                         f"mapped names the model lacks {unknown[:8]}")
    for name, t in state.items():
        dst = local[name]
        if tuple(dst.shape) != tuple(t.shape):
            raise ValueError(f"{name}: HF-derived shape {tuple(t.shape)} != megatron shape {tuple(dst.shape)}")
        dst.copy_(t.to(device=dst.device, dtype=dst.dtype))

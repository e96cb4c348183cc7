"""Weight export for rollouts: any TP/EP/PP layout -> full HF-named tensors, in size-bounded buckets.

    for bucket in export_hf_weights(models, cfg, pcfg, bucket_bytes=1 << 30):
        for name, tensor in bucket:          # e.g. "model.layers.3.mlp.experts.17.gate_proj.weight"
            load_hf_tensor(rollout_model, name, tensor)      # r1moe.model; SGLang takes the same pairs

Every rank receives every tensor (collectives: all-gather over TP / expert-TP, all-gather over EP, broadcast
from the owning pipeline stage), so a rollout engine may sit on any rank. Ranks must iterate the generator
together. Yielded tensors may alias the training parameters (TP=EP=PP=1): consume (copy) a bucket before the
next optimizer step. Order and names follow parallel/mapping.py; the MTP module's embedding/head copies of the
DeepSeek-V3 checkpoint are emitted too, so the stream is exactly the reference model's state dict.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from r1moe.model import ModelConfig

from .config import ParallelConfig
from .mapping import Entry, hf_copies, stage_entries, unshard
from .model import _local_tensors, unwrap


def _hf_meta(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Shape and dtype of every HF tensor, from the reference model on the meta device (allocates nothing)."""
    from r1moe.model import build_model

    meta = build_model(cfg, device="meta", dtype=dtype)
    return {n: (t.shape, t.dtype) for n, t in meta.state_dict().items()}


def _gather(t: torch.Tensor, group, size: int) -> list[torch.Tensor]:
    import torch.distributed as dist

    if size == 1:
        return [t]
    t = t.contiguous()
    out = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(out, t, group=group)
    return out


@torch.no_grad()
def export_hf_weights(models: list[torch.nn.Module], cfg: ModelConfig, pcfg: ParallelConfig,
                      bucket_bytes: int = 1 << 30) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield lists of (HF name, full tensor on this rank's GPU), each list about `bucket_bytes` large."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    module = unwrap(models[0])
    local = _local_tensors(module)
    dtype = next(iter(module.parameters())).dtype
    tp, etp, ep, pp = pcfg.tp, pcfg.expert_tp, pcfg.ep, pcfg.pp
    tp_group, etp_group = ps.get_tensor_model_parallel_group(), ps.get_expert_tensor_parallel_group()
    ep_group, pp_group = ps.get_expert_model_parallel_group(), ps.get_pipeline_model_parallel_group()
    my_pp, my_ep = ps.get_pipeline_model_parallel_rank(), ps.get_expert_model_parallel_rank()
    pp_ranks = dist.get_process_group_ranks(pp_group) if pp > 1 else None
    meta = _hf_meta(cfg, dtype) if pp > 1 else None
    copies: dict[str, list[str]] = {}
    for copy_name, src in hf_copies(cfg).items():
        copies.setdefault(src, []).append(copy_name)
    n_local = cfg.n_routed_experts // ep if cfg.is_moe else 0

    def owned(entry: Entry) -> list[tuple[str, torch.Tensor]]:
        """On the owning stage: the full HF tensors of one megatron tensor (all EP ranks' experts)."""
        t = local[entry.mcore]
        if not entry.expert:
            shards = _gather(t, tp_group, tp) if entry.split != "rep" else [t]
            return list(unshard(entry, shards, cfg).items())
        parts = unshard(entry, _gather(t, etp_group, etp), cfg)  # my expert, full width
        if ep == 1:
            return list(parts.items())
        e_local = int(entry.mcore.rsplit("weight", 1)[1])
        out = []
        gathered = {name: _gather(x, ep_group, ep) for name, x in parts.items()}
        for r in range(ep):
            for name in parts:
                out.append((_expert_name(name, my_ep * n_local + e_local, r * n_local + e_local), gathered[name][r]))
        return out

    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for stage in range(pp):
        for entry in stage_entries(cfg, pcfg, stage, my_ep):
            if entry.copy:
                continue
            if stage == my_pp:
                tensors = owned(entry)
            else:
                tensors = None
            if pp > 1:
                tensors = _broadcast_from_stage(entry, tensors, stage, pp_ranks, pp_group, meta, cfg, pcfg, my_ep,
                                                n_local)
            for name, t in tensors:
                bucket.append((name, t))
                size += t.numel() * t.element_size()
                for copy_name in copies.get(name, ()):
                    bucket.append((copy_name, t))
                    size += t.numel() * t.element_size()
            if size >= bucket_bytes:
                yield bucket
                bucket, size = [], 0
    if bucket:
        yield bucket


def _expert_name(name: str, mine: int, other: int) -> str:
    return name.replace(f".experts.{mine}.", f".experts.{other}.")


def _broadcast_from_stage(entry, tensors, stage, pp_ranks, pp_group, meta, cfg, pcfg, my_ep, n_local):
    """Send the owning stage's tensors to the other stages; receivers know names/shapes from the mapping."""
    import torch.distributed as dist

    if tensors is None:
        names = list(entry.hf)
        if entry.expert and pcfg.ep > 1:
            e_local = int(entry.mcore.rsplit("weight", 1)[1])
            names = [_expert_name(n, my_ep * n_local + e_local, r * n_local + e_local)
                     for r in range(pcfg.ep) for n in entry.hf]
        tensors = [(n, torch.empty(meta[n][0], dtype=meta[n][1], device="cuda")) for n in names]
    else:
        tensors = [(n, t.contiguous()) for n, t in tensors]
    for _, t in tensors:
        dist.broadcast(t, src=pp_ranks[stage], group=pp_group)
    return tensors

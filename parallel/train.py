"""One optimizer step on the megatron model: megatron's pipeline schedule around r1moe's shared loss functions.

    optimizer = build_optimizer(models, lr=3e-6, weight_decay=0.0)
    result = train_step(models, optimizer, microbatches, loss_fn)       # loss_fn(logits_BTV, mb) -> (loss, metrics)
    # result.update_successful is False when the loss or a gradient was NaN/inf: that step moved no weight
    logps = forward_only(models, microbatches, lambda logits, mb: compute_token_logprobs(logits, mb.targets))

The loss math is never re-implemented here: `loss_fn` is the trainer's closure over r1moe.algorithms
(compute_sft_loss, compute_grpo_loss, compute_token_logprobs), called on the full-vocabulary logits of one
micro-batch on the last pipeline stage. The model's output_processor hook (GPTModel._postprocess) gathers the
TP-split logits and drops the vocabulary padding, so `loss_fn` sees exactly what the reference model returns.

Loss scaling: the value `loss_fn` returns is this micro-batch's share of the step loss (the r1moe.algorithms
`loss_denominator` convention: the step loss is the SUM over micro-batches). Megatron divides every micro-batch
loss by num_microbatches, so it is multiplied back here. Gradients are averaged over data-parallel replicas.
MoE expert-bias updates (V3 §2.1.2) and DP/SP/embedding gradient reductions run in megatron's
finalize_model_grads at the end of the schedule; MTP's loss (lambda / D * sum_k L_MTP^k) is added by megatron.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch


class MicroBatch(Protocol):
    input_ids: torch.Tensor
    """[B, T] token ids; every micro-batch of a step has the same [B, T] (pipeline buffers are fixed-size)."""

    # Optional: `mtp_loss_mask` [B, T], 1 on the input positions whose token is a prediction target (0 on prompt
    # and padding). megatron computes the MTP loss inside the model with labels rolled from input_ids; the mask
    # keeps it to those tokens, as the reference loop's loss (absent or None: every position).
    # Optional: `segments` [B, T], packed rows (r1moe.train.packing: the document of each position, -1 padding):
    # the micro-batch runs as one THD sequence of B * T tokens in which attention never crosses a run of equal
    # segment ids and positions restart at each (`packed_sequences`), as the reference model's segment mask does.


LossFn = Callable[[torch.Tensor, Any], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]
HeadFn = Callable[[torch.Tensor, Any], torch.Tensor]
"""(final normed hidden states [B, T, H] of the full sequence, micro-batch) -> the model's output (a reward model:
scores [B]); runs in place of the LM head on the last pipeline stage."""


@dataclass
class StepResult:
    metrics: dict[str, float]
    """"loss": the step loss (sum of the micro-batch losses); loss_fn's other metrics averaged over micro-batches;
    both averaged over data-parallel replicas (same values on every rank)."""
    grad_norm: float | None
    """None when megatron does not clip (it then computes no norm); NaN when the step was skipped."""
    update_successful: bool
    """False: the loss or a gradient was NaN/inf (or an fp16 loss scaler overflowed) and no weight moved."""


def build_optimizer(models: list[torch.nn.Module], *, lr: float, weight_decay: float = 0.0,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, clip_grad: float = 1.0,
                    dtype: torch.dtype = torch.bfloat16):
    """Megatron's distributed Adam (fp32 master weights and moments sharded over data-parallel ranks; routed
    experts get their own optimizer over the expert-data-parallel group). float32 parameters in a bf16 model (a
    reward model's score head) get parameter groups of their own: megatron-core 0.19's DistributedOptimizer lists a
    group's shards float32-first (_build_model_and_main_param_groups) but indexes them in grad-buffer order
    (_build_optimizer_group_ranges, model_param_group_index_map), so in a mixed group a dist-checkpoint save or
    load pairs parameters with other parameters' optimizer state. The override {"optimizer": "adam"} (the optimizer
    every group uses) only makes their group keys distinct."""
    from megatron.core.optimizer import (
        OptimizerConfig,
        ParamKey,
        ParamPredicate,
        get_megatron_optimizer,
        get_standard_config_overrides,
    )

    ocfg = OptimizerConfig(optimizer="adam", lr=lr, min_lr=0.0, weight_decay=weight_decay, adam_beta1=betas[0],
                           adam_beta2=betas[1], adam_eps=eps, clip_grad=clip_grad, bf16=dtype == torch.bfloat16,
                           params_dtype=dtype, use_distributed_optimizer=True)
    overrides = get_standard_config_overrides(ocfg)  # what config_overrides=None gives, plus the float32 groups
    fp32 = ParamKey(predicate=ParamPredicate(name="float32", fn=lambda p: p.dtype == torch.float32))
    overrides[fp32] = {"optimizer": "adam"}
    optimizer = get_megatron_optimizer(ocfg, models, config_overrides=overrides)
    # megatron applies a group's wd_mult (0 for biases and 1-D parameters: norms, a score head's bias) only in its
    # OptimizerParamScheduler, which is not used here (set_learning_rate): without this every group would decay,
    # unlike the reference backend's AdamW groups (train/common.py build_optimizer)
    for group in optimizer.param_groups:
        group["weight_decay"] = weight_decay * group.get("wd_mult", 1.0)
    return optimizer


def set_learning_rate(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _logits_processor(*, hidden_states, output_layer, output_weight, context, **_unused) -> torch.Tensor:
    """GPTModel output_processor: [s, b, h] -> full-vocabulary logits [b, s, V] (TP-gathered, padding dropped).
    Without sequence parallelism the (small) hidden states are transposed before the head GEMM, so the (large)
    logits and their gradient are born contiguous in [b, s, V]; with it the head must gather along s first."""
    if output_layer.sequence_parallel:
        logits, _ = output_layer(hidden_states, weight=output_weight, runtime_gather_output=True)
        logits = logits.transpose(0, 1)
    else:
        logits, _ = output_layer(hidden_states.transpose(0, 1), weight=output_weight, runtime_gather_output=True)
    vocab = context
    return logits[..., :vocab] if logits.shape[-1] != vocab else logits


def _hidden_processor(*, hidden_states, output_layer, context, **_unused) -> torch.Tensor:
    """GPTModel output_processor of a model with its own head (`head_fn`, e.g. a reward model's score):
    [s, b, h] final normed hidden states -> head_fn(hidden_BTH, mb); the LM head is not run. With sequence
    parallelism the sequence is gathered first, and the gather's backward takes this rank's slice without a
    reduction: the head runs the same, on the same full hidden states, on every TP rank."""
    head_fn, mb = context
    if output_layer.sequence_parallel:
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False)
    return head_fn(hidden_states.transpose(0, 1), mb)


def _run_schedule(models, microbatches: Sequence[Any], vocab_size: int, loss_func_for: Callable,
                  forward_only: bool, head_fn: Callable | None = None) -> list[dict[str, torch.Tensor]]:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not microbatches:
        raise ValueError("train_step needs at least one micro-batch")
    B, T = microbatches[0].input_ids.shape
    for i, mb in enumerate(microbatches):
        if tuple(mb.input_ids.shape) != (B, T):
            raise ValueError(f"micro-batch {i} has shape {tuple(mb.input_ids.shape)}, micro-batch 0 has {(B, T)}")
    device = torch.device("cuda", torch.cuda.current_device())
    position_ids = torch.arange(T, device=device).unsqueeze(0).expand(B, T)
    packed = getattr(microbatches[0], "segments", None) is not None
    if packed and (head_fn is not None or getattr(microbatches[0], "routes", None) is not None):
        raise ValueError("packed micro-batches (segments) are for next-token training: no head_fn, no routes")

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        apply_routing_replay(model, getattr(mb, "routes", None))
        tokens = mb.input_ids.to(device, non_blocking=True)
        mask = getattr(mb, "mtp_loss_mask", None)
        mask = None if mask is None else mask.to(device, torch.float32, non_blocking=True)
        pos, psp, loss_func = position_ids, None, loss_func_for(mb)
        if packed:
            pos, psp = packed_sequences(mb.segments.to(device, non_blocking=True))
            tokens, mask = tokens.reshape(1, B * T), None if mask is None else mask.reshape(1, B * T)
            loss_func = _unflatten(loss_func, B, T)
        out = model(tokens, pos, None,
                    output_processor=_logits_processor if head_fn is None else _hidden_processor,
                    output_processor_context=vocab_size if head_fn is None else (head_fn, mb),
                    loss_mask=mask, packed_seq_params=psp)
        return out, loss_func

    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(microbatches), model=models,
        num_microbatches=len(microbatches), seq_length=B * T if packed else T, micro_batch_size=1 if packed else B,
        forward_only=forward_only)


def packed_sequences(segments_BT: torch.Tensor):
    """(position ids [1, B*T], megatron PackedSeqParams) of B packed rows run as one THD sequence: every run of
    equal segment ids in a row (a document, or the row's padding) is a sequence of its own (`packed_layout`)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    position_ids, cu, longest = packed_layout(segments_BT)
    return position_ids, PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                                         max_seqlen_kv=longest)


def packed_layout(segments_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """B rows of segment ids flattened row after row: (positions [1, B*T] restarting at 0 in every run of equal ids,
    cumulative run lengths [runs + 1] int32 from 0 to B*T, the longest run)."""
    from r1moe.model.segments import segment_runs

    B, T = segments_BT.shape
    start, starts = segment_runs(segments_BT)
    cu = torch.cat([starts, starts.new_tensor([B * T])]).to(torch.int32)
    position_ids = torch.arange(B * T, device=segments_BT.device) - starts[torch.cumsum(start, 0) - 1]
    return position_ids.unsqueeze(0), cu, int((cu[1:] - cu[:-1]).max())


def _unflatten(loss_func: Callable, B: int, T: int) -> Callable:
    """The loss of a packed micro-batch sees its logits as [B, T, V] again (the model returned [1, B*T, V])."""
    def f(out, *args, **kwargs):
        return loss_func(out.reshape(B, T, *out.shape[2:]), *args, **kwargs)
    return f


def apply_routing_replay(model: torch.nn.Module, routes_BTMK: torch.Tensor | None) -> None:
    """Routing replay (R3) through megatron-core's RouterReplay (TransformerConfig.moe_enable_routing_replay): every
    MoE layer of this model chunk routes the next forward's tokens to `routes_BTMK` [B, T, num_moe_layers, K] (the
    rollout engine's experts, HF layer order); None: each router chooses (MTP routers always do: they are left out). Megatron flattens
    tokens sequence-first ([T, B]); with sequence parallelism a TP rank routes only its block of positions. The
    backward reuses the forward's routing (no recompute of the router; recompute + PP is refused in the checks)."""
    from megatron.core import parallel_state as ps

    routers = [m.router_replay for name, m in model.named_modules()
               if getattr(m, "router_replay", None) is not None and "mtp" not in name.split(".")]
    if not routers:
        if routes_BTMK is not None:
            raise ValueError("routing replay: the megatron model was built without moe_enable_routing_replay")
        return
    from megatron.core.transformer.moe.router_replay import RouterReplayAction
    from megatron.core.utils import get_model_config

    freq = get_model_config(model).moe_layer_freq
    moe_ids = [i for i, f in enumerate(freq) if f] if isinstance(freq, list) else list(range(len(routers)))
    if routes_BTMK is not None:
        # padding positions carry placeholder ids (repeated expert 0): megatron's routing map counts an expert once
        # per token, so give such tokens K distinct experts (real tokens never repeat one)
        srt = routes_BTMK.sort(-1).values
        dup = (srt[..., 1:] == srt[..., :-1]).any(-1, keepdim=True)
        distinct = torch.arange(routes_BTMK.shape[-1], device=routes_BTMK.device, dtype=routes_BTMK.dtype)
        routes_BTMK = torch.where(dup, distinct, routes_BTMK)
        r_TBMK = routes_BTMK.transpose(0, 1)
        if get_model_config(model).sequence_parallel and ps.get_tensor_model_parallel_world_size() > 1:
            n = r_TBMK.shape[0] // ps.get_tensor_model_parallel_world_size()
            r_TBMK = r_TBMK[ps.get_tensor_model_parallel_rank() * n:(ps.get_tensor_model_parallel_rank() + 1) * n]
        if r_TBMK.shape[2] != len(moe_ids):
            raise ValueError(f"routing replay: routes for {r_TBMK.shape[2]} MoE layers, the model has {len(moe_ids)}")
    for router in routers:
        router.clear_indices()
        layer = getattr(router, "layer_number", None)
        if routes_BTMK is None or layer is None or layer - 1 not in moe_ids:
            router.clear_router_replay_action()
            continue
        k = moe_ids.index(layer - 1)
        router.set_target_indices(r_TBMK[:, :, k].reshape(-1, r_TBMK.shape[-1]).to(torch.long).contiguous())
        router.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)


def _reduce_metrics(reduced: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """"loss" summed over micro-batches (each is its share of the step loss), other metrics averaged; then the
    same on every rank (broadcast from the last pipeline stage, mean over data-parallel replicas)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    keys = sorted(reduced[0]) if reduced else []
    pp_group = ps.get_pipeline_model_parallel_group()
    if ps.get_pipeline_model_parallel_world_size() > 1:
        last = dist.get_process_group_ranks(pp_group)[-1]
        names = [keys]
        dist.broadcast_object_list(names, src=last, group=pp_group)
        keys = names[0]
    vals = torch.zeros(len(keys), device="cuda", dtype=torch.float32)
    if reduced:
        per_mb = [torch.stack([r[k].float().reshape(()) for r in reduced]) for k in keys]
        vals = torch.stack([v.sum() if k == "loss" else v.mean() for k, v in zip(keys, per_mb)])
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(vals, src=last, group=pp_group)
    if ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(vals, group=ps.get_data_parallel_group())
        vals /= ps.get_data_parallel_world_size()
    return dict(zip(keys, vals.tolist()))


def train_step(models: list[torch.nn.Module], optimizer, microbatches: Sequence[MicroBatch], loss_fn: LossFn,
               vocab_size: int, head_fn: HeadFn | None = None) -> StepResult:
    """Forward + backward over all micro-batches (1F1B when pp > 1), gradient reductions, one optimizer step.
    `head_fn(hidden_BTH, mb)` replaces the LM head: loss_fn then receives its output instead of logits."""
    n = len(microbatches)
    for m in models:
        m.zero_grad_buffer()
    optimizer.zero_grad()

    def loss_func_for(mb):
        def loss_func(logits_BTV):
            loss, metrics = loss_fn(logits_BTV, mb)
            # megatron divides by num_microbatches; the shared losses are already step-normalised (see docstring)
            return loss * n, {"loss": loss.detach(), **{k: v.detach() for k, v in metrics.items()}}
        return loss_func

    reduced = _run_schedule(models, microbatches, vocab_size, loss_func_for, forward_only=False, head_fn=head_fn)
    metrics = _reduce_metrics(reduced)
    # megatron's bf16 optimizer applies NaN/inf gradients (only an fp16 loss scaler checks them): the step is
    # skipped here instead, before any weight moves; both checks give the same answer on every rank
    grads_ok = all_finite([g for m in models for g in _grads(m)])
    if not (math.isfinite(metrics.get("loss", 0.0)) and grads_ok):
        optimizer.zero_grad()
        return StepResult(metrics=metrics, grad_norm=float("nan"), update_successful=False)
    ok, grad_norm, _ = optimizer.step()
    return StepResult(metrics=metrics, grad_norm=None if grad_norm is None else float(grad_norm),
                      update_successful=bool(ok))


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    """The gradients megatron's DDP accumulated (`main_grad`, the grad buffer), else `.grad`."""
    out = []
    for p in model.parameters():
        g = getattr(p, "main_grad", None)
        if g is None:
            g = p.grad
        if g is not None:
            out.append(g)
    return out


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """No NaN/inf in any of this rank's `tensors`, nor in any other rank's (a MAX all-reduce over the world, so
    every rank gets the same answer). Collective: all ranks call it together."""
    import torch.distributed as dist

    device = tensors[0].device if tensors else torch.device("cuda", torch.cuda.current_device())
    bad = torch.zeros((), dtype=torch.float32, device=device)
    for t in tensors:
        if t.is_floating_point() and t.numel():
            bad = torch.maximum(bad, (~torch.isfinite(t)).any().float())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0


@torch.no_grad()
def forward_only(models: list[torch.nn.Module], microbatches: Sequence[MicroBatch],
                 fn: Callable[[torch.Tensor, Any], torch.Tensor], vocab_size: int,
                 head_fn: HeadFn | None = None) -> list[torch.Tensor] | None:
    """Per micro-batch fn(logits_BTV, mb) (e.g. token log-probs of the old / reference policy), or fn(head output,
    mb) with `head_fn` (train_step). Results live on the last pipeline stage; other stages get None."""
    for m in models:
        m.eval()
    try:
        def loss_func_for(mb):
            def loss_func(logits_BTV, non_loss_data=False):
                return torch.zeros((), device=logits_BTV.device), {"out": fn(logits_BTV, mb)}
            return loss_func

        reduced = _run_schedule(models, microbatches, vocab_size, loss_func_for, forward_only=True, head_fn=head_fn)
    finally:
        for m in models:
            m.train()
    return [r["out"] for r in reduced] if reduced else None

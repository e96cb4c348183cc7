"""The GRPO policy on either training backend, behind one protocol, so that the loop in grpo.py has no backend
branches (slime's `train.py` / torchtitan's TrainSpec shape): `ReferencePolicy` (the pure-PyTorch CausalLM, CPU
or one GPU) here, `MegatronPolicy` (r1moe.parallel, TP/EP/PP) in megatron_backend.py.

A policy owns the trained weights, pi_ref, the optimizer and the LR schedule, and its checkpoints. It never
generates: rollout engines (r1moe.rollout) get its weights through `export_to`. Log-probs are of the policy at the
rollout temperature, `log softmax(logits / T)` (T = 0 counts as 1), on both sides of the importance ratio and for
pi_ref: the samples come from that tempered policy (verl and TRL do the same), and both engines report logprobs in
that meaning (rollout/base.py).

Routing replay (`rollout.routing_replay`, R3): the batch carries the experts the engine routed each token to, and
every forward of the update (pi_old, pi_theta, pi_ref) routes by them, so the trainer computes the log-probs of the
expert choice that actually generated the tokens.

Legend: N sequences, T padded sequence length, M MoE layers, K experts per token.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from tokenizers import Tokenizer

from r1moe.algorithms import compute_grpo_loss, compute_loss_denominator, compute_token_logprobs
from r1moe.config import AlgoSection, JobConfig
from r1moe.model import CausalLM, ModelConfig
from r1moe.rollout import Generation
from r1moe.tracking import MetricsLogger

from . import checkpointing, common, rundir
from .guard import NonFiniteGuard


@dataclass
class RLBatch:
    input_ids_NT: torch.Tensor
    attention_mask_NT: torch.Tensor
    targets_NT: torch.Tensor
    response_mask_NT: torch.Tensor
    """True where the target is a generated token (the policy's action)."""
    rollout_logp_NT: torch.Tensor | None = None
    """The rollout engine's logprob of each target (0 off the response); for the engine/trainer mismatch metric."""
    routes_NTMK: torch.Tensor | None = None
    """Routing replay: the engine's expert ids for every input position (0 on padding; uint8, or int16 past 256
    experts: the routers cast them when they use them)."""

    def rows(self, idx: slice) -> RLBatch:
        lp = None if self.rollout_logp_NT is None else self.rollout_logp_NT[idx]
        routes = None if self.routes_NTMK is None else self.routes_NTMK[idx]
        return RLBatch(self.input_ids_NT[idx], self.attention_mask_NT[idx], self.targets_NT[idx],
                       self.response_mask_NT[idx], lp, routes)


def build_rl_batch(gens: list[Generation], pad_id: int, device: torch.device) -> RLBatch:
    """prompt + completion, right-padded; inputs are seq[:-1], targets seq[1:]; loss only on completion tokens.
    Routes (routing replay) come along when every generation has them."""
    T = max(len(g.prompt_ids) + len(g.token_ids) for g in gens) - 1
    N = len(gens)
    with_routes = all(g.routed_experts is not None for g in gens)
    if not with_routes and any(g.routed_experts is not None for g in gens):
        raise ValueError("build_rl_batch: some generations carry routed_experts and some do not")
    routes = (torch.zeros((N, T, *gens[0].routed_experts.shape[1:]), dtype=gens[0].routed_experts.dtype)
              if with_routes else None)  # the engine's compact integer type: L*K ids per token add up at scale
    ids = torch.full((N, T), pad_id, dtype=torch.long)
    tgt = torch.full((N, T), pad_id, dtype=torch.long)
    att = torch.zeros((N, T), dtype=torch.long)
    resp = torch.zeros((N, T), dtype=torch.bool)
    lp = torch.zeros((N, T), dtype=torch.float32)
    for n, g in enumerate(gens):
        seq = g.prompt_ids + g.token_ids
        L = len(seq) - 1
        ids[n, :L] = torch.tensor(seq[:-1])
        tgt[n, :L] = torch.tensor(seq[1:])
        att[n, :L] = 1
        resp[n, len(g.prompt_ids) - 1:L] = True
        if g.logprobs:
            lp[n, len(g.prompt_ids) - 1:L] = torch.tensor(g.logprobs, dtype=torch.float32)
        if routes is not None:
            if g.routed_experts.shape[0] != L:
                raise ValueError(f"build_rl_batch: sequence {n} has {L} input tokens but routes for "
                                 f"{g.routed_experts.shape[0]}")
            routes[n, :L] = g.routed_experts
    return RLBatch(ids.to(device), att.to(device), tgt.to(device), resp.to(device), lp.to(device),
                   None if routes is None else routes.to(device))


def logprob_mismatch(trainer_logp_NT: torch.Tensor, batch: RLBatch) -> dict[str, float]:
    """Mean and max |log pi_trainer - log pi_engine| over response tokens, before any update (same weights)."""
    if batch.rollout_logp_NT is None or not batch.response_mask_NT.any():
        return {}
    d = (trainer_logp_NT.detach().float() - batch.rollout_logp_NT.float()).abs()[batch.response_mask_NT]
    return {"rollout/logprob_abs_diff": float(d.mean()), "rollout/logprob_abs_diff_max": float(d.max())}


def sequence_logprobs(model: CausalLM, b: RLBatch, temperature: float = 1.0, expert_counts: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi_T of every target. Sequences are right-padded, so under a causal mask no real token ever sees a pad:
    the unmasked (fast, fused) attention path gives the same values on real positions. Only the expert counts
    need the mask, to leave pad tokens out of the load statistics."""
    out = model(b.input_ids_NT, attention_mask=b.attention_mask_NT if expert_counts else None,
                routed_experts=b.routes_NTMK)
    return compute_token_logprobs(out.logits, b.targets_NT, temperature=temperature or 1.0), out.expert_counts


class Policy(Protocol):
    """What the GRPO loop needs of a training backend. Every method is collective: all ranks call it."""

    model_cfg: ModelConfig
    is_main: bool

    @property
    def lr(self) -> float: ...

    def train_grpo(self, batch: RLBatch, adv_N: torch.Tensor, a: AlgoSection, norm_const: float,
                   temperature: float, guard: NonFiniteGuard | None = None, step: int = 0) -> dict[str, float]:
        """log pi_old and log pi_ref before any update, then one optimizer step per mini-batch (R1 eq. 1); a
        mini-batch whose loss or gradient is NaN/inf is skipped and counted by `guard` (train/guard.py)."""
        ...

    def refresh_ref(self) -> None: ...

    def rollout_model(self) -> CausalLM:
        """A reference CausalLM a built-in engine can sample from (the live module where that is possible)."""
        ...

    def export_to(self, engine) -> None:
        """The current weights into a rollout engine (HF names, full tensors); nothing when it shares them."""
        ...

    def broadcast(self, obj: Any) -> Any: ...

    def save_checkpoint(self, run_dir: Path, step: int, extra: dict | None = None) -> None: ...

    def restore(self, run_dir: Path) -> int:
        """The step of the newest checkpoint (0: none); its `extra` is left in `self.trainer_extra`."""
        ...

    def save_final(self, run_dir: Path, tok: Tokenizer, summary: dict[str, Any]) -> None: ...

    def build_logger(self, cfg: JobConfig, run_dir: Path): ...


class ReferencePolicy:
    """The pure-PyTorch policy (r1moe.model.CausalLM) with AdamW, a frozen pi_ref and HF-directory checkpoints."""

    is_main = True

    def __init__(self, cfg: JobConfig, tok: Tokenizer, device: torch.device, total_updates: int):
        self.cfg, self.tok = cfg, tok
        self.model = common.build_policy(cfg, tok, device).train()
        self.model_cfg = self.model.cfg
        self.ref = copy.deepcopy(self.model).eval().requires_grad_(False) if cfg.algo.beta > 0 else None
        self.opt, self.sched = common.build_optimizer(self.model, cfg.optim, total_updates)
        self.trainer_extra: dict = {}

    @property
    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def train_grpo(self, batch: RLBatch, adv_N: torch.Tensor, a: AlgoSection, norm_const: float,
                   temperature: float, guard: NonFiniteGuard | None = None, step: int = 0) -> dict[str, float]:
        model, n = self.model, batch.input_ids_NT.shape[0]
        guard = guard or NonFiniteGuard(1, unit="optimizer update")
        skipped = 0
        t0 = time.perf_counter()
        with torch.no_grad():
            old = sequence_logprobs(model, batch, temperature)[0] if a.num_minibatches > 1 else None
            ref_lp = sequence_logprobs(self.ref, batch, temperature)[0] if self.ref is not None else None
        if batch.input_ids_NT.is_cuda:
            torch.cuda.synchronize()
        metrics = {"perf/logprob_s": time.perf_counter() - t0}
        size = -(-n // a.num_minibatches)
        # train.micro_batch_size: rows per forward/backward, gradients accumulated over an update's minibatch (each
        # micro-batch's loss over the minibatch's denominator, so their sum is the minibatch's loss)
        micro = self.cfg.train.micro_batch_size or size
        stats, counts, first = [], None, []
        for i in range(0, n, size):
            den = compute_loss_denominator(batch.response_mask_NT[i:i + size], a.agg).clamp(min=1)
            total = 0.0
            for j in range(i, min(i + size, n), micro):
                sl = slice(j, min(j + micro, i + size))
                mb = batch.rows(sl)
                logp, c = sequence_logprobs(model, mb, temperature, expert_counts=a.update_expert_bias)
                if i == 0:  # before the first update: the weights that generated the rollout
                    first.append(logp.detach())
                loss, st = compute_grpo_loss(
                    logp, None if old is None else old[sl], adv_N[sl], mb.response_mask_NT,
                    ref_logp_BT=None if ref_lp is None else ref_lp[sl], beta=a.beta, eps_low=a.eps_low,
                    eps_high=a.eps_high, agg=a.agg, norm_const=norm_const, loss_denominator=den)
                loss.backward()
                total = total + loss.detach()
                stats.append(st)
                if c is not None:
                    counts = c if counts is None else counts + c
            if i == 0:
                rows = slice(0, min(size, n))
                metrics.update(logprob_mismatch(torch.cat(first) if old is None else old[rows], batch.rows(rows)))
            outcome = common.guarded_step(model, self.opt, self.sched, self.cfg.optim.grad_clip, guard, step,
                                          loss=total)
            metrics["train/grad_norm"] = outcome.grad_norm
            skipped += outcome.skipped
        if a.update_expert_bias and not skipped:
            common.apply_expert_bias_update(model, counts, self.cfg.train.expert_bias_rate)
        metrics.update(type(stats[0]).merge(stats).to_dict("train/"))
        metrics["train/skipped"] = skipped
        return metrics

    def refresh_ref(self) -> None:
        if self.ref is not None:
            self.ref.load_state_dict(self.model.state_dict())

    def rollout_model(self) -> CausalLM:
        return self.model

    def export_to(self, engine) -> None:
        if engine is None or getattr(engine, "model", None) is self.model:
            return  # a built-in engine over the live module: nothing to copy
        with torch.no_grad():
            engine.update_weights(self.model.state_dict().items())

    def broadcast(self, obj: Any) -> Any:
        return obj

    def save_checkpoint(self, run_dir: Path, step: int, extra: dict | None = None) -> None:
        extra = dict(extra or {})
        if self.ref is not None and self.cfg.algo.ref_refresh_every:
            extra["ref"] = self.ref.state_dict()
        checkpointing.save_checkpoint(run_dir, step, self.model, self.tok, self.opt, self.sched, extra,
                                      self.cfg.checkpoint.keep)

    def restore(self, run_dir: Path) -> int:
        ckpt = rundir.latest_checkpoint(run_dir)
        if ckpt is None:
            return 0
        state = checkpointing.restore_checkpoint(ckpt, self.model, self.opt, self.sched)
        self.trainer_extra = state.extra
        if self.ref is not None and "ref" in state.extra:
            self.ref.load_state_dict(state.extra["ref"])
        return state.step

    def save_final(self, run_dir: Path, tok: Tokenizer, summary: dict[str, Any]) -> None:
        checkpointing.finalize(run_dir, self.model, tok, summary)

    def build_logger(self, cfg: JobConfig, run_dir: Path) -> MetricsLogger:
        return MetricsLogger(run_dir, project=cfg.logging.project, run_name=cfg.name, wandb_mode=cfg.logging.wandb,
                             config=common.config_dict(cfg))

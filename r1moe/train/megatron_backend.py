"""The megatron-core backend of the stage loops (`parallel.backend: megatron`). `MegatronPolicy` owns the
megatron model, its distributed optimizer, the LR schedule, the frozen GRPO reference and the checkpoints, so
`train_lm` (pretrain, sft) and the GRPO loop never touch megatron themselves. The math is the shared
r1moe.algorithms (compute_sft_loss, compute_grpo_loss, compute_token_logprobs, compute_loss_denominator) passed
as the `loss_fn` of r1moe.parallel.train_step (contract: parallel/README.md).

    torchrun --nproc_per_node 8 -m r1moe.train.grpo RECIPE parallel.backend=megatron parallel.ep=8

Where this path differs from the reference backend, and why:
- Packed rows (pretrain, sft; JSONL and indexed): the reference backend's rows; each micro-batch runs as one THD
  sequence in which attention stays inside a document and positions restart (parallel.train.packed_sequences).
- MTP: lambda/D * sum_k L_MTP^k (lambda = train.mtp_weight) is added inside the model (labels rolled from the
  inputs) over the reference loop's target tokens (`mtp_loss_mask`), logged as train/mtp_loss; GRPO: lambda = 0.
- Expert bias: updated in megatron's finalize_model_grads after every optimizer step (GRPO: per mini-batch; the
  reference loop: per rollout step), before the non-finite check, so a step skipped for NaN/inf still moves it.
- Data parallel: every rank builds the same batch (indexed rows: only its share) and trains on its contiguous
  1/dp block of rows (padded with empty rows to equal micro-batches); the loss denominator is the step's total /
  dp, so the DP-averaged gradient is the full batch's.
- GRPO rollouts: the built-in engine on every rank (a reference CausalLM fed by `export_to`) or SGLang driven
  by rank 0; rank 0's generations are broadcast to all ranks. Routing replay: parallel.apply_routing_replay.
- Random init builds the reference model once (same seed, same weights) and loads it; model.init is streamed
  (HFReader). final/ is written by rank 0 through a host-memory reference model (it must fit in host memory).

Intermediate checkpoints: checkpoints/step_N/{trainer_state.pt, dist/ (torch_dist model + optimizer, loads under
another TP/EP/PP layout), ref/ (GRPO with algo.ref_refresh_every)}, renamed into place when complete.

Legend: B rows per micro-batch, T sequence length, V vocabulary, N sequences.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tokenizers import Tokenizer

from r1moe.algorithms import compute_grpo_loss, compute_loss_denominator, compute_sft_loss, compute_token_logprobs
from r1moe.atomic import publish_dir
from r1moe.config import AlgoSection, JobConfig
from r1moe.data.tokenizer import special_ids
from r1moe.model import ModelConfig
from r1moe.tracking import MetricsLogger

from . import checkpointing, common, rundir
from .checks import check_megatron_config
from .guard import NonFiniteError, NonFiniteGuard
from .packing import IGNORE, PackedBatch


def check_megatron_backend(cfg: JobConfig) -> None:
    """ValueError naming parallel.backend and what is missing; called before any run directory exists."""
    check_megatron_config(cfg)
    missing = [] if torch.cuda.is_available() else ["CUDA (torch sees no GPU)"]
    for module, package in (("megatron.core", "megatron-core"), ("transformer_engine.pytorch", "transformer-engine")):
        try:
            importlib.import_module(module)
        except (ImportError, OSError, RuntimeError) as e:  # OSError/RuntimeError: a CUDA library fails to load
            missing.append(f"{package} (import {module}: {str(e).splitlines()[0][:120]})")
    if missing:
        raise ValueError(f"parallel.backend=megatron needs {'; '.join(missing)}. Run it on a GPU machine with "
                         f"megatron-core and Transformer Engine installed, or set parallel.backend=reference")


@dataclass
class LMMicroBatch:
    input_ids: torch.Tensor
    targets: torch.Tensor
    """[B, T], IGNORE where there is no loss."""
    segments: torch.Tensor
    """[B, T] packed rows' segment ids (-1: padding): attention stays inside a segment (parallel.train)."""

    @property
    def mtp_loss_mask(self) -> torch.Tensor:
        """1 on input positions whose token is a target (targets[t] is input_ids[t + 1]); see parallel.train."""
        mask = torch.zeros_like(self.targets, dtype=torch.float32)
        mask[:, 1:] = (self.targets[:, :-1] != IGNORE).float()
        return mask


def _clear_mtp_tracker() -> None:
    """megatron's MTP loss tracker is process-global (all forwards add to it): a step clears it first."""
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    MTPLossLoggingHelper.clean_metrics_in_tracker()


def _take_mtp_loss() -> dict[str, torch.Tensor]:
    """The MTP loss recorded since the last clear (sum over depths), then cleared; {} when nothing was."""
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    values = MTPLossLoggingHelper.tracker.get("loss_values")
    out = {} if values is None else {"mtp_loss": values.sum().detach().clone()}
    _clear_mtp_tracker()
    return out


@dataclass
class RLMicroBatch:
    input_ids: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor  # [B, T] True on response tokens
    adv: torch.Tensor
    rollout_logp: torch.Tensor | None = None  # [B, T] the engine's logprobs (0 off the response): mismatch metric
    routes: torch.Tensor | None = None  # [B, T, M, K] routing replay: the engine's experts
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None


class NullLogger(contextlib.nullcontext):
    """The metrics logger of ranks other than 0: they compute the same numbers and write nothing."""

    def __init__(self) -> None:
        super().__init__(self)  # `with NullLogger() as logger` gives the logger

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        pass


def _pad(t: torch.Tensor, rows: int, cols: int, fill) -> torch.Tensor:
    out = t.new_full((rows, cols, *t.shape[2:])[:t.dim()], fill)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def record_step(guard: NonFiniteGuard, step: int, result) -> bool:
    """Tell `guard` how a parallel.train_step went (a skipped one reports NaN); True when the weights were updated.
    megatron gives no gradient norm when it does not clip: then only the loss is checked."""
    grad_norm = result.grad_norm if result.update_successful else float("nan")
    return guard.check_step(step, loss=result.metrics.get("loss"), grad_norm=grad_norm) and result.update_successful


def _num(x: float | None) -> float:  # megatron reports no grad norm when it does not clip
    return float("nan") if x is None else float(x)


def _model_config_and_weights(cfg: JobConfig, tok: Tokenizer, device: torch.device
                              ) -> tuple[ModelConfig, Callable[[str], torch.Tensor]]:
    """The architecture and a `get(hf_name) -> tensor` for its initial weights."""
    from r1moe.model.hf_io import HFReader

    init = common.init_checkpoint_dir(cfg.model)
    if init is None:  # random init: exactly the reference backend's (same preset, overrides, seed, device)
        host = common.build_policy(cfg, tok, device)
        return host.cfg, host.state_dict().__getitem__
    reader = HFReader(init)
    mcfg = ModelConfig.from_json(init / "config.json")
    L = mcfg.num_hidden_layers
    if mcfg.num_nextn_predict_layers and not any(n.startswith(f"model.layers.{L}.") for n in reader.names()):
        mcfg = mcfg.replace(num_nextn_predict_layers=0)  # saved without MTP tensors: as from_pretrained does
    common.apply_init_overrides(mcfg, cfg.model.overrides, init)
    common.check_tokenizer_fits(tok, mcfg, f"model {init}")

    def get(name: str) -> torch.Tensor:
        t = reader[name]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"model.init={init}: tensor {name!r} holds NaN/inf values; the checkpoint is corrupt "
                             f"or was saved from a diverged run")
        return t

    return mcfg, get


class MegatronPolicy:
    """The trained policy on r1moe.parallel (the train/policy.py Policy protocol, and the LM stages' trainer).
    Every method is collective: all ranks call it together."""

    def __init__(self, cfg: JobConfig, tok: Tokenizer, total_updates: int, *, mtp_weight: float, expert_bias_rate: float,
                 with_ref: bool = False, aux_loss: bool = True):
        check_megatron_backend(cfg)
        from megatron.core import parallel_state as ps

        from r1moe.parallel import MegatronOptions, build_mcore_model, build_optimizer, initialize_parallel

        p, o = cfg.parallel, cfg.optim
        self.cfg = cfg
        self.pcfg = p  # a ParallelSection is a ParallelConfig
        initialize_parallel(self.pcfg, seed=cfg.train.seed)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self._host = None  # the reference CausalLM a built-in engine samples from (rollout_model)
        self.dp, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        self.pad_id = special_ids(tok)[0]
        gpu = torch.device("cuda", torch.cuda.current_device())  # initialize_parallel set it from LOCAL_RANK
        self.model_cfg, get_hf = _model_config_and_weights(cfg, tok, gpu)
        # the reference GRPO loss has no balance term (sequence_logprobs ignores aux_loss): keep megatron's off too
        extra = {} if aux_loss or not self.model_cfg.is_moe else {"moe_aux_loss_coeff": 0.0,
                                                                  "moe_router_load_balancing_type": "none"}
        if cfg.rollout.routing_replay and self.model_cfg.is_moe:
            extra["moe_enable_routing_replay"] = True
        self.mtp_on = mtp_weight > 0 and self.model_cfg.num_nextn_predict_layers > 0
        opts = MegatronOptions(fp8=p.fp8, recompute=p.recompute, mtp_loss_scale=mtp_weight,
                               expert_bias_rate=expert_bias_rate, extra=extra)
        self.models = self._build_models(opts, get_hf)
        self.ref_models = (build_mcore_model(self.model_cfg, self.pcfg, opts, wrap_ddp=False, hf_weights=get_hf)
                           if with_ref else None)
        del get_hf  # frees the random-init host model
        self.device = next(self.models[0].parameters()).device
        self.optimizer = build_optimizer(self.models, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas),
                                         clip_grad=max(o.grad_clip, 0.0))  # megatron: 0 = no clipping
        self.lr_factor = common.lr_factor(o, total_updates)
        self.num_updates = 0
        self.trainer_extra: dict = {}  # `extra` of the checkpoint restore() loaded (the guard's counts)
        dist.barrier()  # rank 0 has prepared the run directory

    def _build_models(self, opts, get_hf: Callable[[str], torch.Tensor]) -> list[torch.nn.Module]:
        """The trained model chunks (train/megatron_rm.py's reward model adds its head here)."""
        from r1moe.parallel import build_mcore_model
        return build_mcore_model(self.model_cfg, self.pcfg, opts, hf_weights=get_hf)

    @property
    def lr(self) -> float:
        """The LR of the next update (what the reference loop logs: LambdaLR.get_last_lr after its step)."""
        return self.cfg.optim.lr * self.lr_factor(self.num_updates)

    # ------------------------------------------------------------------------------------------ batches
    def _shard(self, columns: list[tuple[torch.Tensor, Any]], mb_rows: int, local: bool = False
               ) -> list[list[torch.Tensor]]:
        """This rank's micro-batches of equal shape: rows padded with `fill` to a multiple of dp * mb_rows and
        columns to what sequence parallelism needs; data-parallel rank r takes the r-th block of rows (`local`: the
        rows are this rank's already)."""
        n, T = columns[0][0].shape
        dp, dp_rank = (1, 0) if local else (self.dp, self.dp_rank)
        per_rank = -(-n // dp)
        mb_rows = min(mb_rows, per_rank) if mb_rows else per_rank
        per_rank = -(-per_rank // mb_rows) * mb_rows
        # multiples of 16: TE's FP8 GEMMs need the token count aligned; of tp: sequence parallelism splits T
        div = math.lcm(16, self.pcfg.tp if self.pcfg.sequence_parallel else 1)
        T = -(-T // div) * div
        mine = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
        rows = [_pad(t.to(self.device), per_rank * dp, T, fill)[mine] for t, fill in columns]
        return [[t[i:i + mb_rows] for t in rows] for i in range(0, per_rank, mb_rows)]

    def _step(self, mbs: list, loss_fn, guard: NonFiniteGuard | None, step: int):
        """One optimizer update; a NaN/inf loss or gradient skips it (parallel.train_step checks before megatron's
        optimizer step), counted by `guard` (None: stop at the first), and the LR schedule does not advance."""
        from r1moe.parallel import set_learning_rate, train_step

        set_learning_rate(self.optimizer, self.lr)
        result = train_step(self.models, self.optimizer, mbs, loss_fn, self.model_cfg.vocab_size)
        if record_step(guard or NonFiniteGuard(1, unit="optimizer update"), step if guard else self.num_updates + 1,
                       result):
            self.num_updates += 1
        return result

    # ------------------------------------------------------------------------------------------ pretrain / sft
    def train_step_lm(self, batch: PackedBatch, guard: NonFiniteGuard, step: int, local: bool = False
                      ) -> dict[str, float]:
        """One optimizer step of next-token cross-entropy on a batch of packed rows (`local`: this data-parallel
        rank's share of them, indexed data); a non-finite one is skipped, counted by `guard`."""
        from megatron.core import parallel_state as ps

        t0 = time.perf_counter()
        total = torch.tensor(float(batch.num_target_tokens), device=self.device)
        if local:  # the loss denominator is the global batch's token count
            dist.all_reduce(total, group=ps.get_data_parallel_group())
        total = max(1, int(total))
        den = total / self.dp
        parts = self._shard([(batch.input_ids_RT, self.pad_id), (batch.targets_RT, IGNORE),
                             (batch.segment_ids_RT, -1)], self.cfg.train.micro_batch_size, local)

        def loss_fn(logits_BTV: torch.Tensor, mb: LMMicroBatch):
            mask = mb.targets != IGNORE
            # the model's MTP loss of this micro-batch was recorded in its forward, just before this call
            return (compute_sft_loss(logits_BTV, mb.targets.clamp(min=0), mask, loss_denominator=den),
                    _take_mtp_loss() if self.mtp_on else {})

        if self.mtp_on:
            _clear_mtp_tracker()
        r = self._step([LMMicroBatch(*p) for p in parts], loss_fn, guard, step)
        out = {"train/loss": r.metrics["loss"], "train/grad_norm": _num(r.grad_norm), "train/lr": self.lr,
               "train/tokens": total, "train/skipped": int(not r.update_successful),
               "train/nonfinite_skipped": guard.num_skipped, "perf/step_s": time.perf_counter() - t0}
        if "mtp_loss" in r.metrics:
            out["train/mtp_loss"] = r.metrics["mtp_loss"]
        return out

    # ------------------------------------------------------------------------------------------ grpo
    def logprobs(self, mbs: list[RLMicroBatch], ref: bool = False, temperature: float = 1.0
                 ) -> list[torch.Tensor] | None:
        """log pi_T(target) per micro-batch under the policy (or the frozen reference); None off the last PP stage."""
        from r1moe.parallel import forward_only

        models = self.ref_models if ref else self.models
        return forward_only(models, mbs, lambda logits_BTV, mb: compute_token_logprobs(logits_BTV, mb.targets,
                                                                                        temperature=temperature),
                            self.model_cfg.vocab_size)

    def train_step_grpo(self, mbs: list[RLMicroBatch], a: AlgoSection, norm_const: float, den: torch.Tensor,
                        temperature: float = 1.0, guard: NonFiniteGuard | None = None, step: int = 0):
        """One optimizer step of the GRPO loss (R1 eq. 1) on one mini-batch; `den` is its loss denominator / dp.
        NaN/inf skips it, counted by `guard` (None: stop at the first)."""

        def loss_fn(logits_BTV: torch.Tensor, mb: RLMicroBatch):
            logp = compute_token_logprobs(logits_BTV, mb.targets, temperature=temperature)
            loss, st = compute_grpo_loss(logp, mb.old_logp, mb.adv, mb.mask, ref_logp_BT=mb.ref_logp, beta=a.beta,
                                         eps_low=a.eps_low, eps_high=a.eps_high, agg=a.agg, norm_const=norm_const,
                                         loss_denominator=den)
            # pg_loss is this micro-batch's share: x len(mbs) so that megatron's mean over micro-batches is the sum
            return loss, {"pg_loss": st.pg_loss * len(mbs), "kl": st.kl, "clip_frac": st.clip_frac,
                          "ratio_mean": st.ratio_mean, "ratio_max": st.ratio_max}

        return self._step(mbs, loss_fn, guard, step)

    def train_grpo(self, batch, adv_N: torch.Tensor, a: AlgoSection, norm_const: float, temperature: float,
                   guard: NonFiniteGuard | None = None, step: int = 0) -> dict[str, float]:
        """The policy update of one rollout batch (policy.RLBatch): log pi_old (several mini-batches) and log pi_ref
        before any update, then one optimizer step per mini-batch, as the reference loop does. Log-probs at the
        rollout temperature (T = 0 counts as 1), as in train/policy.py. A mini-batch whose loss or gradient is
        NaN/inf is skipped, counted by `guard` (None: stop at the first)."""
        temperature = temperature or 1.0
        N = batch.input_ids_NT.shape[0]
        size = -(-N // a.num_minibatches)
        minis = []
        for i in range(0, N, size):
            b = batch.rows(slice(i, i + size))
            rollout_lp = (b.rollout_logp_NT if b.rollout_logp_NT is not None
                          else torch.zeros_like(b.response_mask_NT, dtype=torch.float32))
            cols = [(b.input_ids_NT, self.pad_id), (b.targets_NT, self.pad_id), (b.response_mask_NT, False),
                    (adv_N[i:i + size], 0.0), (rollout_lp, 0.0)]
            parts = self._shard(cols + ([(b.routes_NTMK, 0)] if b.routes_NTMK is not None else []),
                                self.cfg.train.micro_batch_size)
            den = compute_loss_denominator(b.response_mask_NT, a.agg).clamp(min=1) / self.dp
            minis.append(([RLMicroBatch(*p) for p in parts], den))
        t0 = time.perf_counter()
        for mbs, _ in minis:
            if a.num_minibatches > 1:
                for mb, lp in zip(mbs, self.logprobs(mbs, temperature=temperature) or []):
                    mb.old_logp = lp
            if self.ref_models is not None:
                for mb, lp in zip(mbs, self.logprobs(mbs, ref=True, temperature=temperature) or []):
                    mb.ref_logp = lp
        torch.cuda.synchronize()
        mismatch = {"perf/logprob_s": time.perf_counter() - t0,
                    **(self._logprob_mismatch(minis[0][0]) if a.num_minibatches > 1 else {})}
        results = [self.train_step_grpo(mbs, a, norm_const, den, temperature, guard, step) for mbs, den in minis]

        mean = {k: sum(r.metrics[k] for r in results) / len(results) for k in ("kl", "clip_frac", "ratio_mean")}
        return {"train/grad_norm": _num(results[-1].grad_norm), "train/pg_loss": sum(r.metrics["pg_loss"] for r in results),
                "train/kl": mean["kl"], "train/clip_frac": mean["clip_frac"], "train/ratio_mean": mean["ratio_mean"],
                "train/ratio_max": max(r.metrics["ratio_max"] for r in results),
                "train/skipped": sum(not r.update_successful for r in results),
                "train/num_tokens": int(batch.response_mask_NT.sum()), "train/num_seqs": N, **mismatch}

    def _logprob_mismatch(self, mbs: list[RLMicroBatch]) -> dict[str, float]:
        """|log pi_old (trainer) - rollout logprob| over the first mini-batch's response tokens, reduced over all
        ranks (only the last pipeline stage has log-probs; data-parallel ranks hold different rows)."""
        total, peak = torch.zeros(2, device=self.device), torch.zeros(1, device=self.device)  # (sum, count), max
        for mb in mbs:
            if mb.old_logp is None:
                continue
            d = (mb.old_logp.float() - mb.rollout_logp.float()).abs()[mb.mask]
            if d.numel():
                total[0] += d.sum()
                total[1] += d.numel()
                peak = torch.maximum(peak, d.max())
        dist.all_reduce(total)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        if total[1] == 0:
            return {}
        return {"rollout/logprob_abs_diff": float(total[0] / total[1]), "rollout/logprob_abs_diff_max": float(peak[0])}

    def refresh_ref(self) -> None:
        """pi_ref <- the current policy (R1: every 400 steps)."""
        if self.ref_models is None:
            return
        from r1moe.parallel import unwrap

        state = {k: v for k, v in unwrap(self.models[0]).state_dict().items() if not k.endswith("_extra_state")}
        unwrap(self.ref_models[0]).load_state_dict(state, strict=False)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's object on every rank (rollouts: all ranks must train on the same samples)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # ------------------------------------------------------------------------------------------ weights out
    def _export(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The HF-named full tensors (parallel.export_hf_weights); every rank iterates it (collectives), tensors may
        alias the live parameters: consume them before the next update."""
        from r1moe.parallel import export_hf_weights

        for bucket in export_hf_weights(self.models, self.model_cfg, self.pcfg, bucket_bytes=1 << 30):
            yield from bucket

    def export_to(self, engine) -> None:
        """The current weights into a rollout engine (`update_weights`: HF names, full tensors), one stream so the
        engine buckets them itself. Collective: ranks without an engine (None) take part in the gathers only. With
        SGLang colocated, every rank first returns its cached memory (SGLang's shards resume on all its GPUs)."""
        if self.cfg.rollout.engine == "sglang" and self.cfg.rollout.sglang.colocate:
            torch.cuda.empty_cache()
            dist.barrier()
        stream = self._export()
        engine.update_weights(stream) if engine is not None else collections.deque(stream, maxlen=0)

    def rollout_model(self):
        """A reference CausalLM on this rank's GPU for the built-in engine, fed by `export_to` (one on every rank)."""
        if self._host is None:
            from r1moe.model import build_model

            # a real init, not meta + to_empty: the non-persistent RoPE tables are never exported
            self._host = build_model(self.model_cfg, device=self.device, dtype=common.dtype_of(self.cfg.model.dtype))
            self._host.eval().requires_grad_(False)
        return self._host

    def save_final(self, run_dir: Path, tok: Tokenizer, summary: dict[str, Any]) -> None:
        """final/ (an HF directory by r1moe.model.save_pretrained, like the reference backend's) then DONE.json,
        written by rank 0, through the built-in engine's model when there is one, else a host-memory copy."""

        from r1moe.model import build_model, load_hf_tensor
        from r1moe.parallel import all_finite

        if not all_finite([p.detach() for m in self.models for p in m.parameters()]):  # on every rank: no hang
            raise NonFiniteError(f"{run_dir}: final weights hold NaN/inf; refusing to write non-finite weights")
        host = self._host if self.rank == 0 else None

        if host is None and self.rank == 0:
            # meta + to_empty: every persistent tensor is overwritten by the export; the non-persistent ones
            # (RoPE tables) are never saved, so nothing is initialised for nothing
            host = build_model(self.model_cfg, device="meta", dtype=common.dtype_of(self.cfg.model.dtype))
            host = host.to_empty(device="cpu")

        for name, t in self._export():
            if host is not None:
                load_hf_tensor(host, name, t)
        if self.rank == 0:
            checkpointing.finalize(run_dir, host, tok, {**summary, "backend": "megatron"})
        dist.barrier()

    # ------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, run_dir: Path, step: int, extra: dict | None = None) -> Path:
        """checkpoints/step_N: megatron dist checkpoint + trainer state (with `extra`, e.g. the guard's counts),
        renamed into place when complete; the newest checkpoint.keep are kept. Non-finite weights are refused
        (NonFiniteError on every rank) before anything is written."""

        from r1moe.parallel import all_finite, save_dist_checkpoint

        if not all_finite([p.detach() for m in self.models for p in m.parameters()]):
            raise NonFiniteError(f"{run_dir}: checkpoint of step {step}: the weights hold NaN/inf; refusing to "
                                 f"write non-finite weights")
        root = run_dir / "checkpoints"
        path, tmp = root / f"step_{step:07d}", root / f".step_{step:07d}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        save_dist_checkpoint(self.models, self.optimizer, tmp / "dist", step=step)
        if self.ref_models is not None and self.cfg.algo.ref_refresh_every:
            save_dist_checkpoint(self.ref_models, None, tmp / "ref", step=step)
        dist.barrier()
        if self.rank == 0:
            torch.save({"step": step, "num_updates": self.num_updates, "rng": checkpointing._rng_state(),
                        "backend": "megatron", "extra": extra or {}}, tmp / rundir.TRAINER_STATE)
            publish_dir(tmp, path)
            for old in sorted(root.glob("step_*"))[:-max(1, self.cfg.checkpoint.keep)]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return path

    def restore(self, run_dir: Path) -> int:
        """Load the newest complete checkpoint (model, optimizer, reference, schedule, RNG); its step, 0 if none."""
        from r1moe.parallel import load_dist_checkpoint

        ckpt = rundir.latest_checkpoint(run_dir)
        if ckpt is None:
            return 0
        if not (ckpt / "dist").is_dir():
            raise ValueError(f"{ckpt}: not a megatron checkpoint (written with parallel.backend=reference?); resume "
                             f"with the backend that wrote it")
        state = torch.load(ckpt / rundir.TRAINER_STATE, weights_only=False)
        load_dist_checkpoint(self.models, self.optimizer, ckpt / "dist")
        if self.ref_models is not None and (ckpt / "ref").is_dir():
            load_dist_checkpoint(self.ref_models, None, ckpt / "ref")
        self.num_updates = state["num_updates"]
        self.trainer_extra = state.get("extra", {})
        checkpointing._set_rng_state(state["rng"])
        return state["step"]

    def build_logger(self, cfg: JobConfig, run_dir: Path) -> MetricsLogger | NullLogger:
        if self.rank != 0:
            return NullLogger()
        return MetricsLogger(run_dir, project=cfg.logging.project, run_name=cfg.name, wandb_mode=cfg.logging.wandb,
                             config=common.config_dict(cfg))

"""The reward model on the megatron-core backend (`r1moe rm RECIPE parallel.backend=megatron`): the same model,
objective and saved directory as train/rm.py, trained over TP/PP/EP/DP.

    torchrun --nproc_per_node 8 -m r1moe.train.rm RECIPE parallel.backend=megatron parallel.tp=2 parallel.ep=4
    python -m r1moe.train.rm RECIPE parallel.backend=megatron          # plain python: a world of one GPU

Model: the megatron GPTModel of the init checkpoint (train/megatron_backend.py builds and loads it) + `score_head`,
a float32 nn.Linear(hidden, 1) with bias, zero-initialised as the reference's, on the last pipeline stage. The
GPTModel's output_processor (r1moe.parallel `head_fn`) takes the final normed hidden states in place of the LM head
(sequence-parallel shards gathered first) and scores the last non-pad token of each row, as RewardModel.forward
does. The head is a submodule of the GPTModel, so megatron's DDP reduces its gradient over data-parallel ranks, its
distributed optimizer steps it (in float32 parameter groups of its own: parallel.build_optimizer) and its dist
checkpoints hold it. Every TP rank runs the head on the same hidden states: the head is replicated, its gradient
identical across TP, so it needs no TP reduction. The loss is the shared objective of train/rm.py (Bradley-Terry, or
pointwise BCE for rm.kind=safety) on those scores.

Where this differs from the reference backend, and why:
- No MTP layers: the RM never reads them (the reference keeps them untouched, unused). final/ is written without
  them (config.json num_nextn_predict_layers 0), which every loader of an HF directory accepts.
- The LM head is frozen (not run, no optimizer state): the reference's lm_head gets no gradient either, and frozen
  it also escapes weight decay, as a parameter without a gradient does in torch's AdamW. Not with tied embeddings,
  whose weight the embedding trains.
- Padding rows of a micro-batch are routed by the MoE layers (their tokens count in the expert-bias update, as on
  the other megatron stages); the reference excludes padding. Real tokens' hidden states are unaffected: right
  padding, causal attention, no expert capacity.
- Data parallel: the step's B examples are split into contiguous blocks, one per data-parallel rank (padded with
  empty examples to equal micro-batches, which carry no loss); each micro-batch's loss is its examples' share of
  the step (loss x examples / (B / dp)), so the DP-averaged gradient is the full batch's. Scoring (held-out eval)
  sorts the sequences by length and gives each data-parallel rank its own slice of every chunk.

Legend: R rows per micro-batch, T padded length, H hidden, N sequences.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from r1moe.config import JobConfig

from . import rundir
from .guard import NonFiniteError, NonFiniteGuard
from .megatron_backend import MegatronPolicy, _num, check_megatron_backend, record_step

SCORE_BATCH = 64
"""Sequences per data-parallel rank per scoring forward, without train.micro_batch_size (with it: the rows of a
training micro-batch of pairs, which fit with their backward, so a forward alone fits too)."""


@dataclass
class RMMicroBatch:
    input_ids: torch.Tensor
    """[R, T] right-padded rows: objective.sequences(part), then padding rows."""
    last: torch.Tensor
    """[R] index of each row's last real token (0 for padding rows)."""
    part: list
    """The examples of these rows (empty for a micro-batch of padding)."""


def plan_micro_batches(num: int, dp: int, micro: int) -> list[list[range]]:
    """Per data-parallel rank, its micro-batches as ranges of the step's `num` examples: contiguous blocks, the same
    number of micro-batches of at most `micro` examples (0: the whole block) on every rank; the last ones may be
    short or empty (padding, which carries no loss)."""
    per_rank = -(-num // dp)
    m = min(micro or per_rank, per_rank)
    per_rank = -(-per_rank // m) * m
    return [[range(min(i, num), min(i + m, num)) for i in range(r * per_rank, (r + 1) * per_rank, m)]
            for r in range(dp)]


def micro_batch_loss(objective, scores_R: torch.Tensor, part: list, share: float, num_micro_batches: int
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-batch's share of the step loss (objective.loss on its examples x len(part) / share, share = B / dp)
    and its accuracy / margin, scaled so that megatron's mean over micro-batches, then over data-parallel ranks,
    gives the step's mean over its B examples. The rows after the examples' own (padding) are ignored."""
    if not part:
        zero = scores_R.sum() * 0.0  # keeps the graph: every micro-batch runs a backward
        return zero, {"accuracy": zero.detach(), "margin": zero.detach()}
    loss, ok, margin = objective.loss(scores_R[:len(objective.sequences(part))], part)
    stats = torch.tensor([sum(ok), sum(margin)], device=scores_R.device, dtype=torch.float32)
    stats = stats * num_micro_batches / share
    return loss * len(part) / share, {"accuracy": stats[0], "margin": stats[1]}


class MegatronRewardModel(MegatronPolicy):
    """The reward model on r1moe.parallel: MegatronPolicy's model, optimizer, schedule, checkpoints and sharding,
    with the score head in place of the LM head. Every method is collective: all ranks call it together."""

    def __init__(self, cfg: JobConfig, tok: Tokenizer, total_updates: int):
        super().__init__(cfg, tok, total_updates, mtp_weight=0.0, expert_bias_rate=cfg.train.expert_bias_rate)
        from megatron.core import parallel_state as ps

        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.last_stage = ps.is_pipeline_last_stage()

    def _build_models(self, opts, get_hf) -> list[torch.nn.Module]:
        from r1moe.parallel import build_mcore_model

        self.model_cfg = self.model_cfg.replace(num_nextn_predict_layers=0)  # module docstring
        return build_mcore_model(self.model_cfg, self.pcfg, opts, hf_weights=get_hf, prepare=self._add_head)

    def _add_head(self, model: torch.nn.Module) -> None:
        if not model.post_process:
            return
        device = next(model.parameters()).device
        model.score_head = torch.nn.Linear(self.model_cfg.hidden_size, 1, device=device, dtype=torch.float32)
        torch.nn.init.zeros_(model.score_head.weight)
        torch.nn.init.zeros_(model.score_head.bias)
        if not model.share_embeddings_and_output_weights:
            model.output_layer.weight.requires_grad_(False)

    @property
    def score_head(self) -> torch.nn.Linear | None:
        """The head on the last pipeline stage; None on the others."""
        from r1moe.parallel import unwrap

        return unwrap(self.models[0]).score_head if self.last_stage else None

    def _head_fn(self, hidden_BTH: torch.Tensor, mb: RMMicroBatch) -> torch.Tensor:
        rows = torch.arange(hidden_BTH.shape[0], device=hidden_BTH.device)
        h_RH = hidden_BTH[rows, mb.last.to(hidden_BTH.device)]
        return self.score_head(h_RH.float()).squeeze(-1)

    # ------------------------------------------------------------------------------------------ batches
    def _batch(self, seqs: list[list[int]], rows: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids [rows, T], last [rows]): `seqs` right-padded, then padding rows."""
        ids = torch.full((rows, T), self.pad_id, dtype=torch.long)
        last = torch.zeros(rows, dtype=torch.long)
        for n, s in enumerate(seqs):
            ids[n, :len(s)] = torch.tensor(s)
            last[n] = len(s) - 1
        return ids.to(self.device), last.to(self.device)

    def _padded_len(self, longest: int) -> int:
        """Multiples of 16 (TE's FP8 GEMMs align the token count) and of tp under sequence parallelism."""
        div = math.lcm(16, self.pcfg.tp if self.pcfg.sequence_parallel else 1)
        return -(-longest // div) * div

    def micro_batches(self, objective, examples: list) -> tuple[list[RMMicroBatch], float]:
        """This rank's micro-batches of the step's `examples` (every rank's of one shape) and the examples per rank
        that one micro-batch's loss is a share of (B / dp)."""
        plan = plan_micro_batches(len(examples), self.dp, self.cfg.train.micro_batch_size)
        seqs = [[objective.sequences([examples[j] for j in r]) if r else [] for r in rank] for rank in plan]
        R = max(len(s) for rank in seqs for s in rank)
        T = self._padded_len(max(len(x) for rank in seqs for s in rank for x in s))
        return ([RMMicroBatch(*self._batch(s, R, T), [examples[j] for j in r])
                 for s, r in zip(seqs[self.dp_rank], plan[self.dp_rank])], len(examples) / self.dp)

    # ------------------------------------------------------------------------------------------ train
    def train_step_rm(self, objective, examples: list, guard: NonFiniteGuard, step: int) -> dict[str, float]:
        """One optimizer step of `objective` on the step's examples; a non-finite one is skipped and counted."""
        t0 = time.perf_counter()
        mbs, share = self.micro_batches(objective, examples)
        n = len(mbs)

        r = self._step(mbs, lambda scores_R, mb: micro_batch_loss(objective, scores_R, mb.part, share, n), guard, step)
        return {"rm/loss": r.metrics["loss"], "rm/accuracy": r.metrics["accuracy"], "rm/margin": r.metrics["margin"],
                "train/grad_norm": _num(r.grad_norm), "train/lr": self.lr, "train/skipped": int(not r.update_successful),
                "train/nonfinite_skipped": guard.num_skipped, "perf/step_s": time.perf_counter() - t0}

    def _step(self, mbs: list, loss_fn, guard: NonFiniteGuard | None, step: int):
        """MegatronPolicy._step with the score head in place of the LM head."""
        from r1moe.parallel import set_learning_rate, train_step

        set_learning_rate(self.optimizer, self.lr)
        result = train_step(self.models, self.optimizer, mbs, loss_fn, self.model_cfg.vocab_size,
                            head_fn=self._head_fn)
        if record_step(guard or NonFiniteGuard(1, unit="optimizer update"), step if guard else self.num_updates + 1,
                       result):
            self.num_updates += 1
        return result

    # ------------------------------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score(self, seqs: list[list[int]]) -> torch.Tensor:
        """Raw scores [N] (CPU float32, input order) on every rank. The sequences are sorted by length; each chunk
        of dp x batch gives every data-parallel rank its own `batch` (one forward each, all ranks the same number:
        EP's all-to-all pairs them), and one all-reduce collects the last stage's scores."""
        import torch.distributed as dist

        from r1moe.parallel import forward_only

        batch = 2 * self.cfg.train.micro_batch_size or SCORE_BATCH
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out = torch.zeros(len(seqs), device=self.device)
        for c in range(0, len(order), batch * self.dp):
            mine = order[c + self.dp_rank * batch:c + (self.dp_rank + 1) * batch]
            rows = [seqs[i] for i in mine]
            ids, last = self._batch(rows, max(1, len(rows)), self._padded_len(max([1, *map(len, rows)])))
            res = forward_only(self.models, [RMMicroBatch(ids, last, [])], lambda s, mb: s,
                               self.model_cfg.vocab_size, head_fn=self._head_fn)
            if res is not None and self.tp_rank == 0 and mine:  # one writer per score: TP ranks hold copies
                out[mine] = res[0][:len(mine)].float()
        dist.all_reduce(out)
        return out.cpu()

    # ------------------------------------------------------------------------------------------ weights out
    def head_state(self) -> dict[str, torch.Tensor]:
        """The score head's tensors (CPU float32) on every rank, from the last stage's first TP/DP rank."""
        import torch.distributed as dist

        H = self.model_cfg.hidden_size
        flat = torch.zeros(H + 1, device=self.device, dtype=torch.float32)
        if self.last_stage and self.tp_rank == 0 and self.dp_rank == 0:
            flat[:H] = self.score_head.weight.detach().float().reshape(-1)
            flat[H] = self.score_head.bias.detach().float()[0]
        dist.all_reduce(flat)
        return {"weight": flat[:H].reshape(1, H).cpu(), "bias": flat[H:].cpu()}

    def save_final_rm(self, run_dir: Path, tok: Tokenizer, meta: dict[str, Any], summary: dict[str, Any]) -> None:
        """final/ in train/rm.py's reward-model layout (save_reward_model: backbone HF directory + score head +
        reward_model.json), then DONE.json; written by rank 0 through a host-memory reference model."""
        import torch.distributed as dist

        from r1moe.model import build_model, load_hf_tensor
        from r1moe.parallel import all_finite

        from . import common
        from .rm import RewardModel, save_reward_model

        if not all_finite([p.detach() for m in self.models for p in m.parameters()]):  # on every rank: no hang
            raise NonFiniteError(f"{run_dir}: final weights hold NaN/inf; refusing to write non-finite weights")
        host = None
        if self.rank == 0:
            # meta + to_empty: the export overwrites every persistent tensor (megatron_backend.save_final)
            host = build_model(self.model_cfg, device="meta", dtype=common.dtype_of(self.cfg.model.dtype))
            host = host.to_empty(device="cpu")

        for name, t in self._export():  # every rank iterates it (collectives); rank 0 keeps the tensors
            if host is not None:
                load_hf_tensor(host, name, t)
        head = self.head_state()
        if self.rank == 0:
            rm = RewardModel(host)
            rm.score_head.load_state_dict(head)
            save_reward_model(rm, tok, run_dir / "final", meta)
            rundir.mark_done(run_dir, {**summary, "backend": "megatron"})
        dist.barrier()


def train_megatron_rm(cfg: JobConfig, resume: bool, scope: str, steps: int, objective, train: list, dropped: int,
                      held_out: list, eval_dropped: int, tok: Tokenizer) -> dict:
    """train/rm.py's loop on MegatronRewardModel: same batches (pair_batch), metrics, checkpoints and final/."""
    from r1moe.progress import progress_bar

    from . import common
    from .rm import pair_batch, reward_model_meta

    check_megatron_backend(cfg)
    common.setup_torch(cfg.train)
    B = cfg.train.batch_size
    run_dir = rundir.prepare_run_dir(cfg, resume)
    rm = MegatronRewardModel(cfg, tok, steps)
    start = rm.restore(run_dir) if resume else 0
    guard = NonFiniteGuard(cfg.train.max_nonfinite_steps, what="rm")
    guard.load_state_dict(rm.trainer_extra.get("nonfinite", {}))
    evals: dict[int, dict] = {}
    last: dict[str, float] = {}
    with rm.build_logger(cfg, run_dir) as logger, progress_bar("rm", steps, start) as advance:

        def run_eval(step: int) -> None:
            if held_out:
                evals[step] = objective.metrics(rm.score(objective.sequences(held_out)), held_out)
                logger.log(step, {f"eval/rm_{k}": v for k, v in evals[step].items()})

        logger.log(start, {f"rm/{objective.unit}": len(train), "rm/pairs_dropped_identical": dropped,
                           f"eval/rm_{objective.unit}": len(held_out), "eval/rm_pairs_dropped_identical": eval_dropped})
        if start == 0:
            run_eval(0)
        for step in range(start + 1, steps + 1):
            examples = [train[j] for j in pair_batch(len(train), step, B, cfg.train.seed)]
            last = rm.train_step_rm(objective, examples, guard, step)
            if step % cfg.train.log_every == 0 or step == steps:
                logger.log(step, last)
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < steps:
                run_eval(step)
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < steps:
                rm.save_checkpoint(run_dir, step, {"nonfinite": guard.state_dict()})
            advance(f"rm loss {last['rm/loss']:.3f} acc {last['rm/accuracy']:.2f}")
        run_eval(steps)
    summary = {"stage": "rm", "rm_kind": cfg.rm.kind, "steps": steps, objective.unit: len(train),
               "pairs_dropped_identical": dropped, "final_loss": last.get("rm/loss"),
               "nonfinite_steps_skipped": guard.num_skipped, "eval_base": evals.get(0), "eval_final": evals.get(steps)}
    rm.save_final_rm(run_dir, tok, reward_model_meta(cfg, objective, scope), summary)
    return summary

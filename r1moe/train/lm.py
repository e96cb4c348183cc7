"""The next-token training loop shared by `pretrain`, `sft` and distillation (SFT of a student): packed batches ->
cross-entropy on target tokens (+ MTP, + sequence-wise balance loss) -> AdamW step (skipped when the loss or gradient
norm is NaN/inf: train/guard.py) -> expert-bias update -> log -> checkpoint. Resumable: `--resume` restores weights,
optimizer, schedule, RNG and the data position.
With `parallel.backend: megatron` the same steps run on r1moe.parallel (`_train_lm_megatron`, megatron_backend.py).
"""

from __future__ import annotations

import math
import time

from tokenizers import Tokenizer

from r1moe.algorithms import compute_sft_loss
from r1moe.config import JobConfig, TrainSection
from r1moe.data.loader import IndexedRows
from r1moe.data.tokenizer import special_ids
from r1moe.plots import plot_run
from r1moe.progress import progress_bar
from r1moe.tracking import MetricsLogger

from . import checkpointing, common, rundir
from .guard import NonFiniteGuard
from .packing import IGNORE, Example, check_packed, iterate_batches, mtp_targets, pack_examples


def _masked_ce(logits, targets):
    mask = targets != IGNORE
    return compute_sft_loss(logits, targets.clamp(min=0), mask)


def _num_steps(train: TrainSection, num_rows: int) -> int:
    if train.epochs is not None:
        return max(1, math.ceil(train.epochs * num_rows / train.batch_size))
    return train.steps


def _training_rows(cfg: JobConfig, examples: list[Example] | IndexedRows, tok: Tokenizer
                   ) -> tuple[list | IndexedRows, int]:
    """(rows, how many) both backends train on: indexed rows as they are, examples packed into data.seq_len rows."""
    if isinstance(examples, IndexedRows):
        return examples, examples.num_rows
    rows = pack_examples(examples, cfg.data.seq_len, special_ids(tok)[0])
    check_packed(examples, rows, cfg.data.seq_len)
    return rows, len(rows)


def _batches(rows: list | IndexedRows, train: TrainSection, start: int, rank: int = 0, world: int = 1):
    """Endless batches from step `start` on (indexed rows: data-parallel rank `rank`'s share of each)."""
    if isinstance(rows, IndexedRows):
        return rows.batches(train.batch_size, train.seed, start_step=start, rank=rank, world=world)
    return iterate_batches(rows, train.batch_size, train.seed, start_step=start)


def train_lm(cfg: JobConfig, examples: list[Example] | IndexedRows, tok: Tokenizer, resume: bool = False) -> dict:
    """`examples`: tokenized examples (packed here), or memory-mapped indexed rows (data.format=indexed)."""
    indexed = isinstance(examples, IndexedRows)
    if not indexed and not examples:
        raise ValueError(f"data.train={cfg.data.train}: empty dataset")
    if cfg.parallel.backend == "megatron":
        return _train_lm_megatron(cfg, examples, tok, resume)
    device = common.setup_torch(cfg.train)
    rows, num_rows = _training_rows(cfg, examples, tok)
    steps = _num_steps(cfg.train, num_rows)
    model = common.build_policy(cfg, tok, device).train()  # a bad model.init fails before the run directory exists
    run_dir = rundir.prepare_run_dir(cfg, resume)
    opt, sched = common.build_optimizer(model, cfg.optim, steps)
    guard = NonFiniteGuard(cfg.train.max_nonfinite_steps, what=cfg.stage)
    start = 0
    if resume and (ckpt := rundir.latest_checkpoint(run_dir)) is not None:
        state = checkpointing.restore_checkpoint(ckpt, model, opt, sched)
        start = state.step
        guard.load_state_dict(state.extra.get("nonfinite", {}))
    batches = _batches(rows, cfg.train, start)
    mtp_on = cfg.train.mtp_weight > 0 and model.cfg.num_nextn_predict_layers > 0
    mb = cfg.train.micro_batch_size or cfg.train.batch_size
    logger = MetricsLogger(run_dir, project=cfg.logging.project, run_name=cfg.name, wandb_mode=cfg.logging.wandb,
                           config=common.config_dict(cfg))
    last: dict = {}
    with logger, progress_bar(cfg.stage, steps, start) as advance:
        for step in range(start + 1, steps + 1):
            t0 = time.perf_counter()
            batch = next(batches).to(device)
            total_tokens = max(1, batch.num_target_tokens)
            loss_sum, mtp_sum, aux_sum, counts = 0.0, 0.0, 0.0, None
            for i in range(0, batch.input_ids_RT.shape[0], mb):
                ids, tgt, seg = (t[i:i + mb] for t in (batch.input_ids_RT, batch.targets_RT, batch.segment_ids_RT))
                out = model(ids, segment_ids=seg, compute_mtp=mtp_on)
                share = int((tgt != IGNORE).sum()) / total_tokens
                loss = _masked_ce(out.logits, tgt)
                total = loss + out.aux_loss
                if mtp_on:
                    depth = len(out.mtp_logits)
                    mtp = sum(_masked_ce(lg, mtp_targets(tgt, seg, k)) for k, lg in enumerate(out.mtp_logits, 1))
                    total = total + cfg.train.mtp_weight / depth * mtp  # V3 eq. 25
                    mtp_sum += float(mtp.detach()) * share
                (total * share).backward()
                loss_sum += float(loss.detach()) * share
                aux_sum += float(out.aux_loss.detach()) * share
                if out.expert_counts is not None:
                    counts = out.expert_counts if counts is None else counts + out.expert_counts
            outcome = common.guarded_step(model, opt, sched, cfg.optim.grad_clip, guard, step,
                                          loss=loss_sum + mtp_sum + aux_sum)
            if not outcome.skipped:  # a skipped step moves nothing, the routing bias included
                common.apply_expert_bias_update(model, counts, cfg.train.expert_bias_rate)
            last = {"train/loss": loss_sum, "train/grad_norm": outcome.grad_norm, "train/lr": sched.get_last_lr()[0],
                    "train/tokens": total_tokens, "train/skipped": int(outcome.skipped),
                    "train/nonfinite_skipped": guard.num_skipped, "perf/step_s": time.perf_counter() - t0}
            if mtp_on:
                last["train/mtp_loss"] = mtp_sum
            if aux_sum:
                last["train/aux_loss"] = aux_sum
            if counts is not None:
                load = counts.float()
                last["moe/max_violation"] = float(((load.max(-1).values - load.mean(-1)) / load.mean(-1)).mean())
            if step % cfg.train.log_every == 0 or step == steps:
                logger.log(step, last)
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < steps:
                checkpointing.save_checkpoint(run_dir, step, model, tok, opt, sched,
                                              {"nonfinite": guard.state_dict()}, cfg.checkpoint.keep)
            advance(f"{cfg.stage} loss {loss_sum:.3f}")
    if cfg.logging.plots:
        plot_run(run_dir)
    summary = {"stage": cfg.stage, "steps": steps, "final_loss": last.get("train/loss"), "rows": num_rows,
               "nonfinite_steps_skipped": guard.num_skipped}
    checkpointing.finalize(run_dir, model, tok, summary)
    return summary


def _train_lm_megatron(cfg: JobConfig, examples: list[Example] | IndexedRows, tok: Tokenizer, resume: bool) -> dict:
    """The same loop on r1moe.parallel (train/megatron_backend.py: MTP inside the model), on the same packed rows
    (attention inside a document, positions restarting: parallel.train.packed_sequences); indexed rows are read by
    each data-parallel rank for its share only."""
    from .megatron_backend import MegatronPolicy, check_megatron_backend

    check_megatron_backend(cfg)
    common.setup_torch(cfg.train)
    rows, num_rows = _training_rows(cfg, examples, tok)
    steps = _num_steps(cfg.train, num_rows)
    run_dir = rundir.prepare_run_dir(cfg, resume)
    policy = MegatronPolicy(cfg, tok, steps, mtp_weight=cfg.train.mtp_weight,
                            expert_bias_rate=cfg.train.expert_bias_rate)
    start = policy.restore(run_dir) if resume else 0
    guard = NonFiniteGuard(cfg.train.max_nonfinite_steps, what=cfg.stage)
    guard.load_state_dict(policy.trainer_extra.get("nonfinite", {}))
    batches = _batches(rows, cfg.train, start, rank=policy.dp_rank, world=policy.dp)
    indexed = isinstance(rows, IndexedRows)  # each rank holds only its share of a batch
    last: dict = {}
    with policy.build_logger(cfg, run_dir) as logger, progress_bar(cfg.stage, steps, start) as advance:
        for step in range(start + 1, steps + 1):
            last = policy.train_step_lm(next(batches), guard, step, local=indexed)
            if step % cfg.train.log_every == 0 or step == steps:
                logger.log(step, last)
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < steps:
                policy.save_checkpoint(run_dir, step, {"nonfinite": guard.state_dict()})
            advance(f"{cfg.stage} loss {last['train/loss']:.3f}")
    if cfg.logging.plots and policy.rank == 0:
        plot_run(run_dir)
    summary = {"stage": cfg.stage, "steps": steps, "final_loss": last.get("train/loss"), "rows": num_rows,
               "nonfinite_steps_skipped": guard.num_skipped}
    policy.save_final(run_dir, tok, summary)
    return summary

"""GRPO (DeepSeek-R1 §2.2, eq. 1 and 3): the flat RL loop of R1-Zero, reasoning RL (stage 2) and all-scenario RL
(stage 4). rollout (G outputs per question) -> rule rewards (+ reward model) -> group advantages -> policy updates
(mini-batches) -> expert bias -> log -> periodic held-out eval -> checkpoint (HF dir + trainer state, atomic).

    r1moe grpo recipes/tiny/r1_zero/grpo.yaml [key=value ...] [--resume]
    python -m r1moe.train.grpo recipes/tiny/r1_zero/grpo.yaml

With `parallel.backend: megatron` (torchrun or one GPU) the update runs on r1moe.parallel via
train/megatron_backend.py; rollouts still use the builtin engine, fed the trained weights after every step.

Legend: Q questions per step, G group size, N = Q*G sequences, T padded sequence length.
"""

from __future__ import annotations

import copy
import random
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from r1moe.algorithms import (compute_advantages, compute_grpo_loss, compute_loss_denominator, compute_token_logprobs,
                              filter_groups)
from r1moe.config import JobConfig
from r1moe.data import PromptSample, read_prompts
from r1moe.evaluate import EvalSettings, evaluate
from r1moe.plots import plot_run
from r1moe.rollout import BuiltinEngine, Generation, SamplingParams
from r1moe.tracking import MetricsLogger

from . import common


@dataclass
class RLBatch:
    input_ids_NT: torch.Tensor
    attention_mask_NT: torch.Tensor
    targets_NT: torch.Tensor
    response_mask_NT: torch.Tensor
    """True where the target is a generated token (the policy's action)."""

    def rows(self, idx: slice) -> "RLBatch":
        return RLBatch(self.input_ids_NT[idx], self.attention_mask_NT[idx], self.targets_NT[idx],
                       self.response_mask_NT[idx])


def build_rl_batch(gens: list[Generation], pad_id: int, device: torch.device) -> RLBatch:
    """prompt + completion, right-padded; inputs are seq[:-1], targets seq[1:]; loss only on completion tokens."""
    T = max(len(g.prompt_ids) + len(g.token_ids) for g in gens) - 1
    N = len(gens)
    ids = torch.full((N, T), pad_id, dtype=torch.long)
    tgt = torch.full((N, T), pad_id, dtype=torch.long)
    att = torch.zeros((N, T), dtype=torch.long)
    resp = torch.zeros((N, T), dtype=torch.bool)
    for n, g in enumerate(gens):
        seq = g.prompt_ids + g.token_ids
        L = len(seq) - 1
        ids[n, :L] = torch.tensor(seq[:-1])
        tgt[n, :L] = torch.tensor(seq[1:])
        att[n, :L] = 1
        resp[n, len(g.prompt_ids) - 1:L] = True
    return RLBatch(ids.to(device), att.to(device), tgt.to(device), resp.to(device))


def sequence_logprobs(model, b: RLBatch, expert_counts: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi of every target. Sequences are right-padded, so under a causal mask no real token ever sees a pad:
    the unmasked (fast, fused) attention path gives the same values on real positions. Only the expert counts
    need the mask, to leave pad tokens out of the load statistics."""
    out = model(b.input_ids_NT, attention_mask=b.attention_mask_NT if expert_counts else None)
    return compute_token_logprobs(out.logits, b.targets_NT), out.expert_counts


class QuestionSampler:
    """Questions in a seeded shuffled order, epoch after epoch; position = step * Q, so resume is exact."""

    def __init__(self, samples: list[PromptSample], seed: int):
        self.samples, self.seed = samples, seed

    def batch(self, step: int, q: int) -> list[PromptSample]:
        out = []
        for i in range((step - 1) * q, step * q):
            epoch, pos = divmod(i, len(self.samples))
            order = list(range(len(self.samples)))
            random.Random(self.seed + epoch).shuffle(order)
            out.append(self.samples[order[pos]])
        return out


def _load(cfg: JobConfig):
    """Inputs checked before a run directory exists: data, reward names, tokenizer, prompt lengths."""
    from r1moe.rewards import REWARD_FUNCS

    if cfg.data.train is None:
        raise ValueError("data.train is required for grpo (prompts JSONL)")
    for name in cfg.rewards.weights:
        if name not in REWARD_FUNCS:
            raise ValueError(f"rewards.weights: unknown reward {name!r}; known: {sorted(REWARD_FUNCS)}")
    train = read_prompts(cfg.data.train)
    held_out = read_prompts(cfg.data.eval) if cfg.data.eval else []
    tok = common.load_stage_tokenizer(cfg)
    if tok is None:
        raise ValueError("grpo needs a tokenizer: set model.init to a checkpoint with tokenizer.json")
    for s in train[:1000]:
        n = len(common.encode_prompt(tok, cfg.data.template, s.prompt))
        if n > cfg.data.max_prompt_tokens:
            raise ValueError(f"{cfg.data.train}: prompt {s.id or s.prompt[:40]!r} is {n} tokens > "
                             f"data.max_prompt_tokens={cfg.data.max_prompt_tokens}")
    return train, held_out, tok


def run(cfg: JobConfig, resume: bool = False) -> dict:
    from r1moe.rewards import compute_rewards
    from r1moe.templates import completion_prefix

    train, held_out, tok = _load(cfg)
    extra_rewards, weights = {}, dict(cfg.rewards.weights)
    if cfg.rewards.reward_model:  # general prompts: R = R_rule + (R_RM + R_format) + R_language (v2 eq. 8-10)
        from .rm import load_reward_fn

        extra_rewards["reward_model"] = load_reward_fn(cfg.rewards.reward_model, cfg.data.template)
        weights["reward_model"] = cfg.rewards.reward_model_weight
    a, ro = cfg.algo, cfg.rollout
    megatron = cfg.parallel.backend == "megatron"
    if megatron:
        from .megatron_backend import MegatronPolicy, check_megatron_backend

        check_megatron_backend(cfg)  # before the run directory exists
    device = common.setup_torch(cfg)
    run_dir = common.prepare_run_dir(cfg, resume)
    # megatron: the trained policy, pi_ref and the optimizer live in r1moe.parallel; `policy` only rolls out
    mp = MegatronPolicy(cfg, tok, cfg.train.steps * a.num_minibatches, mtp_weight=0.0, with_ref=a.beta > 0,
                        bias_rate=cfg.train.expert_bias_rate if a.update_expert_bias else 0.0,
                        aux_loss=False) if megatron else None
    policy = common.build_policy(cfg, tok, device).train()
    if mp is not None:
        policy.eval().requires_grad_(False)
    ref = copy.deepcopy(policy).eval().requires_grad_(False) if cfg.algo.beta > 0 and mp is None else None
    opt, sched = (None, None) if mp is not None else common.build_optimizer(policy, cfg.optim, cfg.train.steps * a.num_minibatches)
    start = 0
    if mp is not None:
        start = mp.restore(run_dir) if resume else 0
    elif resume and (ckpt := common.latest_checkpoint(run_dir)) is not None:
        state = common.restore_checkpoint(ckpt, policy, opt, sched)
        start = state.step
        if ref is not None and "ref" in state.extra:
            ref.load_state_dict(state.extra["ref"])
    pad, _, eos = common.special_ids(tok)
    engine = BuiltinEngine(policy, tok, eos_ids=sorted({eos, *policy.cfg.eos_ids}), pad_id=pad,
                           micro_batch_size=ro.micro_batch_size)
    if mp is not None:
        mp.export_to(engine)
    prefix = completion_prefix(cfg.data.template) if cfg.data.template != "none" else ""
    params = SamplingParams(temperature=ro.temperature, top_p=ro.top_p, top_k=ro.top_k,
                            max_new_tokens=ro.max_new_tokens, stop=list(ro.stop))
    ev = EvalSettings(samples=cfg.eval.samples, temperature=cfg.eval.temperature, top_p=cfg.eval.top_p,
                      max_new_tokens=cfg.eval.max_new_tokens or ro.max_new_tokens, template=cfg.data.template,
                      stop=tuple(ro.stop), seed=cfg.train.seed)
    eval_set = held_out[:cfg.eval.max_questions] if cfg.eval.max_questions else held_out
    sampler = QuestionSampler(train, cfg.train.seed)
    G, Q = ro.group_size, cfg.train.batch_size
    norm_const = a.norm_const or float(ro.max_new_tokens)
    logger = (mp.build_logger(cfg, run_dir) if mp is not None else
              MetricsLogger(run_dir, project=cfg.logging.project, run_name=cfg.name, wandb_mode=cfg.logging.wandb,
                            config=common.config_dict(cfg)))
    evals: dict[int, dict] = {}

    def run_eval(step: int) -> None:
        if eval_set:
            evals[step] = evaluate(engine, tok, eval_set, ev, show_progress=False)
            logger.log(step, {f"eval/{k}": v for k, v in evals[step].items()})

    with logger, common.progress_bar("grpo", cfg.train.steps, start) as advance:
        if start == 0:
            run_eval(0)
        for step in range(start + 1, cfg.train.steps + 1):
            t0 = time.perf_counter()
            questions = sampler.batch(step, Q)
            owners = [q for q in questions for _ in range(G)]
            prompts = [common.encode_prompt(tok, cfg.data.template, q.prompt) for q in owners]
            params.seed = cfg.train.seed * 1_000_003 + step
            gens = engine.generate(prompts, params)
            if mp is not None:
                gens = mp.broadcast(gens)
            t_rollout = time.perf_counter() - t0
            rewards = compute_rewards([prefix + g.text for g in gens], owners, weights, extra=extra_rewards)
            r_N = torch.tensor(rewards.total, dtype=torch.float32)
            adv_N = compute_advantages(r_N, G, scale=a.adv_scale)
            keep = filter_groups(r_N, G) if a.dynamic_sampling else torch.ones_like(r_N, dtype=torch.bool)
            kept = [i for i in range(len(gens)) if keep[i]]
            metrics: dict[str, float] = {}
            if kept and mp is not None:
                metrics.update(mp.train_grpo(build_rl_batch([gens[i] for i in kept], pad, device),
                                             adv_N[kept].to(device), a, norm_const))
                mp.export_to(engine)
            elif kept:
                batch = build_rl_batch([gens[i] for i in kept], pad, device)
                adv = adv_N[kept].to(device)
                with torch.no_grad():
                    old = sequence_logprobs(policy, batch)[0] if a.num_minibatches > 1 else None
                    ref_lp = sequence_logprobs(ref, batch)[0] if ref is not None else None
                size = -(-len(kept) // a.num_minibatches)
                stats, counts = [], None
                for i in range(0, len(kept), size):
                    sl = slice(i, i + size)
                    mb = batch.rows(sl)
                    logp, c = sequence_logprobs(policy, mb, expert_counts=a.update_expert_bias)
                    loss, st = compute_grpo_loss(
                        logp, None if old is None else old[sl], adv[sl], mb.response_mask_NT,
                        ref_logp_BT=None if ref_lp is None else ref_lp[sl], beta=a.beta, eps_low=a.eps_low,
                        eps_high=a.eps_high, agg=a.agg, norm_const=norm_const,
                        loss_denominator=compute_loss_denominator(mb.response_mask_NT, a.agg).clamp(min=1))
                    loss.backward()
                    metrics["train/grad_norm"] = common.clip_and_step(policy, opt, sched, cfg.optim.grad_clip)
                    stats.append(st)
                    if c is not None:
                        counts = c if counts is None else counts + c
                if a.update_expert_bias:
                    common.apply_expert_bias_update(policy, counts, cfg.train.expert_bias_rate)
                metrics.update(type(stats[0]).merge(stats).to_dict("train/"))
            if a.ref_refresh_every and step % a.ref_refresh_every == 0:
                if mp is not None:
                    mp.refresh_ref()
                elif ref is not None:
                    ref.load_state_dict(policy.state_dict())
            lengths = [len(g.token_ids) for g in gens]
            metrics.update({
                "reward/total": statistics.fmean(rewards.total),
                **{f"reward/{k}": statistics.fmean(v) for k, v in rewards.components.items()},
                "rollout/response_length": statistics.fmean(lengths),
                "rollout/response_length_std": statistics.pstdev(lengths),
                **{f"rollout/finish_{r}": sum(g.finish_reason == r for g in gens) / len(gens)
                   for r in ("eos", "stop", "length")},
                "rollout/groups_kept": len(kept) / G, "train/lr": mp.lr if mp is not None else sched.get_last_lr()[0],
                "perf/rollout_s": t_rollout, "perf/step_s": time.perf_counter() - t0,
                "perf/rollout_tokens_per_s": sum(lengths) / max(t_rollout, 1e-9)})
            logger.log(step, metrics)
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
                run_eval(step)
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < cfg.train.steps:
                if mp is not None:
                    mp.save_checkpoint(run_dir, step)
                else:
                    extra = {"ref": ref.state_dict()} if ref is not None and a.ref_refresh_every else {}
                    common.save_checkpoint(run_dir, step, policy, tok, opt, sched, extra, cfg.checkpoint.keep)
            advance(f"grpo reward {metrics['reward/total']:.2f}")
        run_eval(cfg.train.steps)
    if cfg.logging.plots and common.is_main_process():
        plot_run(run_dir)
    base, final = evals.get(0), evals.get(cfg.train.steps)
    summary = {"stage": "grpo", "steps": cfg.train.steps, "eval_base": base, "eval_final": final}
    if mp is not None:
        mp.save_final(run_dir, tok, summary, host=policy)
    else:
        common.finalize(run_dir, policy, tok, summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    return common.stage_main("grpo", run, argv)


if __name__ == "__main__":
    sys.exit(main())

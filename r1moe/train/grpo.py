"""GRPO (DeepSeek-R1 §2.2, eq. 1 and 3): the flat RL loop of R1-Zero, reasoning RL (stage 2) and all-scenario RL
(stage 4). rollout (G outputs per question) -> rule rewards (+ reward model) -> group advantages -> policy updates
(mini-batches) -> weights to the rollout engine -> log -> periodic held-out eval -> checkpoint.

    r1moe grpo recipes/tiny/r1_zero/grpo.yaml [key=value ...] [--resume]
    torchrun --nproc_per_node 8 -m r1moe.train.grpo RECIPE parallel.backend=megatron rollout.engine=sglang

The loop knows two things only: a Policy (train/policy.py: `ReferencePolicy`, or `MegatronPolicy` with
`parallel.backend: megatron`) and a RolloutEngine (r1moe.rollout: `BuiltinEngine`, or `SGLangEngine` with
`rollout.engine: sglang`). `build_engine` pairs them; nothing below it branches on either.

Legend: Q questions per step, G group size, N = Q*G sequences, T padded sequence length.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time

import torch

from r1moe.algorithms import compute_advantages, filter_groups
from r1moe.cli import stage_main
from r1moe.config import JobConfig
from r1moe.data import PromptSample, read_prompts
from r1moe.data.prompts import encode_prompt
from r1moe.data.tokenizer import special_ids
from r1moe.evaluate import EvalSettings, evaluate
from r1moe.plots import plot_run
from r1moe.progress import progress_bar
from r1moe.rollout import BuiltinEngine, RolloutEngine, SamplingParams

from . import checks, common, rundir
from .guard import NonFiniteGuard
from .packing import shuffled_indices
from .policy import Policy, ReferencePolicy, build_rl_batch


class QuestionSampler:
    """Questions in a seeded shuffled order, epoch after epoch; position = step * Q, so resume is exact."""

    def __init__(self, samples: list[PromptSample], seed: int):
        self.samples, self.seed = samples, seed

    def batch(self, step: int, q: int) -> list[PromptSample]:
        return [self.samples[i] for i in shuffled_indices(len(self.samples), (step - 1) * q, q, self.seed)]


def _load(cfg: JobConfig):
    """Inputs read before a run directory exists (the config itself is `checks.validate`'s): data, tokenizer, prompt
    lengths."""
    files = {1: cfg.data.train, **{int(k): v for k, v in cfg.data.train_schedule.items()}}
    phases = {step: read_prompts(path) for step, path in sorted(files.items())}
    held_out = read_prompts(cfg.data.eval) if cfg.data.eval else []
    tok = common.load_stage_tokenizer(cfg)
    if tok is None:
        raise ValueError("grpo needs a tokenizer: set model.init to a checkpoint with tokenizer.json")
    for step, train in phases.items():
        for s in train[:1000]:
            n = len(encode_prompt(tok, cfg.data.template, s.prompt))
            if n > cfg.data.max_prompt_tokens:
                raise ValueError(f"{files[step]}: prompt {s.id or s.prompt[:40]!r} is {n} tokens > "
                                 f"data.max_prompt_tokens={cfg.data.max_prompt_tokens}")
    return ScheduledSampler(phases, cfg.train.seed), held_out, tok


def value_at(schedule: dict[int, int], step: int, first: int) -> int:
    """The scheduled value in force at `step`: the entry with the largest start <= step, else `first`."""
    starts = [int(k) for k in schedule if int(k) <= step]
    return schedule[max(starts)] if starts else first


class ScheduledSampler:
    """Questions of the phase in force at each step (data.train_schedule), each phase its own seeded order from
    its first step on: the batch of a step depends on the step alone, so a resume across a switch is exact."""

    def __init__(self, phases: dict[int, list[PromptSample]], seed: int):
        self.samplers = {start: QuestionSampler(samples, seed) for start, samples in phases.items()}

    def batch(self, step: int, q: int) -> list[PromptSample]:
        start = max(s for s in self.samplers if s <= step)
        return self.samplers[start].batch(step - start + 1, q)


def check_backends(cfg: JobConfig) -> None:
    """Everything the chosen backend and engine need, before a run directory exists (clear errors, exit 2)."""
    if cfg.parallel.backend == "megatron":
        from .megatron_backend import check_megatron_backend

        check_megatron_backend(cfg)
    if cfg.rollout.engine == "sglang":
        from r1moe.rollout.sglang_engine import check_sglang

        sg = cfg.rollout.sglang
        if sglang_has_own_gpus(sg) and sg.colocate:
            raise ValueError(f"rollout.sglang.base_gpu_id={sg.base_gpu_id} puts SGLang on GPUs the trainer does "
                             f"not use ({trainer_gpus_on_node()} training ranks on this node): nothing to release "
                             f"them for; set rollout.sglang.colocate=false")
        if sg.dp != 1:
            # SGLang 0.5.17's tokenizer manager asserts dp_size == 1 (without DP attention) in every weight update
            # and memory release call; eval and rejection sampling load their weights once and may use dp > 1
            raise ValueError(f"rollout.sglang.dp={sg.dp}: GRPO syncs the policy into SGLang every step, which SGLang "
                             f"takes with one replica only (dp=1; its weight-update calls refuse dp > 1); spread "
                             f"the replica with rollout.sglang.tp / ep instead")
        check_sglang(num_gpus=sg.base_gpu_id + sg.tp * sg.dp)


def gpu_memory_gib(device: torch.device, phase: str) -> dict[str, float]:
    """On a GPU: memory in use on this rank's GPU by every process (SGLang's included), and this process's peak
    allocation since the step began, at the end of `phase` (GiB). Empty on CPU."""
    if device.type != "cuda":
        return {}
    free, total = torch.cuda.mem_get_info(device)
    return {f"perf/gpu_used_{phase}_gib": (total - free) / 2**30,
            f"perf/trainer_peak_{phase}_gib": torch.cuda.max_memory_allocated(device) / 2**30}


def trainer_gpus_on_node() -> int:
    import os

    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def sglang_has_own_gpus(sg) -> bool:
    """SGLang starts at or past the GPUs this node's training ranks use: weights travel by NCCL, not IPC."""
    return sg.base_gpu_id >= trainer_gpus_on_node()


def build_policy(cfg: JobConfig, tok, device: torch.device) -> Policy:
    updates = cfg.train.steps * cfg.algo.num_minibatches
    if cfg.parallel.backend == "megatron":
        from .megatron_backend import MegatronPolicy

        return MegatronPolicy(cfg, tok, updates, mtp_weight=0.0, with_ref=cfg.algo.beta > 0, aux_loss=False,
                              expert_bias_rate=cfg.train.expert_bias_rate if cfg.algo.update_expert_bias else 0.0)
    return ReferencePolicy(cfg, tok, device, updates)


def build_engine(cfg: JobConfig, policy: Policy, tok, run_dir) -> RolloutEngine | None:
    """The rollout engine of rank 0 (None on other ranks with SGLang: they receive rank 0's rollouts)."""
    pad, _, eos = special_ids(tok)
    eos_ids = sorted({eos, *policy.model_cfg.eos_ids})
    replay = cfg.rollout.routing_replay
    if replay and not policy.model_cfg.is_moe:
        raise ValueError(f"rollout.routing_replay=true: the policy ({policy.model_cfg.architecture}) has no MoE "
                         f"layers to replay; set it to false")
    if cfg.rollout.engine == "builtin":
        return BuiltinEngine(policy.rollout_model(), tok, eos_ids=eos_ids, pad_id=pad,
                             micro_batch_size=cfg.rollout.micro_batch_size, return_routed_experts=replay)
    if not policy.is_main:
        return None
    from r1moe.rollout.sglang_engine import SGLangEngine
    from r1moe.rollout.sglang_weights import write_engine_dir

    fp8 = cfg.rollout.sglang.quantization == "fp8"  # FP8 serving starts from dummy weights, never from bf16 ones
    init = None if fp8 else common.init_checkpoint_dir(cfg.model)
    path = init if init is not None else write_engine_dir(policy.model_cfg, run_dir / "rollout_engine",
                                                          quantization=cfg.rollout.sglang.quantization)
    longest = max([cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens, *cfg.rollout.max_new_tokens_schedule.values()])
    ctx = cfg.data.max_prompt_tokens + longest
    return SGLangEngine(path, tok, eos_ids, cfg.rollout.sglang, context_length=ctx, seed=cfg.train.seed,
                        dummy_weights=init is None, routing_model=policy.model_cfg if replay else None,
                        nccl_sync=sglang_has_own_gpus(cfg.rollout.sglang))


def run(cfg: JobConfig, resume: bool = False, *, policy_factory=None, engine_factory=None) -> dict:
    """The GRPO stage. `policy_factory(cfg, tok, device)` / `engine_factory(cfg, policy, tok, run_dir)` replace
    build_policy / build_engine (tests drive the loop with small fakes through them)."""
    from r1moe.rewards import compute_rewards
    from r1moe.templates import completion_prefix

    checks.validate(cfg)  # the config alone: keys with no effect, data.train, a tokenizer source
    if policy_factory is None:
        check_backends(cfg)  # before anything is read or written
    sampler, held_out, tok = _load(cfg)
    extra_rewards, weights = {}, dict(cfg.rewards.weights)
    if cfg.rewards.reward_model:  # general prompts: R = R_rule + (R_RM + R_format) + R_language (v2 eq. 8-10)
        from .rm import load_reward_fn

        extra_rewards["reward_model"] = load_reward_fn(cfg.rewards.reward_model, cfg.data.template)
        weights["reward_model"] = cfg.rewards.reward_model_weight
    if cfg.rewards.safety_model:  # the safety RM reads the whole response (v2 §3.1)
        from .rm import load_reward_fn

        extra_rewards["safety_model"] = load_reward_fn(cfg.rewards.safety_model, cfg.data.template)
        weights["safety_model"] = cfg.rewards.safety_model_weight
    a, ro = cfg.algo, cfg.rollout
    device = common.setup_torch(cfg.train)
    run_dir = rundir.prepare_run_dir(cfg, resume)
    policy = (policy_factory or build_policy)(cfg, tok, device)
    start = policy.restore(run_dir) if resume else 0
    guard = NonFiniteGuard(cfg.train.max_nonfinite_steps, what="grpo")
    guard.load_state_dict(policy.trainer_extra.get("nonfinite", {}))
    engine = (engine_factory or build_engine)(cfg, policy, tok, run_dir)
    policy.export_to(engine)  # the engine starts from the policy's weights (resumed ones included)
    pad = special_ids(tok)[0]
    prefix = completion_prefix(cfg.data.template) if cfg.data.template != "none" else ""
    params = SamplingParams(temperature=ro.temperature, top_p=ro.top_p, top_k=ro.top_k,
                            max_new_tokens=ro.max_new_tokens, stop=list(ro.stop))
    ev = EvalSettings(samples=cfg.eval.samples, temperature=cfg.eval.temperature, top_p=cfg.eval.top_p,
                      max_new_tokens=cfg.eval.max_new_tokens or ro.max_new_tokens, template=cfg.data.template,
                      stop=tuple(ro.stop), seed=cfg.train.seed)
    eval_set = held_out[:cfg.eval.max_questions] if cfg.eval.max_questions else held_out
    G, Q = ro.group_size, cfg.train.batch_size
    logger = policy.build_logger(cfg, run_dir)
    evals: dict[int, dict] = {}

    def run_eval(step: int) -> None:
        if eval_set:
            now = dataclasses.replace(ev, max_new_tokens=cfg.eval.max_new_tokens or value_at(
                ro.max_new_tokens_schedule, max(step, 1), ro.max_new_tokens))
            result = evaluate(engine, tok, eval_set, now, show_progress=False) if engine is not None else None
            evals[step] = policy.broadcast(result)
            logger.log(step, {f"eval/{k}": v for k, v in evals[step].items()})

    with logger, progress_bar("grpo", cfg.train.steps, start) as advance:
        if start == 0:
            run_eval(0)
        for step in range(start + 1, cfg.train.steps + 1):
            t0 = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            params.max_new_tokens = value_at(ro.max_new_tokens_schedule, step, ro.max_new_tokens)
            norm_const = a.norm_const or float(params.max_new_tokens)
            questions = sampler.batch(step, Q)
            owners = [q for q in questions for _ in range(G)]
            prompts = [encode_prompt(tok, cfg.data.template, q.prompt) for q in owners]
            params.seed = cfg.train.seed * 1_000_003 + step
            gens = policy.broadcast(engine.generate(prompts, params) if engine is not None else None)
            memory = gpu_memory_gib(device, "rollout")  # before a colocated engine releases its memory
            if engine is not None:
                engine.sleep()  # colocated engines hand their GPU memory to the trainer
            t_rollout = time.perf_counter() - t0
            rewards = compute_rewards([prefix + g.text for g in gens], owners, weights, extra=extra_rewards)
            r_N = torch.tensor(rewards.total, dtype=torch.float32)
            adv_N = compute_advantages(r_N, G, scale=a.adv_scale)
            keep = filter_groups(r_N, G) if a.dynamic_sampling else torch.ones_like(r_N, dtype=torch.bool)
            kept = [i for i in range(len(gens)) if keep[i]]
            metrics: dict[str, float] = {}
            t1 = time.perf_counter()
            if kept:
                batch = build_rl_batch([gens[i] for i in kept], pad, device)
                metrics.update(policy.train_grpo(batch, adv_N[kept].to(device), a, norm_const, ro.temperature,
                                                 guard=guard, step=step))
            metrics["train/nonfinite_skipped"] = guard.num_skipped
            t2 = time.perf_counter()
            memory.update(gpu_memory_gib(device, "train"))
            policy.export_to(engine)  # also when nothing trained: a colocated engine released its weights
            t3 = time.perf_counter()
            if a.ref_refresh_every and step % a.ref_refresh_every == 0:
                policy.refresh_ref()
            lengths = [len(g.token_ids) for g in gens]
            metrics.update({
                "reward/total": statistics.fmean(rewards.total),
                **{f"reward/{k}": statistics.fmean(v) for k, v in rewards.components.items()},
                "rollout/response_length": statistics.fmean(lengths),
                "rollout/response_length_std": statistics.pstdev(lengths),
                **{f"rollout/finish_{r}": sum(g.finish_reason == r for g in gens) / len(gens)
                   for r in ("eos", "stop", "length")},
                "rollout/groups_kept": len(kept) / G, "rollout/max_new_tokens": params.max_new_tokens,
                "train/lr": policy.lr,
                "perf/rollout_s": t_rollout, "perf/train_s": t2 - t1, "perf/sync_s": t3 - t2,
                "perf/step_s": time.perf_counter() - t0,
                "perf/rollout_tokens_per_s": sum(lengths) / max(t_rollout, 1e-9), **memory})
            logger.log(step, metrics)
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
                run_eval(step)
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < cfg.train.steps:
                policy.save_checkpoint(run_dir, step, extra={"nonfinite": guard.state_dict()})
            advance(f"grpo reward {metrics['reward/total']:.2f}")
        run_eval(cfg.train.steps)
    if engine is not None:
        engine.sleep()
    if cfg.logging.plots and policy.is_main:
        plot_run(run_dir)
    base, final = evals.get(0), evals.get(cfg.train.steps)
    summary = {"stage": "grpo", "steps": cfg.train.steps, "eval_base": base, "eval_final": final}
    policy.save_final(run_dir, tok, summary)
    if engine is not None:
        engine.shutdown()
    return summary


def main(argv: list[str] | None = None) -> int:
    return stage_main("grpo", run, argv)


if __name__ == "__main__":
    sys.exit(main())

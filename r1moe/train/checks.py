"""What each stage refuses from its config alone: the checks a stage makes before it reads an input file or creates
a run directory, one function per stage, so a recipe can be checked without training (tests/test_recipes.py runs
`validate` on every recipe) and a stage fails at once, naming the key.

Checks of the machine (a GPU, megatron-core installed: `megatron_backend.check_megatron_backend`) and of files (the
init checkpoint, the data) stay with the stage: a recipe is valid before its inputs exist.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from r1moe.config import JobConfig, ParallelSection

_LM_NOT_READ = ("rollout", "algo", "rewards", "eval", "data.eval", "data.max_prompt_tokens", "train.eval_every")
NOT_READ: dict[str, tuple[str, ...]] = {
    "pretrain": _LM_NOT_READ,
    "sft": _LM_NOT_READ,
    "rm": ("rollout", "algo", "rewards", "eval", "data.max_prompt_tokens"),
    "grpo": ("train.mtp_weight",),
}
"""Config keys (or whole sections) a stage never reads: set away from their defaults, they are an error naming them
(`check_not_read`), not a silent no-op (`rollout.group_size` in an SFT recipe, `train.mtp_weight` in GRPO, which
trains no MTP head)."""


def changed_keys(cfg: Any, default: Any, prefix: str) -> list[str]:
    """The leaf keys under `prefix` where `cfg` differs from `default` (dataclasses compared field by field)."""
    if dataclasses.is_dataclass(cfg):
        return [k for f in dataclasses.fields(cfg)
                for k in changed_keys(getattr(cfg, f.name), getattr(default, f.name), f"{prefix}.{f.name}")]
    return [] if cfg == default else [prefix]


def _select(node: Any, key: str) -> Any:
    for part in key.split("."):
        node = getattr(node, part)
    return node


def check_not_read(cfg: JobConfig) -> None:
    default = JobConfig(stage=cfg.stage)
    changed = [k for key in NOT_READ.get(cfg.stage, ()) for k in changed_keys(_select(cfg, key), _select(default, key),
                                                                             key)]
    if changed:
        shown = ", ".join(f"{k}={_select(cfg, k)!r}" for k in changed)
        raise ValueError(f"{shown}: `r1moe {cfg.stage}` does not read {'this key' if len(changed) == 1 else 'these keys'}"
                         f" (no effect); remove {'it' if len(changed) == 1 else 'them'}")


def _check_common(cfg: JobConfig) -> None:
    """Values one setting makes meaningless, in every training stage."""
    o = cfg.optim
    if o.schedule == "constant" and o.min_lr_ratio != 1.0:
        raise ValueError(f"optim.min_lr_ratio={o.min_lr_ratio}: no effect with optim.schedule=constant; set "
                         f"optim.schedule=cosine or linear, or remove it")


def check_megatron_config(cfg: JobConfig) -> None:
    """The config half of the megatron backend's checks (ValueError naming the key)."""
    if cfg.train.device != "auto" and not cfg.train.device.startswith("cuda"):
        raise ValueError(f"parallel.backend=megatron runs on GPUs: train.device={cfg.train.device!r} must be auto "
                         f"or cuda")
    if cfg.parallel.cp > 1:
        raise ValueError(f"parallel.cp={cfg.parallel.cp}: the trainers do not split sequences over context-parallel "
                         f"ranks; use parallel.cp=1 with parallel.backend=megatron")
    if cfg.rollout.routing_replay and cfg.parallel.pp > 1 and cfg.parallel.recompute is not None:
        raise ValueError(f"rollout.routing_replay=true with parallel.pp={cfg.parallel.pp} and parallel.recompute="
                         f"{cfg.parallel.recompute}: a recomputed router under a pipeline schedule would replay "
                         f"another micro-batch's routes; drop parallel.recompute or routing replay")


def check_reference_config(p: ParallelSection) -> None:
    """The reference backend runs one model on one device: a parallel layout would have no effect, so it is an
    error naming the key."""
    unused = [f"parallel.{name}={getattr(p, name)}" for name, default in
              (("tp", 1), ("pp", 1), ("ep", 1), ("cp", 1), ("etp", None), ("pp_layers", None), ("fp8", None),
               ("recompute", None)) if getattr(p, name) != default]
    if unused:
        raise ValueError(f"{', '.join(unused)}: no effect with parallel.backend=reference (one device); set "
                         f"parallel.backend=megatron or remove them")


def _need_train_data(cfg: JobConfig, what: str) -> None:
    if cfg.data.train is None and not cfg.data.blend:
        raise ValueError(f"data.train is required for {cfg.stage} ({what})")
    if cfg.data.format == "indexed" and cfg.stage == "pretrain":
        _need_tokenizer_source(cfg)  # the files hold ids of a tokenizer; none is built from them


def _need_tokenizer_source(cfg: JobConfig) -> None:
    if cfg.model.init is None and cfg.data.tokenizer is None:
        raise ValueError(f"{cfg.stage} needs a tokenizer: set model.init to a checkpoint with tokenizer.json, or "
                         f"data.tokenizer")


def check_pretrain(cfg: JobConfig) -> None:
    _need_train_data(cfg, "a corpus JSONL: text, or prompt + response")


def check_sft(cfg: JobConfig) -> None:
    _need_train_data(cfg, "SFT JSONL: prompt, response")
    _need_tokenizer_source(cfg)


def check_grpo(cfg: JobConfig) -> None:
    from r1moe.rewards import REWARD_FUNCS

    _need_train_data(cfg, "prompts JSONL")
    for name in cfg.rewards.weights:
        if name not in REWARD_FUNCS:
            raise ValueError(f"rewards.weights: unknown reward {name!r}; known: {sorted(REWARD_FUNCS)}")
    _need_tokenizer_source(cfg)
    ro, a = cfg.rollout, cfg.algo
    if ro.group_size < 2:
        raise ValueError(f"rollout.group_size={ro.group_size}: GRPO's advantage is relative to the group's other "
                         f"outputs, so a group of one learns nothing; use >= 2 (R1: 16)")
    if ro.temperature == 0:
        raise ValueError("rollout.temperature=0: greedy rollouts make every output of a group the same (advantage 0, "
                         "nothing learned); sample at T > 0 (R1: 1.0)")
    if a.norm_const is not None and (a.agg != "seq_sum_norm" or a.norm_const <= 0):
        raise ValueError(f"algo.norm_const={a.norm_const}: " + ("must be > 0" if a.agg == "seq_sum_norm" else
                         f"no effect with algo.agg={a.agg!r} (it is seq_sum_norm's normaliser); remove it"))
    if a.ref_refresh_every and a.beta == 0:
        raise ValueError(f"algo.ref_refresh_every={a.ref_refresh_every}: no effect with algo.beta=0 (no reference "
                         f"model); remove it or set algo.beta > 0")
    if cfg.rollout.engine == "sglang" and cfg.train.device != "auto" and not cfg.train.device.startswith("cuda"):
        raise ValueError(f"rollout.engine=sglang runs on GPUs: train.device={cfg.train.device!r} must be auto or "
                         f"cuda (or use rollout.engine=builtin)")


def check_rm(cfg: JobConfig) -> None:
    _need_train_data(cfg, "preference pairs JSONL: prompt, chosen, rejected")
    if cfg.model.init is None:
        raise ValueError("model.init is required for rm: the policy/SFT checkpoint the reward model starts from "
                         "(R1 v2 §3.1: the R1 architecture + a scalar head)")
    if cfg.train.mtp_weight:
        raise ValueError(f"train.mtp_weight={cfg.train.mtp_weight}: a reward model trains no MTP loss (it reads the "
                         f"main model's final hidden state only); remove it")
    if cfg.parallel.backend == "megatron" and cfg.model.gradient_checkpointing:
        raise ValueError("model.gradient_checkpointing=true: no effect on the megatron reward model; use "
                         "parallel.recompute=full (or selective) instead")


STAGE_CHECKS: dict[str, Callable[[JobConfig], None]] = {
    "pretrain": check_pretrain,
    "sft": check_sft,
    "grpo": check_grpo,
    "rm": check_rm,
}


def validate(cfg: JobConfig) -> None:
    """Every config check of `cfg.stage` (ValueError naming the key); reads no file, creates nothing."""
    if cfg.stage not in STAGE_CHECKS:
        raise ValueError(f"stage={cfg.stage!r}: expected one of {sorted(STAGE_CHECKS)}")
    if cfg.parallel.backend == "megatron":
        check_megatron_config(cfg)
    else:
        check_reference_config(cfg.parallel)
    _check_tokenizer_vocab_size(cfg)
    check_not_read(cfg)
    _check_common(cfg)
    STAGE_CHECKS[cfg.stage](cfg)


def _check_tokenizer_vocab_size(cfg: JobConfig) -> None:
    """data.tokenizer_vocab_size sizes only the tokenizer a pretraining run builds itself (no tokenizer given)."""
    size = cfg.data.tokenizer_vocab_size
    if size == type(cfg.data)().tokenizer_vocab_size:
        return
    if cfg.stage != "pretrain":
        raise ValueError(f"data.tokenizer_vocab_size={size}: no effect on {cfg.stage} (it sizes the tokenizer "
                         f"pretraining builds when it has none); remove it")
    if cfg.data.tokenizer or cfg.model.init:
        source = f"data.tokenizer={cfg.data.tokenizer}" if cfg.data.tokenizer else f"model.init={cfg.model.init}"
        raise ValueError(f"data.tokenizer_vocab_size={size}: no effect, the tokenizer comes from {source} (the size "
                         f"applies when pretraining builds its own); remove it")

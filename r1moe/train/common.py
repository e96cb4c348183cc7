"""What every training stage shares: device and seeds, the tokenizer and the policy a stage starts from (init
checkpoint or preset), vocabulary resizing, optimizer + LR schedule, the guarded optimizer step, the expert-bias
update. The run directory is r1moe.train.rundir, checkpoints r1moe.train.checkpointing, the command line r1moe.cli,
prompt encoding r1moe.data.prompts.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from r1moe.config import JobConfig, ModelSection, OptimSection, TrainSection
from r1moe.model import CausalLM, ModelConfig, build_model, get_preset, resolve_device

from .guard import NonFiniteGuard, StepOutcome


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_torch(train: TrainSection) -> torch.device:
    if train.threads > 0:
        torch.set_num_threads(train.threads)
    seed_everything(train.seed)
    try:
        return resolve_device(train.device)
    except ValueError as e:
        raise ValueError(f"train.{e}") from None


def config_dict(cfg: JobConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dtype_of(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


# ---------------------------------------------------------------------------------------------- tokenizer
def init_checkpoint_dir(model: ModelSection) -> Path | None:
    """The checkpoint a stage starts from, checked before any work: missing or incomplete is an error naming it."""
    if model.init is None:
        return None
    from r1moe.model import check_checkpoint_files

    path = Path(model.init)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model.init={path}: no config.json there (missing or incomplete checkpoint; "
                                f"did the previous stage finish?)")
    check_checkpoint_files(path)  # truncated / garbled weight files, before the run directory exists
    return path


def load_stage_tokenizer(cfg: JobConfig) -> Tokenizer | None:
    """data.tokenizer, else the init checkpoint's tokenizer.json; None when neither exists (pretrain builds one).
    Its special tokens are those the checkpoint's tokenizer_config.json names, and it holds the R1 chat markers as
    single tokens (added to a student's tokenizer, e.g. Qwen2.5's or Llama-3's, that lacks them)."""
    from r1moe.data.tokenizer import add_chat_markers, load_tokenizer

    if cfg.data.tokenizer:
        return add_chat_markers(load_tokenizer(cfg.data.tokenizer))
    init = init_checkpoint_dir(cfg.model)
    if init is not None:
        if not (init / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{init}: no tokenizer.json (set data.tokenizer)")
        return add_chat_markers(load_tokenizer(init))
    return None


def check_tokenizer_fits(tok: Tokenizer, mcfg: ModelConfig, where: str) -> None:
    n = max(tok.get_vocab().values()) + 1
    if n > mcfg.vocab_size:
        raise ValueError(f"{where}: tokenizer has {n} tokens but the model's vocab_size is {mcfg.vocab_size}; "
                         f"the tokenizer and the model disagree")


# ---------------------------------------------------------------------------------------------- model
def build_policy(cfg: JobConfig, tok: Tokenizer, device: torch.device) -> CausalLM:
    """From model.init (an HF directory) or a random init of model.preset + overrides. A checkpoint whose
    architecture disagrees with the recipe's explicit overrides is an error, not a silent choice."""
    from r1moe.model import from_pretrained

    dtype = dtype_of(cfg.model.dtype)
    init = init_checkpoint_dir(cfg.model)
    if init is not None:
        model = from_pretrained(init, dtype=dtype, device=str(device))
        apply_init_overrides(model.cfg, cfg.model.overrides, init)
        check_preset_matches(cfg.model.preset, model.cfg, init)
    else:
        mcfg = get_preset(cfg.model.preset)
        try:
            mcfg = mcfg.replace(**cfg.model.overrides)
        except TypeError as e:
            raise ValueError(f"model.overrides: {e}") from None
        model = build_model(mcfg, device=device, dtype=dtype, seed=cfg.train.seed)
    if init is not None and (n := num_marker_rows(tok, model.cfg.vocab_size)):
        apply_vocab_size(model, model.cfg.vocab_size + n)
    check_tokenizer_fits(tok, model.cfg, f"model {init or cfg.model.preset}")
    model.gradient_checkpointing = cfg.model.gradient_checkpointing
    return model


PRESET_CHECKED_FIELDS = ("architecture", "hidden_size", "num_hidden_layers", "num_attention_heads",
                         "intermediate_size", "n_routed_experts")


def check_preset_matches(preset: str, mcfg: ModelConfig, init: Any) -> None:
    """model.preset beside model.init is a statement of which model the checkpoint is (the real-scale recipes name
    both): the checkpoint's config.json builds the model, and a preset whose shape disagrees with it is an error, not
    a value silently ignored. The default preset (not set by the recipe) is not checked."""
    if preset == ModelSection().preset:
        return
    want = get_preset(preset)
    differ = [f"{f}: preset {getattr(want, f)!r}, checkpoint {getattr(mcfg, f)!r}" for f in PRESET_CHECKED_FIELDS
              if getattr(want, f) != getattr(mcfg, f)]
    if differ:
        raise ValueError(f"model.preset={preset!r} does not describe model.init={init} ({'; '.join(differ)}): fix "
                         f"the preset or remove it (the checkpoint's config.json sets the architecture)")


def num_marker_rows(tok: Tokenizer, vocab_size: int) -> int:
    """How many embedding rows past `vocab_size` the tokenizer needs, when those ids are all R1 chat markers that
    add_chat_markers appended (0 otherwise: any other excess is a tokenizer/model mismatch, reported as such)."""
    from r1moe.templates import CHAT_TAGS

    n = max(tok.get_vocab().values()) + 1
    extra = [tok.id_to_token(i) for i in range(vocab_size, n)]
    return len(extra) if extra and all(t in CHAT_TAGS for t in extra) else 0


def apply_vocab_size(model: CausalLM, vocab_size: int) -> None:
    """Grow the input embeddings and the output head to `vocab_size` rows; each new row starts as the mean of the
    old ones (a new token starts as an average token, not as noise that dominates the softmax). Tied heads stay
    tied."""
    embed = model.model.embed_tokens
    old = embed.weight.shape[0]
    if vocab_size <= old:
        raise ValueError(f"vocab_size={vocab_size}: the model already has {old} rows")

    def grown(weight: torch.Tensor) -> torch.Tensor:
        return torch.cat([weight, weight.mean(0, keepdim=True).expand(vocab_size - old, -1)])

    with torch.no_grad():
        new_embed = torch.nn.Embedding(vocab_size, embed.weight.shape[1], device=embed.weight.device,
                                       dtype=embed.weight.dtype)
        new_embed.weight.copy_(grown(embed.weight))
        model.model.embed_tokens = new_embed
        if model.cfg.tie_word_embeddings:
            model.lm_head.weight = new_embed.weight
        else:
            head = torch.nn.Linear(model.lm_head.in_features, vocab_size, bias=False,
                                   device=model.lm_head.weight.device, dtype=model.lm_head.weight.dtype)
            head.weight.copy_(grown(model.lm_head.weight))
            model.lm_head = head
    model.cfg.vocab_size = vocab_size


def apply_init_overrides(mcfg: ModelConfig, overrides: dict[str, Any], init: Path) -> None:
    """model.overrides on top of a checkpoint's config: aux_loss_alpha (a training knob) is applied, any other
    key must agree with config.json."""
    for key, value in overrides.items():
        if key == "aux_loss_alpha":
            mcfg.aux_loss_alpha = value
            continue
        if getattr(mcfg, key, None) != value:
            raise ValueError(f"model.overrides.{key}={value!r} disagrees with {init}/config.json "
                             f"({key}={getattr(mcfg, key, None)!r})")


def apply_expert_bias_update(model: CausalLM, counts_LE: torch.Tensor | None, rate: float) -> None:
    """DeepSeek-V3 aux-loss-free balancing: after each step b_i += rate * sign(mean load - load_i)."""
    if counts_LE is None or rate == 0 or not model.cfg.is_moe:
        return
    from r1moe.algorithms import compute_expert_bias_update

    moe_layers = [layer.mlp for layer in model.model.layers[:model.cfg.num_hidden_layers]
                  if hasattr(layer.mlp, "gate")]
    with torch.no_grad():
        for gate_mod, counts in zip((m.gate for m in moe_layers), counts_LE):
            b = gate_mod.e_score_correction_bias
            b.copy_(compute_expert_bias_update(b, counts.to(b.device).float(), rate))


# ---------------------------------------------------------------------------------------------- optimizer
def build_optimizer(model: torch.nn.Module, optim: OptimSection, total_steps: int
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(optim, total_steps))


def lr_factor(optim: OptimSection, total_steps: int) -> Callable[[int], float]:
    """LR multiplier of optimizer update `step` (0-based): linear warmup, then constant / cosine / linear decay to
    min_lr_ratio. Both backends use it (LambdaLR here, set_learning_rate on the megatron optimizer)."""

    def factor(step: int) -> float:
        if optim.warmup_steps and step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        if optim.schedule == "constant":
            return 1.0
        span = max(1, total_steps - optim.warmup_steps)
        progress = min(1.0, (step - optim.warmup_steps) / span)
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if optim.schedule == "cosine" else 1 - progress
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * shape

    return factor


def guarded_step(model: torch.nn.Module, opt: torch.optim.Optimizer, sched, grad_clip: float, guard: NonFiniteGuard,
                 step: int, loss: Any = None) -> StepOutcome:
    """Clip, then step the optimizer and the LR schedule, unless `loss` (the step's, already backpropagated) or the
    gradient norm is NaN/inf: then the update is skipped and counted by `guard` (which raises after
    train.max_nonfinite_steps in a row). The gradients are cleared either way."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf")))
    ok = guard.check_step(step, loss=loss, grad_norm=norm)
    if ok:
        opt.step()
        sched.step()
    opt.zero_grad(set_to_none=True)
    return StepOutcome(grad_norm=norm, skipped=not ok)


def clip_and_step(model: torch.nn.Module, opt: torch.optim.Optimizer, sched, grad_clip: float) -> float:
    """`guarded_step` that stops at the first non-finite gradient norm (NonFiniteError) before any update; the
    gradient norm before clipping."""
    guard = NonFiniteGuard(1, unit="optimizer update")
    return guarded_step(model, opt, sched, grad_clip, guard, step=sched.last_epoch + 1).grad_norm

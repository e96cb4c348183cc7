"""What every stage entry point shares: the run directory, device and seeds, tokenizer and policy construction,
optimizer + LR schedule, atomic checkpoints (HF directory + trainer state) with resume, the expert-bias update.

Run directory layout:
    run.lock               held (flock) by the running process: one run per directory
    config.yaml            resolved config, written first
    metrics.jsonl          one line per logged step (r1moe.tracking)
    checkpoints/step_N/    HF checkpoint + trainer_state.pt (written atomically)
    final/                 the stage's output checkpoint (HF directory, tokenizer included)
    DONE.json              written last: a run directory without it is not complete
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import pickle
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from r1moe.atomic import write_json_atomic, write_text_atomic
from r1moe.config import JobConfig, OptimSection, save_config
from r1moe.model import CausalLM, ModelConfig, build_model, get_preset

from .guard import NonFiniteError, NonFiniteGuard, StepOutcome, check_finite_state_dict

DONE_FILE = "DONE.json"
TRAINER_STATE = "trainer_state.pt"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def is_complete(run_dir: str | Path) -> bool:
    return (Path(run_dir) / DONE_FILE).is_file()


def read_done(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / DONE_FILE).read_text())


LOCK_FILE = "run.lock"
_HELD_LOCKS: dict[Path, int] = {}
"""Run directory -> the open lock file of this process. A lock outlives prepare_run_dir (it is held for the run's
lifetime and released by mark_done or process exit); an in-process pipeline runs its stages one after another and a
later call for the same directory takes the lock over from the earlier, finished or failed, call."""


def acquire_run_lock(run_dir: Path, stage: str) -> None:
    """Hold an exclusive flock on run_dir/run.lock until mark_done or process exit (the kernel drops it when the
    process dies, even by SIGKILL: no stale lock). The file names the holder; a second run in the same directory
    stops with FileExistsError naming it."""
    import fcntl
    import socket

    key = run_dir.resolve()
    release_run_lock(run_dir)
    path = run_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise ValueError(_unwritable(run_dir, e)) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        os.close(fd)
        try:
            h = json.loads(holder)
            who = f"pid {h['pid']} on host {h['host']}, {h['stage']} started {h['started']}"
        except (ValueError, KeyError, TypeError):
            who = "another process"
        raise FileExistsError(f"logging.run_dir={run_dir} is in use by {who} (lock {path}); wait for that run to "
                              f"end or choose another logging.run_dir") from None
    except OSError as e:  # a filesystem without flock (ENOLCK, some network mounts): run, but say so
        print(f"warning: {path}: cannot lock ({e.strerror or e}); nothing stops a second run from using "
              f"logging.run_dir={run_dir} at the same time", file=sys.stderr)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "stage": stage,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    _HELD_LOCKS[key] = fd


def _unwritable(run_dir: Path, e: OSError) -> str:
    return f"logging.run_dir={run_dir}: cannot write the run directory ({e.strerror or e}: {e.filename or run_dir})"


def release_run_lock(run_dir: Path) -> None:
    fd = _HELD_LOCKS.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor of the open file drops the flock


def prepare_run_dir(cfg: JobConfig, resume: bool) -> Path:
    """Create and lock the run directory, clean what a dead attempt left, write config.yaml. A complete run is never
    overwritten. An incomplete one is resumed (resume=True: the config must be the one it ran with, except the keys
    in checkpoint.allow_config_change; metrics.jsonl is cut back to the last checkpoint, or removed when there is
    none) or started afresh (its checkpoints, final/ and metrics removed)."""
    run_dir = cfg.run_dir
    if is_complete(run_dir):
        raise FileExistsError(f"{run_dir} already holds a complete {cfg.stage} run ({DONE_FILE}); "
                              f"choose another logging.run_dir or delete it")
    if not is_main_process():  # the other ranks of a torchrun job use what rank 0 prepares
        return run_dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(_unwritable(run_dir, e)) from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise ValueError(_unwritable(run_dir, PermissionError(13, "Permission denied", str(run_dir))))
    acquire_run_lock(run_dir, cfg.stage)
    if resume:  # before anything is touched: a refused resume leaves the directory as it was
        check_resume_config(cfg, run_dir / "config.yaml")
    remove_stale_temp_files(run_dir)
    if resume:
        ckpt = latest_checkpoint(run_dir)
        truncate_metrics(run_dir, checkpoint_step(ckpt) if ckpt is not None else None)
    else:
        for stale in ("checkpoints", "final", "metrics.jsonl", "wandb"):
            p = run_dir / stale
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    save_config(cfg, run_dir / "config.yaml")
    return run_dir


def remove_stale_temp_files(run_dir: Path) -> None:
    """What an attempt killed mid-write leaves (under the run lock, so no live writer owns them): temp and
    renamed-away directories of checkpoints and final/ (`.step_N.tmp-*`, `.final.old-*`), temp files (`.x.tmp`)."""
    for parent in (run_dir, run_dir / "checkpoints"):
        if not parent.is_dir():
            continue
        for p in parent.iterdir():
            if p.name.startswith(".") and (".tmp" in p.name or ".old-" in p.name):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
    if (run_dir / "config.yaml.tmp").is_file():  # save_config's temp file
        (run_dir / "config.yaml.tmp").unlink()


def check_resume_config(cfg: JobConfig, saved: Path) -> None:
    """ValueError listing, key by key, where `cfg` differs from the config the run started with, unless every
    differing key is allowed by checkpoint.allow_config_change (a key, or a section name for all its keys)."""
    import yaml
    from omegaconf import OmegaConf

    if not saved.is_file():
        return  # the dead attempt stopped before writing it: nothing to compare
    try:
        old = OmegaConf.to_container(OmegaConf.load(saved))
    except (yaml.YAMLError, UnicodeDecodeError) as e:  # a YAML error names the line
        raise ValueError(f"{saved}: unreadable ({e}); delete it to resume with the current config") from None
    new = _flatten(OmegaConf.to_container(OmegaConf.structured(cfg)))
    defaults = _flatten(OmegaConf.to_container(OmegaConf.structured(JobConfig)))
    allowed = cfg.checkpoint.allow_config_change
    # how the run is resumed, and where the directory now is (a run directory may be moved or copied)
    ignored = ("checkpoint.resume", "checkpoint.allow_config_change", "logging.run_dir")
    diffs = []
    for k, a, b in _config_diff(_flatten(old), new):
        if k in ignored or any(k == p or k.startswith(p + ".") for p in allowed):
            continue
        if a is _MISSING and k in defaults and b == defaults[k]:
            continue  # a setting added to JobConfig after the run started, at its default: the run's behaviour
        if b is _MISSING:
            print(f"resume: {saved} sets {k}={a!r}, which this version of the config no longer has",
                  file=sys.stderr)
            continue
        diffs.append((k, a, b))
    if diffs:
        lines = "; ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, a, b in diffs)
        keys = ",".join(k for k, _, _ in diffs)
        raise ValueError(f"--resume with a config that differs from {saved}: {lines}. Resume with the same config, "
                         f"or allow these keys to change with --allow-config-change {keys}")


_MISSING = object()


def _show(v: Any) -> str:
    return "(absent)" if v is _MISSING else repr(v)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict) or not d:
        return {prefix: d} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    keys = list(old) + [k for k in new if k not in old]
    return [(k, old.get(k, _MISSING), new.get(k, _MISSING)) for k in keys
            if old.get(k, _MISSING) != new.get(k, _MISSING)]


def is_main_process() -> bool:
    """Rank 0 of a torchrun job (RANK is set before torch.distributed starts), or a plain process."""
    return int(os.environ.get("RANK", "0")) == 0


def setup_torch(cfg: JobConfig) -> torch.device:
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    return resolve_device(cfg.train.device)


def config_dict(cfg: JobConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


PROGRESS_LINES = 20
"""Without a terminal, progress_bar prints about this many lines over a run (and at least one a minute)."""
PROGRESS_SECONDS = 60.0


@contextmanager
def progress_bar(desc: str, total: int, done: int = 0, enabled: bool = True) -> Iterator[Callable[[str], None]]:
    """Progress of a `total`-step loop that starts after step `done`; yields `advance(description)`, called once per
    step (a no-op when not enabled, e.g. inside another bar).

    On a terminal: a rich bar with the step count and ETA, drawn on rich's shared console, through which the
    per-step metrics lines (r1moe.tracking) are printed above it. Otherwise (an sbatch log, a pipe): a line
    `DESC: step N/TOTAL (P%), elapsed H:MM:SS, ETA H:MM:SS, DESCRIPTION` every 1/PROGRESS_LINES of the run, at
    least every PROGRESS_SECONDS, and at the last step."""
    from rich import get_console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if not enabled:
        yield lambda description: None
        return
    console = get_console()
    if console.is_terminal:
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), console=console, transient=True)
        with progress:
            task = progress.add_task(desc, total=total, completed=done)
            yield lambda description: progress.update(task, advance=1, description=description)
        return

    every = max(1, math.ceil(total / PROGRESS_LINES))
    start = last = time.monotonic()
    step = done

    def advance(description: str) -> None:
        nonlocal step, last
        step += 1
        now = time.monotonic()
        if step % every and step != total and now - last < PROGRESS_SECONDS:
            return
        last = now
        eta = (now - start) / (step - done) * (total - step)
        print(f"{desc}: step {step}/{total} ({100 * step / total:.0f}%), elapsed {_hms(now - start)}, "
              f"ETA {_hms(eta)}, {description}", flush=True)

    yield advance


def _hms(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def dtype_of(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


# ---------------------------------------------------------------------------------------------- tokenizer
def init_checkpoint_dir(cfg: JobConfig) -> Path | None:
    """The checkpoint a stage starts from, checked before any work: missing or incomplete is an error naming it."""
    if cfg.model.init is None:
        return None
    from r1moe.model import check_checkpoint_files

    path = Path(cfg.model.init)
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
    init = init_checkpoint_dir(cfg)
    if init is not None:
        if not (init / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{init}: no tokenizer.json (set data.tokenizer)")
        return add_chat_markers(load_tokenizer(init))
    return None


def special_ids(tok: Tokenizer) -> tuple[int, int, int]:
    """(pad, bos, eos) token ids."""
    from r1moe.data.tokenizer import special_ids as _special_ids

    return _special_ids(tok)


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
    init = init_checkpoint_dir(cfg)
    if init is not None:
        model = from_pretrained(init, dtype=dtype, device=str(device))
        apply_init_overrides(model.cfg, cfg.model.overrides, init)
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


# ---------------------------------------------------------------------------------------------- checkpoints
@dataclass
class TrainerState:
    step: int
    optimizer: dict
    scheduler: dict
    rng: dict
    extra: dict


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])


def save_checkpoint(run_dir: Path, step: int, model: CausalLM, tok: Tokenizer, opt, sched, extra: dict,
                    keep: int) -> Path:
    """checkpoints/step_N: an HF directory plus trainer_state.pt, written atomically; keeps the newest `keep`."""
    from r1moe.model import save_pretrained

    check_finite_state_dict(model.state_dict().items(), f"{run_dir}: checkpoint of step {step}")
    buf = io.BytesIO()
    torch.save({"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": _rng_state(),
                "extra": extra}, buf)
    path = run_dir / "checkpoints" / f"step_{step:07d}"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_pretrained(model, path, tokenizer=tok, extra_files={TRAINER_STATE: buf.getvalue()})
    ckpts = sorted(path.parent.glob("step_*"))
    for old in ckpts[:-max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if (p / TRAINER_STATE).is_file())
    return ckpts[-1] if ckpts else None


def checkpoint_step(path: Path) -> int:
    """N of checkpoints/step_N."""
    return int(path.name.removeprefix("step_"))


def truncate_metrics(run_dir: Path, step: int | None) -> None:
    """Drop metrics logged after `step` (by an attempt that died after its last checkpoint), so a resumed run's
    metrics.jsonl reads as one uninterrupted run; step None (no checkpoint: the run starts over) removes them all."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    if step is None:
        path.unlink()
        return
    kept = [line for line in path.read_text(errors="replace").splitlines()
            if line.strip() and _step_of(line) is not None and _step_of(line) <= step]
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a line cut short by a crash


def restore_checkpoint(path: Path, model: CausalLM, opt, sched) -> TrainerState:
    """Weights, optimizer, LR schedule and RNG of checkpoints/step_N. The optimizer hyperparameters stay those of
    the current config (`opt` was built from it): a resume allowed to change optim.lr trains with the new LR.
    A corrupt or non-finite checkpoint is a ValueError naming the file (and tensor)."""
    from safetensors import SafetensorError, safe_open

    from r1moe.model import load_hf_tensor

    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt") as st:
                for name in st.keys():  # noqa: SIM118 - a safe_open handle is no dict
                    t = st.get_tensor(name)
                    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                        raise ValueError(f"{f}: tensor {name!r} holds NaN/inf; this checkpoint cannot be resumed")
                    load_hf_tensor(model, name, t)
        except SafetensorError as e:
            raise ValueError(f"{f}: not a readable safetensors file ({e}); the checkpoint is truncated or corrupt; "
                             f"delete {path} to resume from an earlier one") from None
    try:
        state = torch.load(path / TRAINER_STATE, weights_only=False)
    except (EOFError, RuntimeError, pickle.UnpicklingError) as e:  # what a truncated or garbled file raises
        raise ValueError(f"{path / TRAINER_STATE}: unreadable ({type(e).__name__}: {e}); delete {path} to resume "
                         f"from an earlier checkpoint") from None
    current = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    base_lrs = list(sched.base_lrs)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    for group, hyper in zip(opt.param_groups, current):
        group.update(hyper)
    sched.base_lrs = base_lrs
    sched._last_lr = [base * f(sched.last_epoch) for f, base in zip(sched.lr_lambdas, base_lrs)]
    for group, lr in zip(opt.param_groups, sched._last_lr):
        group["lr"] = lr
    _set_rng_state(state["rng"])
    return TrainerState(state["step"], state["optimizer"], state["scheduler"], state["rng"], state["extra"])


def finalize(run_dir: Path, model: CausalLM, tok: Tokenizer, summary: dict[str, Any]) -> Path:
    """Write final/ (HF directory) then DONE.json: the run is complete only once both exist. Non-finite weights
    are refused (NonFiniteError) before anything is written."""
    from r1moe.model import save_pretrained

    check_finite_state_dict(model.state_dict().items(), f"{run_dir}: final weights")
    final = run_dir / "final"
    save_pretrained(model, final, tokenizer=tok)
    mark_done(run_dir, summary)
    return final


def mark_done(run_dir: Path, summary: dict[str, Any]) -> None:
    """DONE.json (the run is complete), then the run lock is released."""
    write_json_atomic(run_dir / DONE_FILE, {"finished_at": time.strftime("%Y-%m-%d %H:%M:%S"), **summary})
    release_run_lock(run_dir)


# ---------------------------------------------------------------------------------------------- entry points
INPUT_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError)


def run_cli(prog: str, fn: Callable[[], int]) -> int:
    """Run an entry point: bad input (recipe, data, checkpoint, run directory) prints one line naming it and
    returns 2; training that turned NaN/inf (NonFiniteError: nothing non-finite was saved) prints one line and
    returns 1."""
    try:
        return fn()
    except INPUT_ERRORS as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"{prog}: error: {msg}", file=sys.stderr)
        # under torchrun (slurm/common.sh) the job's status would be torchrun's 1; the launcher reads this one
        if (status_file := os.environ.get("R1MOE_STATUS_FILE")) and is_main_process():
            Path(status_file).write_text("2\n")
        return 2
    except NonFiniteError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1


def stage_main(stage: str, run: Callable[[JobConfig, bool], Any], argv: list[str] | None) -> int:
    """`main` of a stage module: parse RECIPE + overrides, run, map input errors to exit status 2."""

    def go() -> int:
        cfg, resume = parse_stage_args(argv, stage)
        try:
            run(cfg, resume)
        finally:  # a run that failed lets go of its directory at once, not only when the process ends
            release_run_lock(cfg.run_dir)
        return 0

    return run_cli(f"r1moe {stage}", go)


def parse_stage_args(argv: list[str] | None, stage: str) -> tuple[JobConfig, bool]:
    """`r1moe STAGE RECIPE [key=value ...] [--resume]` -> (config, resume)."""
    import argparse

    from r1moe.config import load_config

    p = argparse.ArgumentParser(prog=f"r1moe {stage}", description=f"Run the {stage} stage from a recipe.")
    p.add_argument("recipe", help="recipe YAML (recipes/...)")
    p.add_argument("overrides", nargs="*",
                   help="key=value config overrides, e.g. optim.lr=1e-4 logging.run_dir=runs/try1; the run's length "
                        "is train.steps or train.epochs, never both (train.epochs=null train.steps=5 on a recipe "
                        "that sets epochs)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    p.add_argument("--allow-config-change", metavar="KEYS", default="",
                   help="comma-separated config keys (or sections) that --resume may find changed, e.g. "
                        "train.steps,logging.wandb; any other difference stops the resume")
    args = p.parse_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        p.error(f"overrides must look like key=value: {bad}")
    extra = [f"stage={stage}"]
    if args.allow_config_change:
        keys = [k.strip() for k in args.allow_config_change.split(",") if k.strip()]
        extra.append(f"checkpoint.allow_config_change=[{','.join(keys)}]")
    cfg = load_config(args.recipe, [*args.overrides, *extra])
    return cfg, args.resume or cfg.checkpoint.resume


def encode(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def bos_prefix(tok: Tokenizer) -> list[int]:
    """[bos], or [] for tokenizers without one (Qwen2): what every training and generation sequence starts with."""
    bos = special_ids(tok)[1]
    return [] if bos is None else [bos]


def encode_prompt(tok: Tokenizer, template: str, prompt: str) -> list[int]:
    """BOS + the rendered prompt: exactly how training sequences start (pretrain/SFT prepend BOS), so rollouts,
    evaluation, rejection sampling and the reward model condition the model on what it was trained on."""
    return bos_prefix(tok) + encode(tok, render_prompt(template, prompt))


def render_prompt(template: str, prompt: str) -> str:
    if template == "none":
        return prompt
    from r1moe.templates import render

    return render(template, prompt)

"""Checkpoints of the reference (torch) backend: checkpoints/step_N is an HF directory plus trainer_state.pt
(optimizer, LR schedule, RNG, stage extras), written atomically; restore puts a run back where a checkpoint left it;
finalize writes final/ and marks the run complete."""

from __future__ import annotations

import io
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from r1moe.model import CausalLM

from .guard import check_finite_state_dict
from .rundir import TRAINER_STATE, mark_done


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


def restore_checkpoint(path: Path, model: CausalLM, opt, sched) -> TrainerState:
    """Weights, optimizer, LR schedule and RNG of checkpoints/step_N. The optimizer hyperparameters stay those of
    the current config (`opt` was built from it): a resume allowed to change optim.lr trains with the new LR.
    A corrupt or non-finite checkpoint is a ValueError naming the file (and tensor)."""
    from r1moe.model import load_hf_tensor
    from r1moe.model.hf_io import get_tensor, open_safetensors, read_weight_map

    try:
        by_file: dict[str, list[str]] = {}
        for name, file in read_weight_map(path).items():
            by_file.setdefault(file, []).append(name)
        for file, names in by_file.items():
            f = path / file
            with open_safetensors(f) as st:
                for name in names:
                    t = get_tensor(st, name, f)
                    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                        raise ValueError(f"{f}: tensor {name!r} holds NaN/inf; this checkpoint cannot be resumed")
                    load_hf_tensor(model, name, t)
    except ValueError as e:  # a truncated, garbled or non-finite weight file: say how to go on
        raise ValueError(f"{e}; delete {path} to resume from an earlier one") from None
    try:
        state = torch.load(path / TRAINER_STATE, weights_only=False)
    except Exception as e:  # noqa: BLE001 -- a truncated or garbled pickle raises anything (EOFError, ValueError, ...)
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

"""Non-finite guard: a training step whose loss or gradient norm is NaN/inf is skipped (no optimizer update, no
LR-schedule advance, as megatron skips an overflowed fp16 step) and counted; `train.max_nonfinite_steps` of them in
a row stop the run with `NonFiniteError`. No checkpoint, final/ or DONE.json is ever written from non-finite
weights (`check_finite_state_dict`), and a checkpoint whose tensors are NaN/inf is refused on load.

Every backend uses the same object, one per run (its counts go into the checkpoint's extra as "nonfinite"):

    guard = NonFiniteGuard(cfg.train.max_nonfinite_steps, what="sft")
    ...backward...
    outcome = common.guarded_step(model, opt, sched, cfg.optim.grad_clip, guard, step, loss=loss)  # reference
    if outcome.skipped: ...                                       # the weights did not move
    metrics = megatron_policy.train_step_lm(batch, guard, step)   # megatron: metrics["train/skipped"]
    metrics = megatron_policy.train_grpo(..., guard=guard, step=step)

`guard.check_step(step, loss, grad_norm)` is the decision itself (True: apply the update; False: skip it), for a
backend that computes the gradient norm its own way (parallel.train_step skips before megatron's optimizer step and
`megatron_backend.record_step` reports it). Without a guard, `common.clip_and_step` and the megatron policy stop at
the first non-finite update, before it is applied.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from r1moe.rollout.base import NonFiniteError  # one class for the trainers and the rollout engines


@dataclass
class StepOutcome:
    grad_norm: float
    """Total gradient norm before clipping (NaN/inf when the step was skipped for it)."""
    skipped: bool
    """True: the loss or gradient norm was not finite and the optimizer did not update the weights."""


def _value(x: Any) -> float:
    return float(x.detach().float()) if isinstance(x, torch.Tensor) else float(x)


class NonFiniteGuard:
    """Counts non-finite steps. `max_in_a_row` consecutive ones raise NonFiniteError (1 = stop at the first)."""

    def __init__(self, max_in_a_row: int, what: str = "training", unit: str = "step"):
        if max_in_a_row < 1:
            raise ValueError(f"train.max_nonfinite_steps={max_in_a_row} must be >= 1")
        self.max_in_a_row = max_in_a_row
        self.what, self.unit = what, unit
        """How messages name the run ("sft", "grpo") and what `step` counts ("step", "optimizer update")."""
        self.num_skipped = 0
        """Skipped steps over the whole run (restored on resume)."""
        self.in_a_row = 0

    def check_step(self, step: int, loss: Any = None, grad_norm: Any = None) -> bool:
        """True when `loss` and `grad_norm` (floats or 0-dim tensors; None = not known) are finite: apply the update.
        False: skip it (counted, one warning line). Raises NonFiniteError on the max_in_a_row-th in a row."""
        values = {k: _value(v) for k, v in (("loss", loss), ("grad norm", grad_norm)) if v is not None}
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if not bad:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.num_skipped += 1
        what = ", ".join(f"{k} {v}" for k, v in bad.items())
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteError(
                f"{self.what} stopped at {self.unit} {step}: {what}; {self.in_a_row} non-finite step(s) in a row "
                f"(train.max_nonfinite_steps={self.max_in_a_row}). Nothing non-finite was saved and the run is not "
                f"marked complete; lower optim.lr or check the data, then --resume from the last checkpoint or start "
                f"over")
        print(f"{self.what}: {self.unit} {step}: {what}; update skipped ({self.in_a_row} in a row, "
              f"train.max_nonfinite_steps={self.max_in_a_row})", file=sys.stderr)
        return False

    def state_dict(self) -> dict[str, int]:
        return {"num_skipped": self.num_skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.num_skipped = int(state.get("num_skipped", 0))
        self.in_a_row = int(state.get("in_a_row", 0))


def nonfinite_tensor(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or inf, else None."""
    for name, t in named_tensors:
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            return name
    return None


def check_finite_state_dict(named_tensors: Iterable[tuple[str, torch.Tensor]], where: str) -> None:
    """NonFiniteError naming `where` and the first tensor with NaN/inf; called before anything is written."""
    bad = nonfinite_tensor(named_tensors)
    if bad is not None:
        raise NonFiniteError(f"{where}: tensor {bad!r} holds NaN/inf; refusing to write non-finite weights")

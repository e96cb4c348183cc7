"""Training-curve PNGs from a run's metrics.jsonl, in the style of DeepSeek-R1's figures.

- accuracy.png: held-out accuracy vs step (`eval/.../pass@1`, `eval/.../cons@k`), like R1 Figure 2 (AIME
  accuracy of R1-Zero during RL: pass@1 and cons@16 curves, optional dashed reference levels).
- response_length.png: `rollout/response_length` vs step with a +-1 std band from
  `rollout/response_length_std` when present, like R1 Figure 3.
- rewards.png: every `reward/*` component; loss.png: `train/loss`.
- step_time.png: seconds per RL step split into rollout / train / weight sync (`perf/*_s`), stacked; the log-prob
  part of train (log pi_old, log pi_ref: `perf/logprob_s`) apart where it is logged.
- logprob_mismatch.png: mean and max |log pi_trainer - log pi_engine| on the rollout's tokens before each update
  (`rollout/logprob_abs_diff*`): how far the rollout engine's numerics are from the trainer's (SGLang's bf16
  kernels, routing flips; routing replay removes the latter). Skipped when it stays below 1e-4 (the built-in
  engine sampling from the trainer's own module: float noise).

Matplotlib's object API on the Agg canvas: no pyplot, no global backend switch, no display needed. Each PNG
is written to a temporary file in the same directory and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from r1moe.atomic import atomic_open
from r1moe.tracking import read_metrics

Series = list[tuple[float, float]]

_LENGTH_KEY = "rollout/response_length"
_LENGTH_STD_KEY = "rollout/response_length_std"
_LOSS_KEY = "train/loss"


def _series(records: Sequence[dict], key: str) -> Series:
    """(step, value) for every record that has a finite `key`; a re-logged step keeps its last value."""
    by_step: dict[float, float] = {}
    for record in records:
        value, step = record.get(key), record.get("step")
        if isinstance(value, int | float) and math.isfinite(value) and step is not None:
            by_step[step] = float(value)
    return sorted(by_step.items())


def _keys(records: Sequence[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for record in records:
        seen.update(dict.fromkeys(record))
    return list(seen)


def _is_accuracy_key(key: str) -> bool:
    leaf = key.rsplit("/", 1)[-1]
    return key.startswith("eval/") and (leaf == "pass@1" or leaf.startswith("cons@"))


def _new_axes(title: str, xlabel: str, ylabel: str):
    fig = Figure(figsize=(7.0, 4.2), dpi=120, layout="tight")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if xlabel == "Steps":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # a 3-step run has no step 1.5
    return fig, ax


def _save(fig: Figure, out_path: Path) -> Path:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(out_path, "wb") as f:
        fig.savefig(f, format="png")
    return out_path


def _xy(series: Series) -> tuple[list[float], list[float]]:
    return [s for s, _ in series], [v for _, v in series]


def build_accuracy_figure(records, refs: dict[str, float] | None = None) -> Figure | None:
    """Held-out accuracy vs step; the y axis starts at 0 and reaches at least 0.1 (an all-zero curve is a line at
    the bottom, not one in the middle of -0.04..0.04) and at most 1."""
    acc_keys = [k for k in _keys(records) if _is_accuracy_key(k)]
    curves = {k.removeprefix("eval/"): _series(records, k) for k in acc_keys}
    curves = {name: s for name, s in curves.items() if s}
    if not curves:
        return None
    fig, ax = _new_axes("Held-out accuracy during training", "Steps", "Accuracy")
    for name, series in curves.items():
        ax.plot(*_xy(series), marker="o", markersize=3, linewidth=1.5, label=name)
    for name, level in (refs or {}).items():
        ax.axhline(level, linestyle="--", linewidth=1.0, color="gray", label=name)
    top = max([v for s in curves.values() for _, v in s] + list((refs or {}).values()))
    ax.set_ylim(0.0, min(1.0, max(0.1, 1.1 * top)))
    ax.legend(loc="lower right", fontsize=8)
    return fig


def build_length_figure(records) -> Figure | None:
    series = _series(records, _LENGTH_KEY)
    if not series:
        return None
    fig, ax = _new_axes("Average response length during training", "Steps", "Average length per response (tokens)")
    steps, lengths = _xy(series)
    ax.plot(steps, lengths, linewidth=1.5, color="tab:blue", label="mean")
    std = dict(_series(records, _LENGTH_STD_KEY))
    if std:
        band = [(s, v, std[s]) for s, v in series if s in std]
        ax.fill_between(
            [s for s, _, _ in band],
            [v - d for _, v, d in band],
            [v + d for _, v, d in band],
            color="tab:blue",
            alpha=0.2,
            linewidth=0,
            label="+-1 std",
        )
        ax.legend(loc="upper left", fontsize=8)
    return fig


def build_rewards_figure(records) -> Figure | None:
    """Every reward/* component as a solid line; their weighted sum `total` dashed black on top, so it stays
    visible where it equals a component (e.g. total = accuracy when the other weights are 0)."""
    curves = {k.removeprefix("reward/"): _series(records, k) for k in _keys(records) if k.startswith("reward/")}
    curves = {name: s for name, s in curves.items() if s}
    if not curves:
        return None
    fig, ax = _new_axes("Rewards during training", "Steps", "Mean reward")
    for name, series in curves.items():
        if name != "total":
            ax.plot(*_xy(series), linewidth=1.5, label=name)
    if "total" in curves:
        ax.plot(*_xy(curves["total"]), linewidth=1.8, linestyle="--", color="black", zorder=3, label="total")
    ax.legend(loc="best", fontsize=8)
    return fig


def build_loss_figure(records) -> Figure | None:
    series = _series(records, _LOSS_KEY)
    if not series:
        return None
    fig, ax = _new_axes("Training loss", "Steps", "Loss")
    ax.plot(*_xy(series), linewidth=1.2, color="tab:red")
    return fig


_STEP_PARTS = (("perf/rollout_s", "rollout"), ("perf/train_s", "train"), ("perf/sync_s", "weight sync"))


def build_step_time_figure(records) -> Figure | None:
    parts = {label: dict(_series(records, key)) for key, label in _STEP_PARTS}
    logprob = dict(_series(records, "perf/logprob_s"))  # a part of train: log pi_old and log pi_ref
    if logprob:
        train = parts.pop("train")
        parts = {"rollout": parts["rollout"], "log-probs (old, ref)": logprob,
                 "update": {s: t - logprob.get(s, 0.0) for s, t in train.items()}, "weight sync": parts["weight sync"]}
    steps = sorted(set.intersection(*(set(p) for p in parts.values())))
    if not steps:
        return None
    fig, ax = _new_axes("Time per RL step", "Steps", "Seconds")
    ax.stackplot(steps, *[[p[s] for s in steps] for p in parts.values()], labels=list(parts), alpha=0.8)
    ax.legend(loc="upper left", fontsize=8)
    return fig


def build_mismatch_figure(records) -> Figure | None:
    mean = _series(records, "rollout/logprob_abs_diff")
    if not mean or max(v for _, v in mean) < 1e-4:
        return None
    fig, ax = _new_axes("Rollout engine vs trainer log-probs (same weights)", "Steps", "|log-prob difference| (nats)")
    ax.plot(*_xy(mean), linewidth=1.5, marker="o", markersize=3, label="mean")
    peak = _series(records, "rollout/logprob_abs_diff_max")
    if peak:
        ax.plot(*_xy(peak), linewidth=1.0, linestyle="--", label="max")
    if all(v > 0 for _, v in mean + peak):
        ax.set_yscale("log")
    ax.legend(loc="best", fontsize=8)
    return fig


def plot_run(
    run_dir: str | os.PathLike,
    *,
    out_dir: str | os.PathLike | None = None,
    accuracy_refs: dict[str, float] | None = None,
) -> list[Path]:
    """Write accuracy.png, response_length.png, rewards.png, loss.png, step_time.png and logprob_mismatch.png for
    the curves present in
    `run_dir/metrics.jsonl` (a plot whose keys never appear is skipped). Returns the written paths.

    out_dir: where the PNGs go (default: run_dir). accuracy_refs: dashed horizontal reference levels on the
    accuracy plot, e.g. {"o1-0912 pass@1": 0.74} as in R1 Figure 2.
    """
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir
    records = read_metrics(run_dir)
    figures = {
        "accuracy.png": build_accuracy_figure(records, accuracy_refs),
        "response_length.png": build_length_figure(records),
        "rewards.png": build_rewards_figure(records),
        "loss.png": build_loss_figure(records),
        "step_time.png": build_step_time_figure(records),
        "logprob_mismatch.png": build_mismatch_figure(records),
    }
    return [_save(fig, out / name) for name, fig in figures.items() if fig is not None]


def plot_compare(
    series: dict[str, Sequence[tuple[float, float]]], title: str, ylabel: str, out_path: str | os.PathLike
) -> Path:
    """One line per named (step, value) series on shared axes, e.g. accuracy of several pipeline stages."""
    fig, ax = _new_axes(title, "Steps", ylabel)
    for name, points in series.items():
        points = sorted(points)
        if points:
            ax.plot(*_xy(points), marker="o", markersize=3, linewidth=1.5, label=name)
    if any(series.values()):
        ax.legend(loc="best", fontsize=8)
    return _save(fig, Path(out_path))

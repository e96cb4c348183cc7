"""CPU benchmark: the tiny R1-Zero run end to end (`r1moe pipeline recipes/tiny/r1_zero.yaml`), timed, summarised.

Runs the pipeline from scratch (forced) and writes benchmarks/results/tiny_r1_zero_cpu.json plus the run's plots
(held-out accuracy vs step = the paper's Figure 2, response length vs step = Figure 3, reward components) under
benchmarks/results/tiny_r1_zero/. The summary separates what GRPO changed: the format rate (an answer counts only
inside <answer>) and the accuracy among formatted replies. Goals (issue): wall clock <= 600 s on 2 CPU cores and
held-out pass@1 +15 points from the base checkpoint to the final one. Not a test.

    python benchmarks/tiny_r1_zero.py [--recipe recipes/tiny/r1_zero.yaml] [--summarize-only]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from r1moe.atomic import write_json_atomic
from r1moe.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from cpu_rollout_grpo import cpu_name

GOAL_S = 600
GOAL_POINTS = 15.0


def _device() -> str:
    """Where the run's stages ran: the first CUDA device when there is one (train.device: auto picks it)."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (train.device auto -> cuda), host {os.cpu_count()} CPU cores"
    return f"{cpu_name()}, {os.cpu_count()} cores (no GPU)"


def summarize(root: Path, wall_s: float | None) -> dict:
    grpo = root / "grpo"
    rows = read_metrics(grpo)
    evals = [{k: v for k, v in r.items() if k == "step" or k.startswith("eval/")} for r in rows
             if "eval/pass@1" in r]
    if len(evals) < 2:
        raise SystemExit(f"{grpo}/metrics.jsonl: needs the base and final evaluations, found {len(evals)}")
    for e in evals:  # accuracy among replies in the <think>/<answer> format
        e["eval/accuracy_given_format"] = e["eval/pass@1"] / max(e["eval/format_rate"], 1e-9)
    train = [r for r in rows if "reward/accuracy" in r]
    k = max(1, min(20, len(train) // 2))

    def window(rs: list[dict], key: str) -> float:
        return round(statistics.fmean(r[key] for r in rs), 4)

    base, final = evals[0], evals[-1]
    gain = 100 * (final["eval/pass@1"] - base["eval/pass@1"])
    timings = json.loads((root / "pipeline_timings.json").read_text())
    return {
        "benchmark": "tiny R1-Zero pipeline (r1moe pipeline recipes/tiny/r1_zero.yaml)",
        "device": _device(),
        "wall_clock_s": None if wall_s is None else round(wall_s, 1),
        "goal_s": GOAL_S,
        "time_goal_met": None if wall_s is None else wall_s <= GOAL_S,
        "stage_seconds": timings,
        "held_out": "split-1 problems (never trained on), K samples per question at T=0.6, top-p 0.95",
        "eval_by_step": evals,
        "pass@1_base": base["eval/pass@1"],
        "pass@1_final": final["eval/pass@1"],
        "pass@1_gain_points": round(gain, 2),
        "format_rate_base_final": [base["eval/format_rate"], final["eval/format_rate"]],
        "accuracy_given_format_base_final": [round(base["eval/accuracy_given_format"], 4),
                                             round(final["eval/accuracy_given_format"], 4)],
        "acceptance_gain_points": GOAL_POINTS,
        "acceptance_met": gain >= GOAL_POINTS,
        f"rollout_first{k}_last{k}_steps": {
            key: [window(train[:k], key), window(train[-k:], key)]
            for key in ("reward/accuracy", "reward/format", "rollout/response_length", "train/kl")},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="recipes/tiny/r1_zero.yaml")
    p.add_argument("--root", default="runs/tiny-r1-zero", help="the recipe's root (where the run lands)")
    p.add_argument("--summarize-only", action="store_true", help="summarise an existing run (no wall clock)")
    p.add_argument("--out", default="benchmarks/results/tiny_r1_zero_cpu.json")
    p.add_argument("--label", help="what the summarised run was, when not the recipe as committed")
    a = p.parse_args()
    wall = None
    if not a.summarize_only:
        from r1moe.stages import load_pipeline

        forced = [arg for s in load_pipeline(a.recipe).stages for arg in ("--force", s.name)]
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "r1moe.cli", "pipeline", a.recipe, *forced], check=True)
        wall = time.perf_counter() - t0
    root = Path(a.root)
    result = summarize(root, wall)
    if a.label:
        result["run"] = a.label
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result)
    pictures = out.parent / out.stem.removesuffix("_cpu")
    pictures.mkdir(exist_ok=True)
    for png in sorted((root / "grpo").glob("*.png")) + sorted((root / "pretrain").glob("*.png")):
        shutil.copy2(png, pictures / f"{png.parent.name}_{png.name}")
    print(json.dumps({k: result[k] for k in ("wall_clock_s", "pass@1_base", "pass@1_final", "pass@1_gain_points",
                                             "format_rate_base_final", "accuracy_given_format_base_final",
                                             "acceptance_met")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

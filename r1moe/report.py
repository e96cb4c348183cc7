"""The pipeline's report: the paper's tables in miniature, measured.

Writes `report.md` in the report stage's directory: one row per evaluated checkpoint (pass@1, cons@K, format rate,
language consistency, mean response length — R1 Tables 2-5 style), the Table-6 experiment (the same student
trained by GRPO for equal compute vs distilled), the paper's qualitative claims checked against the numbers
(stage-2 pass@1 > stage-1; cons@K >= pass@1; distilled student > RL student), each PASS or FAIL as measured,
and the per-stage curves (PNG) copied next to it.

Pipeline `report:` keys: `eval_stage` (name of the eval stage), and the labels of its checkpoints that play
`stage1`, `stage2`, `distilled`, `student_rl` in the claims (any of them may be absent).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from r1moe.tracking import read_metrics

if TYPE_CHECKING:
    from r1moe.pipeline import PipelineConfig


def _cons_key(m: dict[str, Any]) -> str | None:
    return next((k for k in m if k.startswith("cons@")), None)


def _fmt(x: Any) -> str:
    return f"{100 * x:.1f}" if isinstance(x, float) else str(x)


def results_table(results: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| checkpoint | pass@1 | cons@K | format | language consistency | mean length (tokens) |",
             "|---|---|---|---|---|---|"]
    for label, m in results.items():
        ck = _cons_key(m)
        lines.append(f"| {label} | {_fmt(m['pass@1'])} | {_fmt(m[ck]) if ck else '-'} ({ck}) | "
                     f"{_fmt(m['format_rate'])} | {_fmt(m.get('language_consistency', float('nan')))} | "
                     f"{m['mean_response_length']:.1f} |")
    return lines


def check_claims(results: dict[str, dict[str, Any]], roles: dict[str, str]) -> list[tuple[str, bool | None, str]]:
    """(claim, holds?, evidence); holds is None when the checkpoints it needs were not evaluated."""
    claims: list[tuple[str, bool | None, str]] = []

    def get(role: str) -> dict[str, Any] | None:
        label = roles.get(role)
        return results.get(label) if label else None

    s1, s2 = get("stage1"), get("stage2")
    if s1 and s2:
        claims.append(("reasoning RL improves on the cold start: stage-2 pass@1 > stage-1 pass@1",
                       s2["pass@1"] > s1["pass@1"], f"{_fmt(s2['pass@1'])} vs {_fmt(s1['pass@1'])}"))
    else:
        claims.append(("stage-2 pass@1 > stage-1 pass@1", None, "stage 1 or 2 not evaluated"))
    bad = [label for label, m in results.items() if (ck := _cons_key(m)) and m[ck] < m["pass@1"]]
    claims.append(("majority vote helps: cons@K >= pass@1 for every checkpoint", not bad,
                   "all checkpoints" if not bad else f"fails for {', '.join(bad)}"))
    d, r = get("distilled"), get("student_rl")
    if d and r:
        claims.append(("distillation beats RL on the small student at equal steps (Table 6)",
                       d["pass@1"] > r["pass@1"], f"distilled {_fmt(d['pass@1'])} vs RL {_fmt(r['pass@1'])}"))
    else:
        claims.append(("distilled student > GRPO student", None, "student runs not evaluated"))
    return claims


def _curves(p: "PipelineConfig", out: Path) -> list[str]:
    """Copy each training stage's PNG curves next to the report; returns markdown lines."""
    from r1moe.pipeline import stage_output

    lines = []
    for s in p.stages:
        if s.kind not in ("pretrain", "sft", "grpo", "rm"):
            continue
        run_dir = stage_output(p, s)
        pngs = sorted(run_dir.glob("*.png"))
        if not pngs:
            continue
        lines.append(f"### {s.name} ({s.kind})")
        for png in pngs:
            dest = out / f"{s.name}_{png.name}"
            shutil.copyfile(png, dest)
            lines.append(f"![{s.name} {png.stem}]({dest.name})")
        if s.kind == "grpo":
            lines.extend(_rl_summary(run_dir))
    return lines


def _rl_summary(run_dir: Path) -> list[str]:
    records = read_metrics(run_dir)
    evals = [m for m in records if "eval/pass@1" in m]
    rollouts = [m for m in records if "rollout/response_length" in m]
    out = []
    if len(evals) >= 2:
        out.append(f"held-out pass@1: {_fmt(evals[0]['eval/pass@1'])} at step {evals[0]['step']} -> "
                   f"{_fmt(evals[-1]['eval/pass@1'])} at step {evals[-1]['step']}")
    if len(rollouts) >= 2:
        k = max(1, len(rollouts) // 5)
        first = sum(m["rollout/response_length"] for m in rollouts[:k]) / k
        last = sum(m["rollout/response_length"] for m in rollouts[-k:]) / k
        out.append(f"mean response length (first/last {k} steps): {first:.1f} -> {last:.1f} tokens")
    return [f"- {line}" for line in out]


def write_report(p: "PipelineConfig", out: Path) -> dict[str, Any]:
    eval_stage = p.report.get("eval_stage", "eval")
    results_path = Path(p.root) / eval_stage / "results.json"
    if not results_path.is_file():
        raise FileNotFoundError(f"report: {results_path} missing (run the {eval_stage!r} stage first)")
    results = json.loads(results_path.read_text())
    claims = check_claims(results, p.report)
    timings_path = Path(p.root) / "pipeline_timings.json"
    lines = [f"# {p.name}: results", "",
             "Every number below was measured by this pipeline run (r1moe eval: K samples per question, "
             "T=0.6, top-p 0.95; pass@1 = mean accuracy over the K samples; numbers in %).", "",
             *results_table(results), "", "## The paper's claims, as measured", ""]
    for claim, holds, evidence in claims:
        verdict = "not measured" if holds is None else ("PASS" if holds else "FAIL")
        lines.append(f"- **{verdict}** — {claim} ({evidence})")
    lines += ["", "## Curves", "", *_curves(p, out)]
    if timings_path.is_file():
        lines += ["", "## Stage timings (seconds, this run)", "", "```", timings_path.read_text().strip(), "```"]
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".report.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out / "report.md")
    return {"report": str(out / "report.md"),
            "claims": {c: (None if h is None else bool(h)) for c, h, _ in claims}}

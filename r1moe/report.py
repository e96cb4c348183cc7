"""The pipeline's report: the paper's tables in miniature, measured.

Writes `report.md` in the report stage's directory: one row per evaluated checkpoint (pass@1, cons@K, format rate,
language consistency, mean response length — R1 Tables 2-5 style), the paper's qualitative claims checked against
the numbers (`check_claims`: R1-Zero over its base; stage 2 over the cold start; cold start + RL over RL alone, in
accuracy and readability; stages 3 and 4 keep improving and never fall below the base; the language-consistency
reward fixes language mixing at a small cost; cons@K over pass@1; the distilled student over the same student
trained by GRPO, Table 6), each PASS, FAIL or WITHIN NOISE as measured, and the per-stage curves (PNG) copied next
to it.

Pipeline `report:` keys: `eval_stage` (the eval stage's name, or several, comma-separated: their results are read
together, so each checkpoint can be evaluated by a stage of its own as soon as it exists), and the labels of the
checkpoints that play the roles in `r1moe.stages.REPORT_ROLES` (any of them may be absent: its claims are then NOT MEASURED).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from r1moe.atomic import write_text_atomic
from r1moe.stages import eval_stage_names
from r1moe.tracking import read_metrics

if TYPE_CHECKING:
    from r1moe.stages import PipelineConfig


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


def _se(m: dict[str, Any], key: str = "pass@1") -> float:
    """An upper bound on the standard error of a mean accuracy over N questions: sqrt(p(1-p)/N) (each question's
    K-sample mean varies at most as a Bernoulli of the same mean); 0 when N is unknown."""
    n, p = m.get("num_questions", 0), m[key]
    return (p * (1 - p) / n) ** 0.5 if n else 0.0


def _paired_se(a: dict[str, Any], b: dict[str, Any], key_a: str, key_b: str) -> float | None:
    """The standard error of mean(a[key_a]) - mean(b[key_b]) from the per-question differences, when both sides
    were scored question by question on the same questions (r1moe.metrics.per_question_scores, the eval stage's
    "per_question"): sd(d_q) / sqrt(N). The questions' shared difficulty cancels in d_q, which the unpaired bound
    counts twice. None when either side lacks those scores or the questions differ."""
    qa, qb = a.get("per_question"), b.get("per_question")
    if not (qa and qb and key_a in qa and key_b in qb and qa.get("id") == qb.get("id")):
        return None
    d = [x - y for x, y in zip(qa[key_a], qb[key_b], strict=True)]
    n = len(d)
    if n < 2:
        return None
    mean = sum(d) / n
    return (sum((x - mean) ** 2 for x in d) / (n - 1) / n) ** 0.5


def _compare(a: float, b: float, se: float) -> str:
    """"yes" when a - b > 2 se, "no" when a - b < -2 se, else "noise"; without a noise estimate (se 0: N unknown,
    or both at 0% or 100%) the sign decides, and equal values are "noise" (no difference to call)."""
    if se == 0:
        return "yes" if a > b else ("no" if a < b else "noise")
    return "yes" if a - b > 2 * se else ("no" if a - b < -2 * se else "noise")


Verdict = str
"""PASS, FAIL, WITHIN NOISE (the difference is under two standard errors, either way) or NOT MEASURED."""


def check_claims(results: dict[str, dict[str, Any]], roles: dict[str, str]) -> list[tuple[str, Verdict, str]]:
    """(claim, verdict, evidence). A claim PASSes or FAILs only when the difference behind it exceeds two standard
    errors (`_paired_se` when both sides were scored question by question on the same questions; else `_se` for
    either side's metric, the two combined in quadrature); closer calls are WITHIN NOISE: 100 questions cannot tell
    15.1% from 14.9%. A claim whose checkpoints were not evaluated is NOT MEASURED."""
    claims: list[tuple[str, Verdict, str]] = []
    word = {"yes": "PASS", "no": "FAIL", "noise": "WITHIN NOISE"}

    def get(role: str) -> dict[str, Any] | None:
        label = roles.get(role)
        return results.get(label) if label else None

    def diff(a: dict[str, Any], b: dict[str, Any], key: str, names: tuple[str, str]) -> tuple[str, str]:
        """(comparison, evidence) of a[key] vs b[key]: paired over the same questions when both were scored
        question by question (`_paired_se`), else the unpaired bound in quadrature."""
        paired = _paired_se(a, b, key, key)
        se = paired if paired is not None else (_se(a, key) ** 2 + _se(b, key) ** 2) ** 0.5
        evidence = f"{names[0]} {_fmt(a[key])} vs {names[1]} {_fmt(b[key])}"
        if se:
            evidence += (f"; difference {100 * (a[key] - b[key]):+.1f}, 2 SE = {200 * se:.1f}"
                         f"{' (paired)' if paired is not None else ''}")
        return _compare(a[key], b[key], se), evidence

    def pair(claim: str, a_role: str, b_role: str, names: tuple[str, str], key: str = "pass@1") -> None:
        a, b = get(a_role), get(b_role)
        if not (a and b and key in a and key in b):
            claims.append((claim, "NOT MEASURED", f"{a_role} or {b_role} not evaluated"))
            return
        verdict, evidence = diff(a, b, key, names)
        claims.append((claim, word[verdict], evidence))

    pair("RL on the base raises accuracy (R1-Zero, Fig. 2): R1-Zero pass@1 > base pass@1", "zero", "base",
         ("R1-Zero", "base"))
    pair("reasoning RL improves on its starting checkpoint: stage-2 pass@1 > stage-1 (cold start) pass@1",
         "stage2", "stage1", ("stage 2", "stage 1"))
    pair("cold start + RL beats RL alone at the same RL budget: stage-2 pass@1 >= R1-Zero pass@1", "stage2", "zero",
         ("stage 2", "R1-Zero"))
    pair("cold start + RL is more readable than RL alone: stage-2 language consistency > R1-Zero's", "stage2", "zero",
         ("stage 2", "R1-Zero"), key="language_consistency")
    pair("cold start + RL is better formatted than RL alone: stage-2 format rate > R1-Zero's", "stage2", "zero",
         ("stage 2", "R1-Zero"), key="format_rate")
    pair("rejection sampling + SFT keeps improving: stage-3 pass@1 >= stage-2 pass@1", "stage3", "stage2",
         ("stage 3", "stage 2"))
    pair("all-scenario RL keeps improving: stage-4 pass@1 >= stage-3 pass@1", "stage4", "stage3",
         ("stage 4", "stage 3"))
    base = get("base")
    stages = {f"stage {i}": get(f"stage{i}") for i in range(1, 5)}
    if base and all(stages.values()):
        verdicts = {name: diff(m, base, "pass@1", (name, "base")) for name, m in stages.items()}
        below = [n for n, (v, _) in verdicts.items() if v == "no"]
        close = [n for n, (v, _) in verdicts.items() if v == "noise"]
        claims.append(("no R1 stage falls below the base: stage-k pass@1 >= base pass@1 for k = 1..4",
                       "FAIL" if below else ("WITHIN NOISE" if close else "PASS"),
                       "; ".join(e for _, e in verdicts.values())))
    else:
        claims.append(("no R1 stage falls below the base", "NOT MEASURED", "base or an R1 stage not evaluated"))
    # the ablation: the same RL from a base that mixes languages, with and without the reward
    on, off = ("language_reward", "language_control") if "language_reward" in roles else ("zero_language", "zero")
    pair("the language-consistency reward fixes language mixing: RL with the language reward has higher language "
         "consistency than the same RL without it", on, off, ("with the reward", "without"), key="language_consistency")
    zl, z = get(on), get(off)
    if zl and z:
        verdict, evidence = diff(zl, z, "pass@1", ("with the reward", "without"))
        claims.append((("... at a small cost: pass@1 with the language reward not below the same RL's without it "
                        "beyond noise"), "FAIL" if verdict == "no" else "PASS", evidence))
    else:
        claims.append(("language reward at a small cost", "NOT MEASURED", f"{off} or {on} not evaluated"))
    def vote_se(m: dict[str, Any], ck: str) -> float:
        paired = _paired_se(m, m, ck, "pass@1")
        return paired if paired is not None else (2 ** 0.5) * _se(m)

    votes = {label: _compare(m[ck], m["pass@1"], vote_se(m, ck))
             for label, m in results.items() if (ck := _cons_key(m))}
    bad = [label for label, v in votes.items() if v == "no"]
    close = [label for label, v in votes.items() if v == "noise"]
    claims.append(("majority vote helps (Table 2): cons@K > pass@1 for every checkpoint",
                   "FAIL" if bad else ("WITHIN NOISE" if close else "PASS"),
                   f"cons@K below pass@1 beyond noise for {', '.join(bad)}" if bad else
                   (f"cons@K - pass@1 within noise for {', '.join(close)}" if close else
                    "cons@K above pass@1 beyond noise for all checkpoints")))
    pair("distillation beats RL on the small student at equal steps (Table 6)", "distilled", "student_rl",
         ("distilled", "RL"))
    return claims


def _curves(p: PipelineConfig, out: Path) -> list[str]:
    """Copy each training stage's PNG curves next to the report; returns markdown lines."""
    from r1moe.stages import stage_output

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


def read_eval_results(p: PipelineConfig) -> dict[str, dict[str, Any]]:
    """Every checkpoint's results from the eval stages of `eval_stage_names`; a label two stages share is an error."""
    results: dict[str, dict[str, Any]] = {}
    source: dict[str, str] = {}
    for name in eval_stage_names(p.report):
        path = Path(p.root) / name / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"report: {path} missing (run the {name!r} stage first)")
        for label, r in json.loads(path.read_text()).items():
            if label in results:
                raise ValueError(f"report: checkpoint label {label!r} is evaluated by both {source[label]!r} and "
                                 f"{name!r}; give each checkpoint one label")
            results[label], source[label] = r, name
    return results


def write_report(p: PipelineConfig, out: Path) -> dict[str, Any]:
    results = read_eval_results(p)
    claims = check_claims(results, p.report)
    timings_path = Path(p.root) / "pipeline_timings.json"
    lines = [f"# {p.name}: results", "",
             ("Every number below was measured by this pipeline run (r1moe eval: K samples per question, "
              "T=0.6, top-p 0.95; pass@1 = mean accuracy over the K samples; numbers in %)."), "",
             *results_table(results), "", "## The paper's claims, as measured", ""]
    for claim, verdict, evidence in claims:
        lines.append(f"- **{verdict}** — {claim} ({evidence})")
    lines += ["", ("A claim passes or fails only when its difference exceeds two standard errors; closer calls are "
                   "reported as within noise. Accuracies (pass@1, cons@K) of checkpoints evaluated on the same N "
                   "questions are compared question by question ('paired': SE = sd of the per-question differences / "
                   "sqrt(N)); other rates use the unpaired bound sqrt(p(1-p)/N) per side, in quadrature.")]
    lines += ["", "## Curves", "", *_curves(p, out)]
    if timings_path.is_file():
        lines += ["", "## Stage timings (seconds, this run)", "", "```", timings_path.read_text().strip(), "```"]
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "report.md", "\n".join(lines) + "\n")
    return {"report": str(out / "report.md"),
            "claims": {c: v for c, v, _ in claims}}

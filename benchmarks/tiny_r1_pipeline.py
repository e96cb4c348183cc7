"""CPU benchmark: the whole tiny DeepSeek-R1 pipeline (`make run` == `r1moe pipeline recipes/tiny/r1.yaml`), timed.

Runs every stage from scratch (forced) and writes benchmarks/results/tiny_r1_pipeline_cpu.json (wall clock, seconds
per stage, the eval stage's numbers per checkpoint) and copies the pipeline's report (claims checked against the
numbers) to benchmarks/results/tiny_r1_pipeline_cpu_report.md. Goal (issue): <= 15 minutes on 2 CPU cores. Not a test.

    python benchmarks/tiny_r1_pipeline.py [--recipe recipes/tiny/r1.yaml]
    python benchmarks/tiny_r1_pipeline.py --resume --timings earlier.json ...   # keep complete stages

--resume keeps the stages that are already complete (a run made in pieces); their seconds come from the
`--timings` files (pipeline_timings.json of the earlier invocations), and the wall clock is then the sum of the
stages' seconds, marked as such. When one earlier invocation ran every stage (`make run`, then
`--resume --timings runs/tiny-r1/pipeline_timings.json` copied before), its wall clock is when its last stage ended
(stages run at once with `jobs > 1`, so their seconds add up to more than the wall clock).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from r1moe.atomic import write_json_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from cpu_rollout_grpo import cpu_name

GOAL_S = 900
MAKE_RUN = "recipes/tiny/r1.yaml"


def main() -> int:
    from r1moe.stages import load_pipeline

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=MAKE_RUN)
    p.add_argument("--out", default="benchmarks/results/tiny_r1_pipeline_cpu.json")
    p.add_argument("--resume", action="store_true", help="keep complete stages (a run made in pieces)")
    p.add_argument("--timings", action="append", default=[], help="--resume: an earlier pipeline_timings.json")
    a = p.parse_args()
    pipe = load_pipeline(a.recipe)
    forced = [] if a.resume else [arg for s in pipe.stages for arg in ("--force", s.name)]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "r1moe.cli", "pipeline", a.recipe, *forced], check=True)
    wall = time.perf_counter() - t0
    root = Path(pipe.root)
    stages = json.loads((root / "pipeline_timings.json").read_text())
    for earlier in map(Path, a.timings):
        for name, t in json.loads(earlier.read_text()).items():
            if "seconds" in t and stages.get(name, {}).get("skipped"):
                stages[name] = t
    one_run = a.resume and len(a.timings) == 1 and all("ended_s" in t for t in stages.values())
    if one_run:
        wall = max(t["ended_s"] for t in stages.values())
    elif a.resume:
        wall = sum(t.get("seconds", 0.0) for t in stages.values())
    evals = [s.name for s in pipe.stages if s.kind == "eval"]
    reports = [s.name for s in pipe.stages if s.kind == "report"]
    result = {
        "benchmark": f"pipeline {pipe.name}" + (" (make run)" if a.recipe == MAKE_RUN else ""),
        "device": f"{cpu_name()}, 2-core CPU, shared with other jobs (no GPU)",
        "command": ("make run  ==  " if a.recipe == MAKE_RUN else "") + f"r1moe pipeline {a.recipe}",
        "wall_clock_s": round(wall, 1),
        "wall_clock": ("one run (--timings): the end of its last stage" if one_run
                       else "sum of the stages' seconds (run in pieces)" if a.resume else "one run, every stage forced"),
        "goal_s": GOAL_S,
        "goal_met": wall <= GOAL_S,
        "stage_seconds": stages,
        "eval": {label: r for name in evals  # every eval stage's checkpoints
                 for label, r in json.loads((root / name / "results.json").read_text()).items()},
    }
    out = Path(a.out)
    write_json_atomic(out, result)
    if reports:  # the report, its figures beside it in a folder named like the JSON without "_cpu"
        figures = out.with_name(out.stem.removesuffix("_cpu"))
        figures.mkdir(parents=True, exist_ok=True)
        report = (root / reports[-1] / "report.md").read_text()
        for png in sorted((root / reports[-1]).glob("*.png")):
            shutil.copyfile(png, figures / png.name)
            report = report.replace(f"]({png.name})", f"]({figures.name}/{png.name})")
        write_text_atomic(out.with_name(out.stem + "_report.md"), report)
    print(json.dumps({k: result[k] for k in ("wall_clock_s", "goal_met")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`r1moe pipeline RECIPE`: run a chain of stages in order, skipping those whose outputs are complete, so an
interrupted pipeline resumes where it stopped. Used for the tiny R1-Zero run (data -> pretrain -> GRPO) and the
whole DeepSeek-R1 recipe (§2.3: cold start -> reasoning RL -> rejection sampling + SFT -> all-scenario RL,
§2.4 distillation, evaluation of every checkpoint, report).

A pipeline recipe is data only:

    name: tiny-r1-zero
    root: runs/tiny-r1-zero           # data and stage outputs live under here
    stages:
      - {name: data, kind: data, make: [{what: prompts, task: arithmetic, n: 2000, seed: 0, out: train.jsonl}]}
      - {name: pretrain, kind: pretrain, recipe: recipes/tiny/r1_zero/pretrain.yaml}
      - {name: grpo, kind: grpo, recipe: recipes/tiny/r1_zero/grpo.yaml, overrides: [train.steps=60]}

A training stage is complete when its run directory (the recipe's logging.run_dir) holds DONE.json; a data,
rejection-sampling, eval or report stage when its output directory (root/<stage name>) does. Stages never overwrite a
complete previous output. The recipe's schema is r1moe/stages.py; each stage runs through its module's entry
(`r1moe.train.<kind>.run`, `r1moe.train.rejection.run_rejection_sampling`, `r1moe.train.eval.run_eval`,
`r1moe.report.write_report`), the function its own command (`r1moe <kind> RECIPE ...`) calls.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from r1moe.atomic import write_json_atomic
from r1moe.stages import DataSpec, PipelineConfig, StageSpec, load_pipeline, stage_output
from r1moe.train.rundir import DONE_FILE, is_complete


def run_stage(p: PipelineConfig, s: StageSpec, resume: bool = True) -> dict:
    out = stage_output(p, s)
    if s.kind in ("pretrain", "sft", "grpo", "rm"):
        import importlib

        from r1moe.config import load_config

        cfg = load_config(s.recipe, [*s.overrides, f"stage={s.kind}"])
        module = importlib.import_module(f"r1moe.train.{s.kind}")
        return module.run(cfg, resume=resume and (cfg.run_dir / "checkpoints").is_dir())
    out.mkdir(parents=True, exist_ok=True)
    if s.kind == "data":
        summary = {"files": [make_data(spec, out) for spec in s.make]}
    elif s.kind == "rejection":
        from r1moe.train.rejection import run_rejection_sampling

        if s.rejection is None:
            raise ValueError(f"stage {s.name!r}: kind rejection needs a `rejection:` section")
        summary = run_rejection_sampling(s.rejection, out)
    elif s.kind == "eval":
        from r1moe.train.eval import run_eval

        if s.eval is None or not s.eval.checkpoints:
            raise ValueError(f"stage {s.name!r}: kind eval needs `eval.checkpoints`")
        summary = run_eval(s.eval, out)
    else:
        from r1moe.report import write_report

        summary = write_report(p, out)
    write_json_atomic(out / DONE_FILE, {"stage": s.name, **summary})
    return summary


def make_data(spec: DataSpec, out_dir: Path) -> str:
    from r1moe.data import make_cold_start, make_dataset, make_general, make_preference_pairs, write_jsonl
    from r1moe.data.corpus import make_corpus

    path = out_dir / spec.out
    if spec.what == "prompts":
        n_general = round(spec.n * spec.general_fraction)
        records = make_dataset(spec.task, spec.n - n_general, seed=spec.seed, difficulty=spec.difficulty)
        if n_general:
            records += make_general(n_general, spec.seed)
            random.Random(spec.seed).shuffle(records)
    elif spec.what == "corpus":
        records = make_corpus(spec.task, spec.n, spec.seeds, slip_rate=spec.slip_rate,
                              untagged_rate=spec.untagged_rate, difficulty=spec.difficulty,
                              template_rate=spec.template_rate, drill_rate=spec.drill_rate,
                              direct_rate=spec.direct_rate, french_rate=spec.french_rate)
    elif spec.what == "cold_start":
        records = make_cold_start(make_dataset(spec.task, spec.n, seed=spec.seed, difficulty=spec.difficulty),
                                  template=spec.template)
    elif spec.what == "general":
        records = make_general(spec.n, spec.seed)
    elif spec.what == "general_sft":
        records = general_sft(make_general(spec.n, spec.seed), spec.template)
    else:
        records = make_preference_pairs(spec.n, spec.seed, template=spec.template)
    write_jsonl(path, records)
    return str(path)


def general_sft(samples, template: str):
    """Non-reasoning SFT records: no chain of thought for trivial queries (R1 v2 B.3.3), i.e. an empty think block,
    written as the text that follows render(template, prompt)."""
    from r1moe.data import SFTSample
    from r1moe.templates import completion_prefix, format_completion

    prefix = completion_prefix(template) if template != "none" else ""
    out = []
    for s in samples:
        full = format_completion("", s.answer)
        out.append(SFTSample(prompt=s.prompt, response=full.removeprefix(prefix),
                             id=s.id, kind="general", language=s.language, meta={"template": template}))
    return out


def run_pipeline(p: PipelineConfig, force: set[str] = frozenset()) -> dict[str, dict]:
    timings: dict[str, dict] = {}
    root = Path(p.root)
    root.mkdir(parents=True, exist_ok=True)
    for s in p.stages:
        out = stage_output(p, s)
        if is_complete(out) and s.name not in force:
            print(f"[pipeline] {s.name}: complete ({out}/{DONE_FILE}), skipped", flush=True)
            timings[s.name] = {"skipped": True}
            continue
        forced = s.name in force and is_complete(out)
        if forced:  # an explicit re-run: the old output stops counting as complete and is rebuilt from scratch
            (out / DONE_FILE).unlink()
        print(f"[pipeline] {s.name} ({s.kind}) -> {out}", flush=True)
        t0 = time.perf_counter()
        run_stage(p, s, resume=not forced)
        timings[s.name] = {"seconds": round(time.perf_counter() - t0, 1)}
        print(f"[pipeline] {s.name}: done in {timings[s.name]['seconds']} s", flush=True)
        write_json_atomic(root / "pipeline_timings.json", timings)  # after each stage: the report reads it
    write_json_atomic(root / "pipeline_timings.json", timings)
    return timings


def main(argv: list[str] | None = None) -> int:
    from r1moe.cli import run_cli

    return run_cli("r1moe pipeline", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(prog="r1moe pipeline", description="Run a pipeline recipe, resuming where it stopped.")
    ap.add_argument("recipe")
    ap.add_argument("--force", action="append", default=[], help="re-run this stage even if complete (repeatable)")
    a = ap.parse_args(argv)
    p = load_pipeline(a.recipe)
    unknown = set(a.force) - {s.name for s in p.stages}
    if unknown:
        raise ValueError(f"--force: no stage named {sorted(unknown)} in {a.recipe}")
    timings = run_pipeline(p, set(a.force))
    print(json.dumps(timings))
    return 0


if __name__ == "__main__":
    sys.exit(main())

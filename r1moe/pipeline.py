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

With `jobs: N` (or `--jobs N`) independent stages run at the same time, each in a process of its own: a stage
depends on the earlier stages whose output directories hold a path its spec names (a training stage: its resolved
recipe; a report: every earlier stage), and starts once they are complete.

A training stage is complete when its run directory (the recipe's logging.run_dir) holds DONE.json; a data,
rejection-sampling, eval or report stage when its output directory (root/<stage name>) does. Stages never overwrite a
complete previous output. The recipe's schema is r1moe/stages.py; each stage runs through its module's entry
(`r1moe.train.<kind>.run`, `r1moe.train.rejection.run_rejection_sampling`, `r1moe.train.eval.run_eval`,
`r1moe.report.write_report`), the function its own command (`r1moe <kind> RECIPE ...`) calls.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import subprocess
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

        cfg = load_config(s.recipe, s.overrides, stage=s.kind)
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
    elif spec.what == "tokenizer":
        from r1moe.data.tokenizer import save_tokenizer
        from r1moe.train.pretrain import read_corpus, tiny_tokenizer_for

        corpus = out_dir / spec.corpus
        if not corpus.is_file():
            raise FileNotFoundError(f"data entry {spec.out!r} (tokenizer): corpus={spec.corpus!r} is not a file of "
                                    f"{out_dir} (name an earlier entry's out)")
        save_tokenizer(tiny_tokenizer_for(read_corpus(corpus, spec.template), spec.vocab_size), path)
        return str(path)
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


def _timing(start: float, t0: float) -> dict[str, float]:
    """A stage's seconds, and when it started and ended in seconds since the pipeline did. The ends are rounded on
    their own (not started + seconds), so a stage that starts after another ended never reads as starting before."""
    t1 = time.perf_counter()
    return {"seconds": round(t1 - t0, 1), "started_s": round(t0 - start, 2), "ended_s": round(t1 - start, 2)}


def run_pipeline(p: PipelineConfig, force: set[str] = frozenset(), recipe: str | Path | None = None) -> dict[str, dict]:
    """Run the stages that are not complete (and those in `force`); `recipe` (the file `p` was loaded from) is what
    the stage processes of `p.jobs > 1` read. Returns (and writes to root/pipeline_timings.json after each stage)
    each stage's seconds and when it started and ended, in seconds since the pipeline did."""
    timings: dict[str, dict] = {}
    root = Path(p.root)
    root.mkdir(parents=True, exist_ok=True)
    todo = []
    for s in p.stages:
        out = stage_output(p, s)
        if is_complete(out) and s.name not in force:
            print(f"[pipeline] {s.name}: complete ({out}/{DONE_FILE}), skipped", flush=True)
            timings[s.name] = {"skipped": True}
            continue
        todo.append(s)
    if p.jobs > 1 and todo:
        if recipe is None:
            raise ValueError("jobs > 1 runs each stage in its own process from the recipe file: pass `recipe`")
        _run_concurrently(p, todo, force, Path(recipe), timings)
        return timings
    start = time.perf_counter()
    for s in todo:
        out = stage_output(p, s)
        forced = _clear_forced(p, s, force)
        print(f"[pipeline] {s.name} ({s.kind}) -> {out}", flush=True)
        t0 = time.perf_counter()
        run_stage(p, s, resume=not forced)
        timings[s.name] = _timing(start, t0)
        print(f"[pipeline] {s.name}: done in {timings[s.name]['seconds']} s", flush=True)
        write_json_atomic(root / "pipeline_timings.json", timings)  # after each stage: the report reads it
    write_json_atomic(root / "pipeline_timings.json", timings)
    return timings


def _clear_forced(p: PipelineConfig, s: StageSpec, force: set[str]) -> bool:
    """An explicit re-run: the old output stops counting as complete and is rebuilt from scratch."""
    out = stage_output(p, s)
    forced = s.name in force and is_complete(out)
    if forced:
        (out / DONE_FILE).unlink()
    return forced


def stage_dependencies(p: PipelineConfig) -> dict[str, set[str]]:
    """For each stage, the earlier stages it reads from: those whose output directory holds a path that its spec
    names (for a training stage, any path of its resolved recipe: model.init, data.train, a reward model, ...).
    A report depends on every earlier stage."""
    outs = {s.name: stage_output(p, s).resolve() for s in p.stages}
    deps: dict[str, set[str]] = {}
    for i, s in enumerate(p.stages):
        earlier = p.stages[:i]
        if s.kind == "report":
            deps[s.name] = {e.name for e in earlier}
            continue
        paths = [Path(v).resolve() for v in _strings(_spec_of(s))]
        deps[s.name] = {e.name for e in earlier
                        if any(path == outs[e.name] or outs[e.name] in path.parents for path in paths)}
    return deps


def _spec_of(s: StageSpec):
    if s.kind in ("pretrain", "sft", "grpo", "rm"):
        from r1moe.config import load_config

        return load_config(s.recipe, s.overrides, stage=s.kind)
    return {"data": [], "rejection": s.rejection, "eval": s.eval}.get(s.kind)


def _strings(obj) -> list[str]:
    """Every non-empty string in a tree of dataclasses, dicts and lists."""
    if isinstance(obj, str):
        return [obj] if obj else []
    if dataclasses.is_dataclass(obj):
        return [v for f in dataclasses.fields(obj) for v in _strings(getattr(obj, f.name))]
    if isinstance(obj, dict):
        return [v for x in obj.values() for v in _strings(x)]
    if isinstance(obj, list | tuple):
        return [v for x in obj for v in _strings(x)]
    return []


class StageFailed(RuntimeError):
    def __init__(self, name: str, status: int, log: Path):
        super().__init__(f"stage {name!r} failed (exit status {status}); its log: {log}")
        self.status = status


def _run_concurrently(p: PipelineConfig, todo: list[StageSpec], force: set[str], recipe: Path,
                      timings: dict[str, dict]) -> None:
    """Each stage of `todo` in a process of its own (`r1moe pipeline RECIPE --stage NAME`), in recipe order as its
    dependencies complete, at most p.jobs at a time. After a failure no stage starts; the running ones finish."""
    root = Path(p.root)
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    deps = stage_dependencies(p)
    pending = list(todo)
    done = {s.name for s in p.stages} - {s.name for s in todo}
    running: dict[str, tuple[subprocess.Popen, float, Path]] = {}
    failed: StageFailed | None = None
    start = time.perf_counter()
    while running or (pending and failed is None):
        for s in [s for s in pending if deps[s.name] <= done] if failed is None else []:
            if len(running) >= p.jobs:
                break
            forced = _clear_forced(p, s, force)
            log = logs / f"{s.name}.log"
            cmd = [sys.executable, "-m", "r1moe.pipeline", str(recipe), "--stage", s.name, "--jobs", str(p.jobs)]
            with open(log, "w", encoding="utf-8") as f:  # the child holds its own descriptor
                proc = subprocess.Popen([*cmd, *(["--fresh"] if forced else [])], stdout=f, stderr=subprocess.STDOUT)
            running[s.name] = (proc, time.perf_counter(), log)
            pending.remove(s)
            print(f"[pipeline] {s.name} ({s.kind}) -> {stage_output(p, s)} (log: {log})", flush=True)
        if not running:
            waiting = {s.name: sorted(deps[s.name] - done) for s in pending}
            raise ValueError(f"stages wait on stages that never run: {waiting}")
        time.sleep(0.2)
        for name, (proc, t0, log) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            if proc.returncode != 0:
                failed = failed or StageFailed(name, proc.returncode, log)
                tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-20:]
                print(f"[pipeline] {name}: failed (exit status {proc.returncode}); the end of {log}:", file=sys.stderr)
                print("\n".join(tail), file=sys.stderr, flush=True)
                continue
            done.add(name)
            timings[name] = _timing(start, t0)
            print(f"[pipeline] {name}: done in {timings[name]['seconds']} s", flush=True)
            write_json_atomic(root / "pipeline_timings.json", timings)
    if failed is not None:
        raise failed
    write_json_atomic(root / "pipeline_timings.json", timings)


def main(argv: list[str] | None = None) -> int:
    from r1moe.cli import run_cli

    return run_cli("r1moe pipeline", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(prog="r1moe pipeline", description="Run a pipeline recipe, resuming where it stopped.")
    ap.add_argument("recipe")
    ap.add_argument("--force", action="append", default=[], help="re-run this stage even if complete (repeatable)")
    ap.add_argument("--jobs", type=int, default=None, help="stages run at once (default: the recipe's jobs)")
    ap.add_argument("--stage", help=argparse.SUPPRESS)  # one stage, in this process (a process of --jobs N)
    ap.add_argument("--fresh", action="store_true", help=argparse.SUPPRESS)  # with --stage: a forced re-run
    a = ap.parse_args(argv)
    p = load_pipeline(a.recipe)
    if a.jobs is not None:
        p = dataclasses.replace(p, jobs=a.jobs)  # validated as the recipe's key is
    if a.stage is not None:
        stage = next((s for s in p.stages if s.name == a.stage), None)
        if stage is None:
            raise ValueError(f"--stage: no stage named {a.stage!r} in {a.recipe}")
        if p.jobs > 1:  # one of N stages at once: its share of the cores (a training recipe's train.threads wins)
            import torch

            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // p.jobs))
        run_stage(p, stage, resume=not a.fresh)
        return 0
    unknown = set(a.force) - {s.name for s in p.stages}
    if unknown:
        raise ValueError(f"--force: no stage named {sorted(unknown)} in {a.recipe}")
    try:
        timings = run_pipeline(p, set(a.force), recipe=a.recipe)
    except StageFailed as e:
        print(f"r1moe pipeline: error: {e}", file=sys.stderr)
        return e.status
    print(json.dumps(timings))
    return 0


if __name__ == "__main__":
    sys.exit(main())

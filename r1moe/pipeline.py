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

A training stage is complete when its run directory (the recipe's logging.run_dir) holds DONE.json; a data or
rejection-sampling stage when its output directory does. Stages never overwrite a complete previous output.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from r1moe.config import SGLangSection
from r1moe.train.common import DONE_FILE, is_complete, write_json_atomic

StageKind = Literal["data", "pretrain", "sft", "grpo", "rm", "rejection", "eval", "report"]


@dataclass
class DataSpec:
    what: Literal["prompts", "corpus", "cold_start", "general", "general_sft", "pairs"] = "prompts"
    task: str = "arithmetic"
    n: int = 100
    seed: int = 0
    seeds: list[int] = field(default_factory=lambda: [2, 3, 4, 5, 6, 7])
    """Splits the pretraining corpus draws from (disjoint from the RL seed 0 and the eval seed 1)."""
    out: str = "data.jsonl"
    """File name inside the stage's output directory (root/<stage name>/)."""
    difficulty: int = 1
    slip_rate: float = 0.3
    untagged_rate: float = 0.1
    template_rate: float = 0.3
    drill_rate: float = 0.0
    """corpus: fraction of drill records (correct arithmetic steps, one per line; see r1moe/data/corpus.py)."""
    direct_rate: float = 0.0
    """corpus: fraction of solutions that state the answer without working (see r1moe/data/corpus.py)."""
    french_rate: float = 0.0
    """corpus: probability that a line of a solution is in French (language mixing; see r1moe/data/corpus.py)."""
    general_fraction: float = 0.0
    """prompts: this fraction of the n prompts are general (non-reasoning) ones, for all-scenario RL."""
    template: str = "chat"
    """cold_start / general_sft / pairs: the template the responses follow."""


@dataclass
class RejectionSpec:
    """Rejection sampling (R1 §2.3.3): N samples per prompt from `checkpoint`, keep correct + readable ones, mix
    with non-reasoning data at `reasoning_ratio`, deduplicate, write JSONL with provenance."""

    checkpoint: str = ""
    prompts: str = ""
    samples_per_prompt: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    template: str = "r1_zero"
    general: str | None = None
    """Non-reasoning SFT records (prompt, response) mixed in."""
    reasoning_ratio: float = 0.75
    """Fraction of reasoning records in the mix (paper: ~600k : ~200k = 0.75)."""
    max_tokens: int = 0
    """Overlong filter: drop responses longer than this many tokens; 0 = only those cut off at max_new_tokens."""
    max_repeat: int = 3
    """Repetition filter: drop responses with a line repeated more than this many times."""
    language: str = "en"
    min_language_consistency: float = 0.99
    max_paragraph_words: int = 300
    """Long-paragraph filter: drop a chain of thought with a paragraph (text between blank lines) of more than this
    many words (a CJK ideograph is one word). The paper names the filter, not a length; 300 is chosen."""
    max_code_blocks: int = 0
    """Code-block filter: drop a chain of thought with more than this many fenced (``` or ~~~) code blocks; 0 drops
    any. Only the chain of thought is checked: a code answer in <answer> is what code prompts ask for."""
    stop: list[str] = field(default_factory=lambda: ["</answer>"])
    seed: int = 0
    engine: Literal["builtin", "sglang"] = "builtin"
    """builtin: one device; sglang: SGLang over `sglang.tp` x `sglang.dp` GPUs of this node."""
    sglang: SGLangSection = field(default_factory=SGLangSection)
    """Only with engine: sglang (set colocate: false: nothing trains next to it)."""


@dataclass
class EvalSpec:
    checkpoints: dict[str, str] = field(default_factory=dict)
    """Label -> HF checkpoint directory."""
    data: str = ""
    samples: int = 8
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 128
    template: str = "r1_zero"
    templates: dict[str, str] = field(default_factory=dict)
    """Per-label template overrides (e.g. R1-Zero checkpoints use r1_zero, R1 stages use chat)."""
    engine: Literal["builtin", "sglang"] = "builtin"
    """builtin: one device; sglang: SGLang over `sglang.tp` x `sglang.dp` GPUs of this node."""
    sglang: SGLangSection = field(default_factory=SGLangSection)
    """Only with engine: sglang (set colocate: false: nothing trains next to it)."""


@dataclass
class StageSpec:
    name: str = ""
    kind: StageKind = "data"
    recipe: str | None = None
    overrides: list[str] = field(default_factory=list)
    make: list[DataSpec] = field(default_factory=list)
    rejection: RejectionSpec | None = None
    eval: EvalSpec | None = None


@dataclass
class PipelineConfig:
    name: str = "pipeline"
    root: str = "runs/pipeline"
    stages: list[StageSpec] = field(default_factory=list)
    report: dict[str, str] = field(default_factory=dict)
    """Free-form settings for the report stage (see r1moe/report.py)."""


def load_pipeline(path: str | Path) -> PipelineConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pipeline recipe not found: {path}")
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PipelineConfig), OmegaConf.load(path)))
    except OmegaConfBaseException as e:
        raise ValueError(f"{path}: bad key {getattr(e, 'full_key', None)!r}: {str(e).splitlines()[0]}") from None
    names = [s.name for s in cfg.stages]
    if len(set(names)) != len(names) or "" in names:
        raise ValueError(f"{path}: stage names must be unique and non-empty, got {names}")
    for s in cfg.stages:
        if s.kind in ("pretrain", "sft", "grpo", "rm") and not s.recipe:
            raise ValueError(f"{path}: stage {s.name!r} ({s.kind}) needs a recipe")
    return cfg


def stage_output(p: PipelineConfig, s: StageSpec) -> Path:
    if s.kind in ("pretrain", "sft", "grpo", "rm"):
        from r1moe.config import load_config

        return load_config(s.recipe, s.overrides).run_dir
    return Path(p.root) / s.name


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
        from r1moe.rejection import run_rejection_sampling

        if s.rejection is None:
            raise ValueError(f"stage {s.name!r}: kind rejection needs a `rejection:` section")
        summary = run_rejection_sampling(s.rejection, out)
    elif s.kind == "eval":
        summary = run_eval_stage(s, out)
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
        out.append(SFTSample(prompt=s.prompt, response=full[len(prefix):] if full.startswith(prefix) else full,
                             id=s.id, kind="general", language=s.language, meta={"template": template}))
    return out


def run_eval_stage(s: StageSpec, out: Path) -> dict:
    from r1moe.evaluate import EvalSettings, evaluate_checkpoint

    e = s.eval
    if e is None or not e.checkpoints:
        raise ValueError(f"stage {s.name!r}: kind eval needs `eval.checkpoints`")
    results = {}
    for label, ckpt in e.checkpoints.items():
        settings = EvalSettings(samples=e.samples, temperature=e.temperature, top_p=e.top_p,
                                max_new_tokens=e.max_new_tokens, template=e.templates.get(label, e.template))
        results[label] = evaluate_checkpoint(ckpt, e.data, settings, engine=e.engine, sglang=e.sglang)
        print(f"  eval {label}: pass@1={results[label]['pass@1']:.3f}", flush=True)
    write_json_atomic(out / "results.json", results)
    return {"results": str(out / "results.json")}


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
    from r1moe.train.common import run_cli

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

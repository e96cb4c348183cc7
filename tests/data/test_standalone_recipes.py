"""Each tiny stage recipe runs by itself: its header lists the `r1moe data make` commands that write its inputs. They
must write what the pipeline's data stage writes for the same file (same settings, and for a small n the same
records), and slurm/README.md's tiny chain uses the same commands."""

import dataclasses
import shlex
from pathlib import Path

import pytest

from r1moe.data.make import _parser, data_make_main
from r1moe.data.tasks import TASKS
from r1moe.pipeline import make_data
from r1moe.stages import DataSpec, load_pipeline

ROOT = Path(__file__).resolve().parents[2]
PIPELINES = {"runs/tiny-r1/data": ROOT / "recipes/tiny/r1.yaml",
             "runs/tiny-r1-zero/data": ROOT / "recipes/tiny/r1_zero.yaml",
             "runs/tiny-r1-bilingual/data": ROOT / "recipes/tiny/r1_bilingual.yaml"}
RELEVANT = {  # the DataSpec fields each kind of record depends on
    "prompts": ["task", "n", "seed", "difficulty", "general_fraction"],
    "corpus": ["task", "n", "seeds", "difficulty", "slip_rate", "untagged_rate", "template_rate", "drill_rate",
               "direct_rate", "french_rate"],
    "cold_start": ["task", "n", "seed", "difficulty", "template"],
    "pairs": ["n", "seed", "template"],
}


def documented_commands() -> list[tuple[Path, list[str]]]:
    found = []
    for path in [*sorted((ROOT / "recipes/tiny").rglob("*.yaml")), ROOT / "slurm/README.md"]:
        for line in path.read_text().splitlines():
            line = line.lstrip("#").strip()
            if line.startswith("r1moe data make "):
                found.append((path, shlex.split(line)[3:]))
    return found


def as_spec(args: list[str]) -> DataSpec:
    """The pipeline DataSpec that `r1moe data make ARGS` corresponds to."""
    a = _parser().parse_args(args)
    rates = {r: getattr(a, r) for r in ("slip_rate", "untagged_rate", "template_rate", "drill_rate", "direct_rate",
                                          "french_rate")
             if getattr(a, r) is not None}
    what = "prompts" if a.task in TASKS else a.task
    return DataSpec(what=what, task=a.task if what == "prompts" else (a.source or "arithmetic"), n=a.n,
                    seed=a.seed or 0, seeds=a.seeds or [2, 3, 4, 5, 6, 7], out=Path(a.out).name,
                    difficulty=a.difficulty or 1, template=a.template or "r1_zero", **rates)


STANDALONE = {"rm_safety.yaml"}
"""Recipes the pipelines do not run (their inputs come from no pipeline data stage): their commands must run."""


def pipeline_spec(out: str) -> DataSpec:
    pipe = load_pipeline(PIPELINES[str(Path(out).parent)])
    specs = [m for s in pipe.stages for m in s.make if m.out == Path(out).name]
    assert len(specs) == 1, out
    return specs[0]


COMMANDS = documented_commands()


def test_recipes_and_the_slurm_readme_document_their_inputs():
    documented = {p.relative_to(ROOT).as_posix() for p, _ in COMMANDS}
    for name in ["r1/base.yaml", "r1/stage1_cold_start.yaml", "r1/stage2.yaml", "r1/rm.yaml",
                 "r1/student_base.yaml", "r1/student_grpo.yaml", "r1_zero/pretrain.yaml", "r1_zero/grpo.yaml"]:
        assert f"recipes/tiny/{name}" in documented
    assert "slurm/README.md" in documented


@pytest.mark.parametrize("path, args", COMMANDS, ids=[f"{p.name}:{a[0]}:{Path(a[-1]).name}" for p, a in COMMANDS])
def test_documented_command_matches_the_pipeline(path, args, tmp_path):
    if path.name in STANDALONE:  # no pipeline spec to match: the command itself must work
        out = tmp_path / "out.jsonl"
        small = [*args[:args.index("--n") + 1], "4", *args[args.index("--n") + 2:args.index("--out")], "--out", str(out)]
        assert data_make_main(small) == 0 and len(out.read_text().splitlines()) == 4
        return
    mine, theirs = as_spec(args), pipeline_spec(args[args.index("--out") + 1])
    assert mine.what == theirs.what
    for field in RELEVANT[mine.what]:
        assert getattr(mine, field) == getattr(theirs, field), f"{path.name}: {field}"


@pytest.mark.parametrize("spec", [
    DataSpec(what="prompts", task="digits", n=12, seed=1),
    DataSpec(what="corpus", task="digits", n=30, slip_rate=0.0, untagged_rate=0.6, template_rate=0.15),
    DataSpec(what="corpus", task="digits", n=30, slip_rate=0.0, untagged_rate=0.1, template_rate=0.15,
             direct_rate=0.5, french_rate=0.25),
    DataSpec(what="cold_start", task="digits", n=5, seed=0, template="chat"),
    DataSpec(what="pairs", n=4, seed=3, template="chat"),
], ids=lambda s: s.what)
def test_data_make_writes_the_pipelines_records(tmp_path, spec):
    pipeline_file = make_data(spec, tmp_path / "pipeline")
    kind = spec.task if spec.what == "prompts" else spec.what
    args = [kind, "--n", str(spec.n), "--out", str(tmp_path / "cli.jsonl")]
    if spec.what != "corpus":
        args += ["--seed", str(spec.seed)]
    if spec.what in ("corpus", "cold_start"):
        args += ["--task", spec.task]
    if spec.what in ("cold_start", "pairs"):
        args += ["--template", spec.template]
    if spec.what == "corpus":
        defaults = DataSpec()
        args += [f"--{f.name.replace('_', '-')}={getattr(spec, f.name)}" for f in dataclasses.fields(spec)
                 if f.name.endswith("_rate") and getattr(spec, f.name) != getattr(defaults, f.name)]
    assert data_make_main(args) == 0
    assert (tmp_path / "cli.jsonl").read_text() == Path(pipeline_file).read_text()

"""The `r1moe` command line.

    r1moe pretrain RECIPE [key=value ...] [--resume]     next-token pretraining (+ MTP, expert-bias update)
    r1moe sft      RECIPE [key=value ...] [--resume]     SFT: cold start, rejection-sampled data, distillation
    r1moe grpo     RECIPE [key=value ...] [--resume]     GRPO (R1-Zero, reasoning RL, all-scenario RL)
    r1moe rm       RECIPE [key=value ...]                Bradley-Terry reward model
    r1moe rejection RECIPE [key=value ...] --out DIR     rejection sampling -> SFT data (R1 stage 3)
    r1moe eval     --checkpoint DIR --data FILE ...      pass@1 / pass@k / cons@K of one checkpoint
    r1moe eval     RECIPE [key=value ...] --out DIR      the eval stage: several checkpoints, results.json
    r1moe pipeline RECIPE [--force STAGE] [--jobs N]     the whole DeepSeek-R1 pipeline, resumable
    r1moe data make TASK --n N --seed S --out FILE       procedural datasets and pretraining corpora
    r1moe model info PRESET [--json]                     analytic parameter counts
    r1moe --version

Errors in inputs (recipes, data, checkpoints) print one clear line and exit with status 2.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from r1moe.config import JobConfig

STAGES = {
    "pretrain": "r1moe.train.pretrain",
    "sft": "r1moe.train.sft",
    "grpo": "r1moe.train.grpo",
    "rm": "r1moe.train.rm",
    "rejection": "r1moe.train.rejection",
    "eval": "r1moe.evaluate",
    "pipeline": "r1moe.pipeline",
}


# ---------------------------------------------------------------------------------------------- entry points
# Shared by every command: the stage modules' `main`, `r1moe eval`, `r1moe pipeline`, `r1moe model info`.
INPUT_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError)


def run_cli(prog: str, fn: Callable[[], int]) -> int:
    """Run an entry point: bad input (recipe, data, checkpoint, run directory) prints one line naming it and
    returns 2; training that turned NaN/inf (NonFiniteError: nothing non-finite was saved) prints one line and
    returns 1."""
    from r1moe.train.guard import NonFiniteError
    from r1moe.train.rundir import is_main_process

    try:
        return fn()
    except INPUT_ERRORS as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"{prog}: error: {msg}", file=sys.stderr)
        # under torchrun (slurm/common.sh) the job's status would be torchrun's 1; the launcher reads this one
        if (status_file := os.environ.get("R1MOE_STATUS_FILE")) and is_main_process():
            Path(status_file).write_text("2\n")
        return 2
    except NonFiniteError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1


def stage_main(stage: str, run: Callable[[JobConfig, bool], Any], argv: list[str] | None) -> int:
    """`main` of a stage module: parse RECIPE + overrides, run, map input errors to exit status 2."""
    from r1moe.train.rundir import release_run_lock

    def go() -> int:
        cfg, resume = parse_stage_args(argv, stage)
        try:
            run(cfg, resume)
        finally:  # a run that failed lets go of its directory at once, not only when the process ends
            release_run_lock(cfg.run_dir)
        return 0

    return run_cli(f"r1moe {stage}", go)


def spec_main(stage: str, spec_type: type, run: Callable[[Any, Path], dict], argv: list[str] | None) -> int:
    """`main` of a stage whose recipe is one spec of r1moe.stages (rejection, eval), not a training run:
    `r1moe STAGE RECIPE [key=value ...] --out DIR` runs `run(spec, DIR)` and writes DIR/DONE.json, as the pipeline
    does; a DIR that is already complete is refused."""

    def go() -> int:
        import argparse

        from r1moe.atomic import write_json_atomic
        from r1moe.stages import load_spec
        from r1moe.train.rundir import DONE_FILE, is_complete

        p = argparse.ArgumentParser(prog=f"r1moe {stage}", description=f"Run the {stage} stage from a recipe.")
        p.add_argument("recipe", help=f"YAML with the keys of r1moe.stages.{spec_type.__name__}")
        p.add_argument("overrides", nargs="*", help="key=value overrides of the recipe's keys")
        p.add_argument("--out", required=True, help="output directory (DONE.json is written last)")
        args = p.parse_args(argv)
        bad = [o for o in args.overrides if "=" not in o]
        if bad:
            p.error(f"overrides must look like key=value: {bad}")
        spec = load_spec(spec_type, args.recipe, args.overrides)
        out = Path(args.out)
        if is_complete(out):
            raise FileExistsError(f"--out {out} already holds a complete {stage} run ({DONE_FILE}); choose another "
                                  f"directory or delete it")
        out.mkdir(parents=True, exist_ok=True)
        summary = run(spec, out)
        if summary.get("complete", True):  # a rejection worker whose shards wait for others is not done yet
            write_json_atomic(out / DONE_FILE, {"stage": stage, **summary})
        return 0

    return run_cli(f"r1moe {stage}", go)


def parse_stage_args(argv: list[str] | None, stage: str) -> tuple[JobConfig, bool]:
    """`r1moe STAGE RECIPE [key=value ...] [--resume]` -> (config, resume)."""
    import argparse

    from r1moe.config import load_config

    p = argparse.ArgumentParser(prog=f"r1moe {stage}", description=f"Run the {stage} stage from a recipe.")
    p.add_argument("recipe", help="recipe YAML (recipes/...)")
    p.add_argument("overrides", nargs="*",
                   help="key=value config overrides, e.g. optim.lr=1e-4 logging.run_dir=runs/try1; the run's length "
                        "is train.steps or train.epochs, never both (train.epochs=null train.steps=5 on a recipe "
                        "that sets epochs)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    p.add_argument("--allow-config-change", metavar="KEYS", default="",
                   help="comma-separated config keys (or sections) that --resume may find changed, e.g. "
                        "train.steps,logging.wandb; any other difference stops the resume")
    args = p.parse_intermixed_args(argv)  # overrides after a flag too: `r1moe sft R --resume k=v`
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        p.error(f"overrides must look like key=value: {bad}")
    extra = []
    if args.allow_config_change:
        keys = [k.strip() for k in args.allow_config_change.split(",") if k.strip()]
        extra.append(f"checkpoint.allow_config_change=[{','.join(keys)}]")
    cfg = load_config(args.recipe, [*args.overrides, *extra], stage=stage)
    if args.allow_config_change and not (args.resume or cfg.checkpoint.resume):
        p.error("--allow-config-change applies to --resume only (it names what a resumed run may find changed)")
    return cfg, args.resume or cfg.checkpoint.resume


def model_info(argv: list[str]) -> int:
    import argparse

    from r1moe.model import PRESETS, count_params, get_preset

    p = argparse.ArgumentParser(prog="r1moe model info", description="Parameter counts computed from the config.")
    p.add_argument("preset", help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("--json", action="store_true")
    try:
        a = p.parse_args(argv)
    except SystemExit as e:  # --help (0) and usage errors (2): a status, as for every command
        return int(e.code or 0)
    cfg = get_preset(a.preset)
    counts = count_params(cfg)
    info = {"preset": a.preset, "architecture": cfg.architecture, **counts}
    if a.json:
        print(json.dumps(info))
    else:
        for k, v in info.items():
            print(f"{k:>18}: {v:,}" if isinstance(v, int) else f"{k:>18}: {v}")
    return 0


def _usage() -> str:
    return __doc__.split("\n\n")[1]


GROUPS = {"data": ["make"], "model": ["info"]}
"""Commands with subcommands: `r1moe data make ...`, `r1moe model info ...`."""


def _group_usage(group: str) -> str:
    lines = [line for line in _usage().splitlines() if line.split()[1:2] == [group]]
    return "usage:\n" + "\n".join(lines) + f"\n\n`r1moe {group} SUBCOMMAND --help` describes each one."


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        from r1moe import __version__

        print(f"r1moe {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd in GROUPS and (not rest or rest[0] in ("-h", "--help")):
        print(_group_usage(cmd), file=sys.stdout if rest else sys.stderr)
        return 0 if rest else 2
    if cmd == "model" and rest[:1] == ["info"]:
        return run_cli("r1moe model info", lambda: model_info(rest[1:]))
    if cmd == "data" and rest[:1] == ["make"]:
        from r1moe.data.make import data_make_main

        return data_make_main(rest[1:])
    if cmd == "eval" and rest and not rest[0].startswith("-"):  # a RECIPE, not --checkpoint ...: the eval stage
        return importlib.import_module("r1moe.train.eval").main(rest)
    if cmd in STAGES:
        return importlib.import_module(STAGES[cmd]).main(rest)
    print(f"r1moe: unknown command {' '.join(argv[:2])!r}\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

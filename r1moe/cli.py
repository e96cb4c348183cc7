"""The `r1moe` command line.

    r1moe pretrain RECIPE [key=value ...] [--resume]     next-token pretraining (+ MTP, expert-bias update)
    r1moe sft      RECIPE [key=value ...] [--resume]     SFT: cold start, rejection-sampled data, distillation
    r1moe grpo     RECIPE [key=value ...] [--resume]     GRPO (R1-Zero, reasoning RL, all-scenario RL)
    r1moe rm       RECIPE [key=value ...]                Bradley-Terry reward model
    r1moe eval     --checkpoint DIR --data FILE ...      pass@1 / pass@k / cons@K
    r1moe pipeline RECIPE [--force STAGE]                the whole DeepSeek-R1 pipeline, resumable
    r1moe data make TASK --n N --seed S --out FILE       procedural datasets and pretraining corpora
    r1moe model info PRESET [--json]                     analytic parameter counts
    r1moe --version

Errors in inputs (recipes, data, checkpoints) print one clear line and exit with status 2.
"""

from __future__ import annotations

import importlib
import json
import sys

STAGES = {
    "pretrain": "r1moe.train.pretrain",
    "sft": "r1moe.train.sft",
    "grpo": "r1moe.train.grpo",
    "rm": "r1moe.train.rm",
    "eval": "r1moe.evaluate",
    "pipeline": "r1moe.pipeline",
}


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
        from r1moe.train.common import run_cli

        return run_cli("r1moe model info", lambda: model_info(rest[1:]))
    if cmd == "data" and rest[:1] == ["make"]:
        from r1moe.data.make import data_make_main

        return data_make_main(rest[1:])
    if cmd in STAGES:
        return importlib.import_module(STAGES[cmd]).main(rest)
    print(f"r1moe: unknown command {' '.join(argv[:2])!r}\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

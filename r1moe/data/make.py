"""`r1moe data make`: write a procedural dataset as JSONL.

    r1moe data make arithmetic --n 2000 --seed 0 --out data/train.jsonl      # PromptSample lines (RL prompts)
    r1moe data make countdown --n 200 --seed 1 --out data/eval.jsonl --difficulty 2
    r1moe data make general --n 500 --seed 0 --out data/general.jsonl        # kind="general" prompts
    r1moe data make pairs --n 1000 --seed 0 --out data/pairs.jsonl           # PreferencePair lines (reward model)
    r1moe data make cold_start --task arithmetic --n 500 --seed 0 --out data/cold.jsonl   # SFTSample lines

Different seeds (modulo NUM_SPLITS) never share a problem, so `--seed 1` is a held-out set for `--seed 0`.
`data_make_main(argv)` takes the arguments after `data make`; the `r1moe` CLI dispatches to it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from r1moe.data.cold_start import make_cold_start
from r1moe.data.general import iter_general, iter_preference_pairs
from r1moe.data.schema import write_jsonl
from r1moe.data.splits import NUM_SPLITS
from r1moe.data.tasks import TASKS, iter_dataset
from r1moe.templates import TEMPLATES

SPECIAL = ("general", "pairs", "cold_start")
PROGRESS_MIN_N = 1000
T = TypeVar("T")


def _parser() -> argparse.ArgumentParser:
    known = [*TASKS, *SPECIAL]
    p = argparse.ArgumentParser(
        prog="r1moe data make",
        description=f"Write a procedural dataset as JSONL. Seeds that differ modulo {NUM_SPLITS} give disjoint sets.",
    )
    p.add_argument("task", metavar="TASK", choices=known, help=f"one of: {', '.join(known)}")
    p.add_argument("--n", type=int, required=True, help="number of records")
    p.add_argument("--seed", type=int, required=True, help=f"selects split seed %% {NUM_SPLITS} and the stream")
    p.add_argument("--out", required=True, help="output .jsonl (written atomically)")
    p.add_argument("--difficulty", type=int, default=1, help="math tasks: 1 (easy, default) and up")
    p.add_argument("--task", dest="source", choices=[*TASKS, "general"],
                   help="cold_start: the task whose worked solutions to write")
    p.add_argument("--template", default="r1_zero", choices=sorted(TEMPLATES),
                   help="pairs / cold_start: template the prompts are rendered with (default r1_zero)")
    return p


def _progress(items: Iterable[T], n: int, label: str) -> Iterator[T]:
    if n < PROGRESS_MIN_N:
        yield from items
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as progress:
        bar = progress.add_task(label, total=n)
        for item in items:
            yield item
            progress.advance(bar)


def _usage_error(parser: argparse.ArgumentParser, message: str) -> int:
    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    return 2


def data_make_main(argv: list[str] | None = None) -> int:
    """Exit code: 0 written, 1 the split cannot supply --n problems, 2 usage error (e.g. an unknown TASK, with the
    known ones listed)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on --help (0) and on usage errors (2); return the code instead
        return int(e.code or 0)
    if args.n < 1:
        return _usage_error(parser, f"--n must be >= 1, got {args.n}")
    if args.task == "cold_start" and args.source is None:
        return _usage_error(parser, f"cold_start needs --task, one of: {', '.join([*TASKS, 'general'])}")
    try:
        if args.task in TASKS:
            records: Iterable = iter_dataset(args.task, args.n, args.seed, args.difficulty)
        elif args.task == "general":
            records = iter_general(args.n, args.seed)
        elif args.task == "pairs":
            records = iter_preference_pairs(args.n, args.seed, args.template)
        else:
            prompts = (iter_general(args.n, args.seed) if args.source == "general"
                       else iter_dataset(args.source, args.n, args.seed, args.difficulty))
            records = (sft for p in prompts for sft in make_cold_start([p], args.template))
        count = write_jsonl(args.out, _progress(islice(records, args.n), args.n, f"{args.task} -> {args.out}"))
    except ValueError as e:
        print(f"r1moe data make: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {count} {args.task} records to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(data_make_main())

"""`r1moe data make`: write a procedural dataset as JSONL.

    r1moe data make arithmetic --n 2000 --seed 0 --out data/train.jsonl      # PromptSample lines (RL prompts)
    r1moe data make countdown --n 200 --seed 1 --out data/eval.jsonl --difficulty 2
    r1moe data make general --n 500 --seed 0 --out data/general.jsonl        # kind="general" prompts
    r1moe data make pairs --n 1000 --seed 0 --out data/pairs.jsonl           # PreferencePair lines (reward model)
    r1moe data make safety --n 1000 --seed 5 --out data/safety.jsonl         # SafetySample lines (safety RM)
    r1moe data make cold_start --task arithmetic --n 500 --seed 0 --out data/cold.jsonl   # SFTSample lines
    r1moe data make corpus --task digits --n 40000 --seeds 2,3,4,5,6,7 --slip-rate 0 --out data/corpus.jsonl
                                                                             # a pretraining corpus (data/corpus.py)

Different seeds (modulo NUM_SPLITS) never share a problem, so `--seed 1` is a held-out set for `--seed 0`; a corpus
draws from the splits `--seeds` (default 2-7, disjoint from the usual RL seed 0 and eval seed 1). An option that
does not apply to the TASK is an error, not ignored.
`data_make_main(argv)` takes the arguments after `data make`; the `r1moe` CLI dispatches to it.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from r1moe.data.cold_start import make_cold_start
from r1moe.data.corpus import make_corpus
from r1moe.data.general import iter_general, iter_preference_pairs
from r1moe.data.safety import iter_safety
from r1moe.data.schema import write_jsonl
from r1moe.data.splits import NUM_SPLITS
from r1moe.data.tasks import TASKS, iter_dataset
from r1moe.templates import TEMPLATES

SPECIAL = ("general", "pairs", "safety", "cold_start", "corpus")
PROGRESS_MIN_N = 1000
T = TypeVar("T")
CORPUS_RATES = ("slip_rate", "untagged_rate", "template_rate", "drill_rate", "direct_rate", "french_rate")
APPLIES = {  # option -> the TASKs it applies to
    "seed": [*TASKS, "general", "pairs", "safety", "cold_start"],
    "difficulty": [*TASKS, "cold_start", "corpus"],
    "source": ["cold_start", "corpus"],
    "template": ["pairs", "safety", "cold_start"],
    "seeds": ["corpus"],
    **{rate: ["corpus"] for rate in CORPUS_RATES},
}


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    known = [*TASKS, *SPECIAL]
    p = argparse.ArgumentParser(
        prog="r1moe data make",
        description=f"Write a procedural dataset as JSONL. Seeds that differ modulo {NUM_SPLITS} give disjoint sets.",
    )
    p.add_argument("task", metavar="TASK", choices=known, help=f"one of: {', '.join(known)}")
    p.add_argument("--n", type=int, required=True, help="number of records")
    p.add_argument("--seed", type=int, help=f"selects split seed %% {NUM_SPLITS} and the stream (all but corpus)")
    p.add_argument("--out", required=True, help="output .jsonl (written atomically)")
    p.add_argument("--difficulty", type=int, help="math tasks, cold_start, corpus: 1 (easy, default) and up")
    p.add_argument("--task", dest="source", choices=[*TASKS, "general"],
                   help="cold_start: the task whose worked solutions to write; corpus: the task of its problems")
    p.add_argument("--template", choices=sorted(TEMPLATES),
                   help="pairs / cold_start: template the prompts are rendered with (default r1_zero)")
    p.add_argument("--seeds", type=_seeds, help="corpus: the splits it draws from (default 2,3,4,5,6,7)")
    defaults = inspect.signature(make_corpus).parameters
    for rate in CORPUS_RATES:
        p.add_argument(f"--{rate.replace('_', '-')}", dest=rate, type=float,
                       help=f"corpus: {rate} of r1moe/data/corpus.py (default {defaults[rate].default})")
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
    given = [opt for opt, tasks in APPLIES.items() if getattr(args, opt) is not None and args.task not in tasks]
    if given:
        flags = ", ".join("--task" if g == "source" else "--" + g.replace("_", "-") for g in given)
        return _usage_error(parser, f"{flags} has no effect on {args.task}")
    if args.task in APPLIES["seed"] and args.seed is None:
        return _usage_error(parser, f"{args.task} needs --seed")
    if args.task in ("cold_start", "corpus") and args.source is None:
        return _usage_error(parser, f"{args.task} needs --task, one of: {', '.join([*TASKS, 'general'])}")
    bad_rate = next((r for r in CORPUS_RATES if getattr(args, r) is not None and not 0 <= getattr(args, r) <= 1), None)
    if bad_rate:
        return _usage_error(parser, f"--{bad_rate.replace('_', '-')}={getattr(args, bad_rate)} must be in [0, 1]")
    if Path(args.out).is_dir():
        return _usage_error(parser, f"--out {args.out} is a directory; name the JSONL file to write")
    difficulty = 1 if args.difficulty is None else args.difficulty
    template = args.template or "r1_zero"
    try:
        if args.task in TASKS:
            records: Iterable = iter_dataset(args.task, args.n, args.seed, difficulty)
        elif args.task == "general":
            records = iter_general(args.n, args.seed)
        elif args.task == "pairs":
            records = iter_preference_pairs(args.n, args.seed, template)
        elif args.task == "safety":
            records = iter_safety(args.n, args.seed, template)
        elif args.task == "corpus":
            if args.source == "general":
                return _usage_error(parser, "corpus needs a procedural --task (general prompts have no solutions)")
            rates = {r: getattr(args, r) for r in CORPUS_RATES if getattr(args, r) is not None}
            records = make_corpus(args.source, args.n, args.seeds or [2, 3, 4, 5, 6, 7], difficulty=difficulty,
                                  **rates)
        else:
            prompts = (iter_general(args.n, args.seed) if args.source == "general"
                       else iter_dataset(args.source, args.n, args.seed, difficulty))
            records = (sft for p in prompts for sft in make_cold_start([p], template))
        count = write_jsonl(args.out, _progress(islice(records, args.n), args.n, f"{args.task} -> {args.out}"))
    except ValueError as e:
        print(f"r1moe data make: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # --out in a directory that cannot be written
        print(f"r1moe data make: error: --out {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote {count} {args.task} records to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(data_make_main())

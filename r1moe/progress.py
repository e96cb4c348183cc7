"""Progress of a long loop (training steps, evaluation, rejection sampling): a rich bar on a terminal, a line per
1/PROGRESS_LINES of the run in a log."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

PROGRESS_LINES = 20
"""Without a terminal, progress_bar prints about this many lines over a run (and at least one a minute)."""

PROGRESS_SECONDS = 60.0


@contextmanager
def progress_bar(desc: str, total: int, done: int = 0, enabled: bool = True) -> Iterator[Callable[[str], None]]:
    """Progress of a `total`-step loop that starts after step `done`; yields `advance(description)`, called once per
    step (a no-op when not enabled, e.g. inside another bar).

    On a terminal: a rich bar with the step count and ETA, drawn on rich's shared console, through which the
    per-step metrics lines (r1moe.tracking) are printed above it. Otherwise (an sbatch log, a pipe): a line
    `DESC: step N/TOTAL (P%), elapsed H:MM:SS, ETA H:MM:SS, DESCRIPTION` every 1/PROGRESS_LINES of the run, at
    least every PROGRESS_SECONDS, and at the last step."""
    from rich import get_console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if not enabled:
        yield lambda description: None
        return
    console = get_console()
    if console.is_terminal:
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), console=console, transient=True)
        with progress:
            task = progress.add_task(desc, total=total, completed=done)
            yield lambda description: progress.update(task, advance=1, description=description)
        return

    every = max(1, math.ceil(total / PROGRESS_LINES))
    start = last = time.monotonic()
    step = done

    def advance(description: str) -> None:
        nonlocal step, last
        step += 1
        now = time.monotonic()
        if step % every and step != total and now - last < PROGRESS_SECONDS:
            return
        last = now
        eta = (now - start) / (step - done) * (total - step)
        print(f"{desc}: step {step}/{total} ({100 * step / total:.0f}%), elapsed {_hms(now - start)}, "
              f"ETA {_hms(eta)}, {description}", flush=True)

    yield advance


def _hms(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"

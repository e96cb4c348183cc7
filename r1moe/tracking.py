"""Run logging: one JSON line per `log` call in `run_dir/metrics.jsonl`, a wandb run, a one-line console summary.

metrics.jsonl is the source of truth (plots.py and the pipeline reports read it; it survives without wandb).
Each line is `{"step": int, "time": unix seconds, "elapsed_s": seconds since the logger opened, <metrics>}`,
flushed as it is written, so a crashed run keeps everything up to its last line; a resumed run appends.
wandb runs offline by default with its files under `run_dir/wandb/` (upload later with `wandb sync`);
"online" needs the usual WANDB_API_KEY; "disabled" never imports wandb. Create the logger on one rank only.

    with MetricsLogger(run_dir, project="r1moe", run_name="r1-zero") as logger:
        logger.log(step, {"train/loss": loss, "reward/accuracy": acc})
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Literal

from rich import get_console
from rich.text import Text

METRICS_FILE = "metrics.jsonl"
_RESERVED = ("step", "time", "elapsed_s")


def _as_number(key: str, value: Any) -> float | int:
    if isinstance(value, bool | int):
        return int(value)
    try:
        return float(value)  # python/numpy floats, 0-dim tensors (one host sync each: log sparsely)
    except (TypeError, ValueError) as err:
        raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}") from err


def _format_value(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}" if math.isfinite(value) else str(value)


class MetricsLogger:
    """Appends metrics to `run_dir/metrics.jsonl`, mirrors them to wandb, prints a summary line per call."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        project: str,
        run_name: str,
        wandb_mode: Literal["offline", "online", "disabled"] = "offline",
        config: dict | Any | None = None,
        console: bool = True,
    ) -> None:
        if wandb_mode not in ("offline", "online", "disabled"):
            raise ValueError(f"wandb_mode must be 'offline', 'online' or 'disabled', got {wandb_mode!r}")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._start = time.time()
        # rich's shared console: a progress bar drawn on it (r1moe/progress.py) keeps these lines above itself
        self._console = get_console() if console else None
        self._wandb_run = None
        if os.environ.get("WANDB_MODE") == "disabled":  # wandb's own switch turns it off for a whole pipeline
            wandb_mode = "disabled"
        if wandb_mode != "disabled":
            import wandb  # lazily: slow to import, and not needed for "disabled"

            if dataclasses.is_dataclass(config) and not isinstance(config, type):
                config = dataclasses.asdict(config)
            self._wandb_run = wandb.init(
                project=project,
                name=run_name,
                dir=str(self.run_dir),
                mode=wandb_mode,
                config=config,
                reinit="create_new",  # several stages (loggers) in one process each get their own run
            )

    @property
    def wandb_dir(self) -> Path | None:
        """The wandb run's own directory (e.g. run_dir/wandb/offline-run-...), None when disabled."""
        return None if self._wandb_run is None else Path(self._wandb_run.settings.sync_dir)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record `metrics` at `step`. wandb drops a step lower than one already logged; the jsonl keeps it."""
        if self._file.closed:
            raise RuntimeError("MetricsLogger.log after close()")
        clash = [k for k in _RESERVED if k in metrics]
        if clash:
            raise ValueError(f"metric names {clash} are reserved for the jsonl record")
        values = {k: _as_number(k, v) for k, v in metrics.items()}
        now = time.time()
        record = {"step": int(step), "time": now, "elapsed_s": round(now - self._start, 3), **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=int(step))
        if self._console is not None:
            line = Text(f"step {int(step):>6}", style="bold cyan")
            for key, value in values.items():
                line.append("  ")
                line.append(key, style="dim")
                line.append(" " + _format_value(value))
            self._console.print(line, soft_wrap=True)

    def close(self) -> None:
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> MetricsLogger:  # noqa: PYI034 - typing.Self needs python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl (or of `path/metrics.jsonl` for a run directory), in file order.

    A last line cut short by a crash mid-write is skipped; a malformed line elsewhere is an error.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not a JSON line") from None
    return records

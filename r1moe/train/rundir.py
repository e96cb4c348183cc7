"""The run directory of a stage: its layout, the lock that makes it one run's, preparing it (fresh or resumed) and
marking it complete.

Layout:
    run.lock               held (flock) by the running process: one run per directory
    config.yaml            resolved config, written first
    metrics.jsonl          one line per logged step (r1moe.tracking)
    checkpoints/step_N/    HF checkpoint + trainer_state.pt (written atomically; r1moe.train.checkpointing)
    final/                 the stage's output checkpoint (HF directory, tokenizer included)
    DONE.json              written last: a run directory without it is not complete
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from r1moe.atomic import write_json_atomic, write_text_atomic
from r1moe.config import JobConfig, save_config

DONE_FILE = "DONE.json"
TRAINER_STATE = "trainer_state.pt"
LOCK_FILE = "run.lock"


def is_main_process() -> bool:
    """Rank 0 of a torchrun job (RANK is set before torch.distributed starts), or a plain process."""
    return int(os.environ.get("RANK", "0")) == 0


def is_complete(run_dir: str | Path) -> bool:
    return (Path(run_dir) / DONE_FILE).is_file()


def read_done(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / DONE_FILE).read_text())


_HELD_LOCKS: dict[Path, int] = {}
"""Run directory -> the open lock file of this process. A lock outlives prepare_run_dir (it is held for the run's
lifetime and released by mark_done or process exit); an in-process pipeline runs its stages one after another and a
later call for the same directory takes the lock over from the earlier, finished or failed, call."""


def acquire_run_lock(run_dir: Path, stage: str) -> None:
    """Hold an exclusive flock on run_dir/run.lock until mark_done or process exit (the kernel drops it when the
    process dies, even by SIGKILL: no stale lock). The file names the holder; a second run in the same directory
    stops with FileExistsError naming it."""
    import fcntl
    import socket

    key = run_dir.resolve()
    release_run_lock(run_dir)
    path = run_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise ValueError(_unwritable(run_dir, e)) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        os.close(fd)
        try:
            h = json.loads(holder)
            who = f"pid {h['pid']} on host {h['host']}, {h['stage']} started {h['started']}"
        except (ValueError, KeyError, TypeError):
            who = "another process"
        raise FileExistsError(f"logging.run_dir={run_dir} is in use by {who} (lock {path}); wait for that run to "
                              f"end or choose another logging.run_dir") from None
    except OSError as e:  # a filesystem without flock (ENOLCK, some network mounts): run, but say so
        print(f"warning: {path}: cannot lock ({e.strerror or e}); nothing stops a second run from using "
              f"logging.run_dir={run_dir} at the same time", file=sys.stderr)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "stage": stage,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    _HELD_LOCKS[key] = fd


def _unwritable(run_dir: Path, e: OSError) -> str:
    return f"logging.run_dir={run_dir}: cannot write the run directory ({e.strerror or e}: {e.filename or run_dir})"


def release_run_lock(run_dir: Path) -> None:
    fd = _HELD_LOCKS.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor of the open file drops the flock


def prepare_run_dir(cfg: JobConfig, resume: bool) -> Path:
    """Create and lock the run directory, clean what a dead attempt left, write config.yaml. A complete run is never
    overwritten. An incomplete one is resumed (resume=True: the config must be the one it ran with, except the keys
    in checkpoint.allow_config_change; metrics.jsonl is cut back to the last checkpoint, or removed when there is
    none) or started afresh (its checkpoints, final/ and metrics removed)."""
    run_dir = cfg.run_dir
    if is_complete(run_dir):
        raise FileExistsError(f"{run_dir} already holds a complete {cfg.stage} run ({DONE_FILE}); "
                              f"choose another logging.run_dir or delete it")
    if not is_main_process():  # the other ranks of a torchrun job use what rank 0 prepares
        return run_dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(_unwritable(run_dir, e)) from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise ValueError(_unwritable(run_dir, PermissionError(13, "Permission denied", str(run_dir))))
    acquire_run_lock(run_dir, cfg.stage)
    if resume:  # before anything is touched: a refused resume leaves the directory as it was
        check_resume_config(cfg, run_dir / "config.yaml")
    remove_stale_temp_files(run_dir)
    if resume:
        ckpt = latest_checkpoint(run_dir)
        truncate_metrics(run_dir, checkpoint_step(ckpt) if ckpt is not None else None)
    else:
        for stale in ("checkpoints", "final", "metrics.jsonl", "wandb"):
            p = run_dir / stale
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    save_config(cfg, run_dir / "config.yaml")
    return run_dir


def remove_stale_temp_files(run_dir: Path) -> None:
    """What an attempt killed mid-write leaves (under the run lock, so no live writer owns them): temp and
    renamed-away directories of checkpoints and final/ (`.step_N.tmp-*`, `.final.old-*`), temp files (`.x.tmp`)."""
    for parent in (run_dir, run_dir / "checkpoints"):
        if not parent.is_dir():
            continue
        for p in parent.iterdir():
            if p.name.startswith(".") and (".tmp" in p.name or ".old-" in p.name):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
    if (run_dir / "config.yaml.tmp").is_file():  # save_config's temp file
        (run_dir / "config.yaml.tmp").unlink()


def check_resume_config(cfg: JobConfig, saved: Path) -> None:
    """ValueError listing, key by key, where `cfg` differs from the config the run started with, unless every
    differing key is allowed by checkpoint.allow_config_change (a key, or a section name for all its keys)."""
    import yaml
    from omegaconf import OmegaConf

    if not saved.is_file():
        return  # the dead attempt stopped before writing it: nothing to compare
    try:
        old = OmegaConf.to_container(OmegaConf.load(saved))
    except (yaml.YAMLError, UnicodeDecodeError) as e:  # a YAML error names the line
        raise ValueError(f"{saved}: unreadable ({e}); delete it to resume with the current config") from None
    new = _flatten(OmegaConf.to_container(OmegaConf.structured(cfg)))
    defaults = _flatten(OmegaConf.to_container(OmegaConf.structured(JobConfig)))
    allowed = cfg.checkpoint.allow_config_change
    # how the run is resumed, and where the directory now is (a run directory may be moved or copied)
    ignored = ("checkpoint.resume", "checkpoint.allow_config_change", "logging.run_dir")
    diffs = []
    for k, a, b in _config_diff(_flatten(old), new):
        if k in ignored or any(k == p or k.startswith(p + ".") for p in allowed):
            continue
        if a is _MISSING and k in defaults and b == defaults[k]:
            continue  # a setting added to JobConfig after the run started, at its default: the run's behaviour
        if b is _MISSING:
            print(f"resume: {saved} sets {k}={a!r}, which this version of the config no longer has",
                  file=sys.stderr)
            continue
        diffs.append((k, a, b))
    if diffs:
        lines = "; ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, a, b in diffs)
        keys = ",".join(k for k, _, _ in diffs)
        raise ValueError(f"--resume with a config that differs from {saved}: {lines}. Resume with the same config, "
                         f"or allow these keys to change with --allow-config-change {keys}")


_MISSING = object()


def _show(v: Any) -> str:
    return "(absent)" if v is _MISSING else repr(v)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict) or not d:
        return {prefix: d} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    keys = list(old) + [k for k in new if k not in old]
    return [(k, old.get(k, _MISSING), new.get(k, _MISSING)) for k in keys
            if old.get(k, _MISSING) != new.get(k, _MISSING)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if (p / TRAINER_STATE).is_file())
    return ckpts[-1] if ckpts else None


def checkpoint_step(path: Path) -> int:
    """N of checkpoints/step_N."""
    return int(path.name.removeprefix("step_"))


def truncate_metrics(run_dir: Path, step: int | None) -> None:
    """Drop metrics logged after `step` (by an attempt that died after its last checkpoint), so a resumed run's
    metrics.jsonl reads as one uninterrupted run; step None (no checkpoint: the run starts over) removes them all."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    if step is None:
        path.unlink()
        return
    kept = [line for line in path.read_text(errors="replace").splitlines()
            if line.strip() and _step_of(line) is not None and _step_of(line) <= step]
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a line cut short by a crash


def mark_done(run_dir: Path, summary: dict[str, Any]) -> None:
    """DONE.json (the run is complete), then the run lock is released."""
    write_json_atomic(run_dir / DONE_FILE, {"finished_at": time.strftime("%Y-%m-%d %H:%M:%S"), **summary})
    release_run_lock(run_dir)

"""Atomic writes, the one home of write-to-temp-then-rename in the tree: a temporary file (or directory) next to
the target, flushed to disk, then renamed onto it, so a reader sees the old file or the whole new one, never half of
one, and a crash mid-write leaves the old one in place plus a dot-named temp (`.name.*.tmp`, `.name.tmp-*`) that
a resumed run clears.

The temporary file is created as any file is (mode 0666 less the umask), not with `tempfile.mkstemp`'s 0600 that a
rename would keep: what lands in a run directory, a dataset or a plot is as readable as the user's umask says, so
teammates on a shared cluster can read it.

    with atomic_open(path, "w") as f:
        f.write(text)
    with atomic_dir("ckpt/step_10") as tmp:   # a checkpoint directory, replaced as a whole
        (tmp / "config.json").write_text("{}")
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file next to `path` for writing ("w" text in UTF-8, or "wb"); on a clean exit it is flushed
    to disk and renamed onto `path`, on an exception removed."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode={mode!r}: expected 'w' or 'wb'")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def file_mode() -> int:
    """0666 less the process's umask: the mode `open()` gives a new file (for files a library creates 0600)."""
    try:  # Linux: read it without changing it (os.umask sets it, racing other threads)
        status = Path("/proc/self/status").read_text()
        mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration):
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A new empty directory next to `path` to fill; on a clean exit it is flushed to disk and renamed onto `path`
    (`publish_dir`), on an exception removed. The parent must exist."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()  # not tempfile.mkdtemp: that makes it 0700, and the result must be readable like any other dir
    try:
        yield tmp
        publish_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_dir(tmp: Path, path: Path) -> None:
    """Flush the complete directory `tmp` to disk and rename it onto `path`; an existing `path` is renamed away
    first and deleted only once the new one is in. For writers that cannot use `atomic_dir`'s `with` block (several
    ranks fill one temp directory, one publishes it)."""
    _fsync_tree(tmp)
    if not path.exists():
        os.rename(tmp, path)
        return
    old = path.parent / f".{path.name}.old-{secrets.token_hex(4)}"
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    """Flush file contents and directory entries before the rename publishes them (else a crash right after the
    rename can leave a complete-looking directory of empty files)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

"""Atomic file writes: a temporary file next to the target, then a rename, so a reader sees the old file or the
whole new one, never half of one.

The temporary file is created as any file is (mode 0666 less the umask), not with `tempfile.mkstemp`'s 0600 that a
rename would keep: what lands in a run directory, a dataset or a plot is as readable as the user's umask says, so
teammates on a shared cluster can read it.

    with atomic_open(path, "w") as f:
        f.write(text)
"""

from __future__ import annotations

import os
import secrets
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

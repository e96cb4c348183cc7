"""r1moe.atomic, the one temp-then-rename writer every file and checkpoint directory goes through: a writer killed
mid-write (a real process, ended by SIGKILL) or failing with an exception leaves the previous file or directory
whole; a clean write replaces it; new files get the user's umask."""

import os
import signal
import stat
import subprocess
import sys
import textwrap

import pytest

from r1moe.atomic import atomic_dir, atomic_open, write_json_atomic, write_text_atomic


def _killed_mid_write(code: str) -> None:
    """Run `code` in a child that signals when it is half-way through a write, then SIGKILL it there."""
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "half-written"
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=60) == -signal.SIGKILL


def test_file_killed_mid_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "metrics.jsonl"
    write_text_atomic(target, "old\n")
    _killed_mid_write(f"""
        import time
        from r1moe.atomic import atomic_open
        with atomic_open({str(target)!r}, "w") as f:
            f.write("new, but only half of it")
            f.flush()
            print("half-written", flush=True)
            time.sleep(60)
    """)
    assert target.read_text() == "old\n"
    leftovers = [p.name for p in tmp_path.iterdir() if p != target]
    assert len(leftovers) == 1 and leftovers[0].startswith(".metrics.jsonl.") and leftovers[0].endswith(".tmp")


def test_directory_killed_mid_write_keeps_the_old_directory(tmp_path):
    target = tmp_path / "step_1"
    with atomic_dir(target) as d:
        (d / "weights").write_text("old")
    _killed_mid_write(f"""
        import time
        from r1moe.atomic import atomic_dir
        with atomic_dir(__import__("pathlib").Path({str(target)!r})) as d:
            (d / "weights").write_text("new")
            print("half-written", flush=True)
            time.sleep(60)
    """)
    assert sorted(p.name for p in target.iterdir()) == ["weights"]
    assert (target / "weights").read_text() == "old"


def test_an_exception_removes_the_temp_and_keeps_the_old(tmp_path):
    target, ckpt = tmp_path / "a.json", tmp_path / "ckpt"
    write_json_atomic(target, {"step": 1})
    with atomic_dir(ckpt) as d:
        (d / "x").write_text("1")
    with pytest.raises(RuntimeError), atomic_open(target, "w") as f:
        f.write("{")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError), atomic_dir(ckpt) as d:
        (d / "x").write_text("2")
        raise RuntimeError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "ckpt"]
    assert target.read_text() == '{\n  "step": 1\n}' and (ckpt / "x").read_text() == "1"


def test_a_clean_write_replaces_and_follows_the_umask(tmp_path):
    before = os.umask(0o027)
    try:
        write_text_atomic(tmp_path / "f", "1")
        write_text_atomic(tmp_path / "f", "2")
        with atomic_dir(tmp_path / "d") as d:
            (d / "a").write_text("1")
        with atomic_dir(tmp_path / "d") as d:
            (d / "b").write_text("2")
    finally:
        os.umask(before)
    assert (tmp_path / "f").read_text() == "2" and [p.name for p in (tmp_path / "d").iterdir()] == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f"]  # no temp or renamed-away copy left
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o750
    with pytest.raises(ValueError, match="mode='a'"), atomic_open(tmp_path / "f", "a"):
        pass

"""progress_bar: on a terminal a rich bar with the per-step metrics lines printed above it (not into the bar's
line); without one (an sbatch log) periodic `step N/total, ETA` lines."""

import os
import pty
import re
import subprocess
import sys
import textwrap

from r1moe.progress import PROGRESS_LINES, progress_bar

LINE = re.compile(r"^sft: step (\d+)/(\d+) \((\d+)%\), elapsed \d+:\d\d:\d\d, ETA \d+:\d\d:\d\d, loss [\d.]+$")


def test_without_a_terminal_prints_periodic_step_lines(capsys):
    total = 3 * PROGRESS_LINES
    with progress_bar("sft", total) as advance:
        for step in range(1, total + 1):
            advance(f"loss {1 / step:.3f}")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == PROGRESS_LINES
    steps = [int(LINE.match(line).group(1)) for line in lines]
    assert steps == list(range(3, total + 1, 3))
    assert lines[-1].startswith(f"sft: step {total}/{total} (100%)")


def test_a_resumed_run_counts_from_where_it_was(capsys):
    with progress_bar("sft", 10, done=6) as advance:
        for _ in range(4):
            advance("loss 1.0")
    lines = capsys.readouterr().out.splitlines()
    assert [LINE.match(line).group(1) for line in lines] == ["7", "8", "9", "10"]


def test_on_a_terminal_metrics_lines_are_not_printed_into_the_bar(tmp_path):
    script = textwrap.dedent(f"""
        from r1moe.progress import progress_bar
        from r1moe.tracking import MetricsLogger
        with MetricsLogger({str(tmp_path)!r}, project="p", run_name="r", wandb_mode="disabled") as logger, \\
                progress_bar("sft", 3) as advance:
            for step in range(1, 4):
                logger.log(step, {{"train/loss": 1.0 / step}})
                advance(f"sft loss {{1.0 / step:.3f}}")
    """)
    leader, follower = pty.openpty()
    env = {**os.environ, "TERM": "xterm", "COLUMNS": "120"}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=follower, stderr=follower, env=env)
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    assert proc.wait(timeout=120) == 0, out.decode(errors="replace")
    text = out.decode()
    assert "3/3" in text  # a bar was drawn
    metric_lines = [line for line in text.split("\n") if re.search(r"step +\d+ ", line)]
    assert len(metric_lines) == 3, text
    for line in metric_lines:
        # the bar's line is cleared (ESC[2K) before a metrics line is written; colours may follow
        assert re.search(r"\x1b\[2K(\x1b\[[\d;]*m)*step +\d+ ", line), repr(line)

"""The `r1moe` command line as a user meets it: help at every level, --version, usage errors with status 2."""

import subprocess
import sys

import pytest

from r1moe import __version__, cli


@pytest.mark.parametrize("args, status, stream, text", [
    (["--help"], 0, "out", "r1moe pipeline RECIPE"),
    ([], 2, "err", "r1moe pipeline RECIPE"),
    (["--version"], 0, "out", f"r1moe {__version__}"),
    (["data", "--help"], 0, "out", "r1moe data make TASK"),
    (["data", "-h"], 0, "out", "r1moe data make TASK"),
    (["data"], 2, "err", "r1moe data make TASK"),
    (["model", "--help"], 0, "out", "r1moe model info PRESET"),
    (["model"], 2, "err", "r1moe model info PRESET"),
    (["data", "make", "--help"], 0, "out", "corpus"),
    (["model", "info", "--help"], 0, "out", "--json"),
    (["data", "split"], 2, "err", "unknown command 'data split'"),
    (["frobnicate"], 2, "err", "unknown command 'frobnicate'"),
])
def test_help_version_and_usage_errors(capsys, args, status, stream, text):
    assert cli.main(args) == status
    out, err = capsys.readouterr()
    assert text in (out if stream == "out" else err)
    assert not (err if stream == "out" else out)


def test_group_help_lists_only_its_subcommands(capsys):
    cli.main(["data", "--help"])
    out = capsys.readouterr().out
    assert "data make" in out and "model info" not in out and "grpo" not in out


def test_installed_entry_point_prints_the_version():
    proc = subprocess.run([sys.executable, "-m", "r1moe.cli", "--version"], capture_output=True, text=True,
                          check=False, timeout=60)
    assert (proc.returncode, proc.stdout.strip()) == (0, f"r1moe {__version__}")


def test_overrides_may_follow_the_flags():
    """`r1moe sft RECIPE --resume key=value`: an override after a flag is read, not "unrecognized arguments"."""
    from r1moe.cli import parse_stage_args

    cfg, resume = parse_stage_args(["recipes/tiny/r1/stage1_cold_start.yaml", "--resume", "train.seed=7",
                                    "--allow-config-change", "train.steps", "optim.lr=1e-4"], "sft")
    assert resume and cfg.train.seed == 7 and cfg.optim.lr == 1e-4
    assert cfg.checkpoint.allow_config_change == ["train.steps"] and cfg.stage == "sft"

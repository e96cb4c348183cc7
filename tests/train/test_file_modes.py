"""Everything a stage writes (config, metrics, checkpoints, final/, plots, DONE.json) and every dataset
`r1moe data make` writes gets the user's umask (0666/0777 less it), not a temporary file's 0600 kept by a rename."""

import os
import stat
from pathlib import Path

import pytest

from conftest import tiny_overrides
from r1moe.config import load_config
from r1moe.data import make_cold_start, make_dataset, write_jsonl
from r1moe.data.make import data_make_main
from r1moe.train import sft


@pytest.fixture
def umask_027():
    before = os.umask(0o027)
    yield
    os.umask(before)


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_stage_outputs_follow_the_umask(tmp_path, tiny_base, umask_027, one_thread):
    data = tmp_path / "data" / "sft.jsonl"
    write_jsonl(data, make_cold_start(make_dataset("arithmetic", 8, seed=3)))
    run = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(run, **{
        "stage": "sft", "model.init": tiny_base, "data.train": data, "train.steps": 2, "train.batch_size": 2,
        "data.seq_len": 128, "checkpoint.every": 1, "logging.plots": "true"}))
    sft.run(cfg)
    written = modes(run)
    assert {"final/model.safetensors", "final/tokenizer_config.json", "checkpoints", "loss.png", "config.yaml",
            "metrics.jsonl", "DONE.json"} <= set(written)
    assert any(name.endswith("trainer_state.pt") for name in written)
    wrong = {name: oct(mode) for name, mode in written.items()
             if mode != (0o750 if (run / name).is_dir() else 0o640)}
    assert not wrong, wrong
    assert stat.S_IMODE(data.stat().st_mode) == 0o640


def test_data_make_follows_the_umask(tmp_path, umask_027):
    out = tmp_path / "prompts.jsonl"
    assert data_make_main(["digits", "--n", "4", "--seed", "0", "--out", str(out)]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o640

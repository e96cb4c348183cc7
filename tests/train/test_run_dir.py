"""The run directory over a run's life: one run at a time (a flock held until the run ends or its process dies),
resume with the config the run started with (differences listed key by key, --allow-config-change for named keys,
which then take effect), metrics cut back to the checkpoint (removed when there is none), stale temp directories of
killed writes removed."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from conftest import tiny_overrides
from r1moe import cli
from r1moe.tracking import read_metrics
from r1moe.train.rundir import DONE_FILE, LOCK_FILE, is_complete

RECIPE = "recipes/tiny/r1_zero/pretrain.yaml"


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    pass


def _args(run, tiny_data, *flags, **extra):
    over = {"data.train": tiny_data / "corpus.jsonl", "train.steps": 4, "train.batch_size": 2, "data.seq_len": 128,
            "optim.warmup_steps": 0, "optim.schedule": "constant", "optim.min_lr_ratio": 1.0, "optim.lr": 1e-3,
            "checkpoint.every": 2, "train.threads": 1}
    over.update(extra)
    return ["pretrain", RECIPE, *tiny_overrides(run, **over), *flags]


def _interrupt(run):
    """What a run killed after its last checkpoint leaves: no final/, no DONE.json."""
    import shutil

    shutil.rmtree(run / "final")
    (run / DONE_FILE).unlink()


def test_second_run_in_a_locked_run_dir_names_the_holder_and_touches_nothing(tmp_path, tiny_data, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "train/loss": 1.0}\n')  # the holder's, a fresh start deletes it
    hold = ("import sys, time; from pathlib import Path; from r1moe.train.rundir import acquire_run_lock; "
            "acquire_run_lock(Path(sys.argv[1]), 'grpo'); print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        info = json.loads((run / LOCK_FILE).read_text())
        assert info["pid"] == holder.pid and info["host"] == socket.gethostname()
        assert cli.main(_args(run, tiny_data)) == 2
        err = capsys.readouterr().err
        assert f"is in use by pid {holder.pid} on host {socket.gethostname()}, grpo started {info['started']}" in err
        assert (run / "metrics.jsonl").read_text() == '{"step": 1, "train/loss": 1.0}\n'
        assert sorted(p.name for p in run.iterdir()) == sorted([LOCK_FILE, "metrics.jsonl"])
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # the kernel drops the flock with the process: no stale lock
        holder.wait()
    assert cli.main(_args(run, tiny_data)) == 0
    assert is_complete(run)


def test_resume_refuses_a_changed_config_and_allows_named_keys(tmp_path, tiny_data, capsys):
    run = tmp_path / "run"
    assert cli.main(_args(run, tiny_data)) == 0
    _interrupt(run)
    (run / ".final.tmp-0a1b2c3d").mkdir()  # a killed write's leftovers stay until a resume is accepted
    config_before = (run / "config.yaml").read_text()
    metrics_before = (run / "metrics.jsonl").read_text()

    assert cli.main(_args(run, tiny_data, "--resume", **{"optim.lr": 2e-3, "train.steps": 6})) == 2
    err = capsys.readouterr().err
    assert "train.steps: 4 -> 6" in err and "optim.lr: 0.001 -> 0.002" in err
    assert "--allow-config-change train.steps,optim.lr" in err
    assert (run / "config.yaml").read_text() == config_before  # nothing touched
    assert (run / "metrics.jsonl").read_text() == metrics_before
    assert (run / ".final.tmp-0a1b2c3d").is_dir()

    # a section name allows its keys only
    assert cli.main(_args(run, tiny_data, "--resume", "--allow-config-change", "optim",
                          **{"optim.lr": 2e-3, "train.steps": 6})) == 2
    err = capsys.readouterr().err
    assert "train.steps: 4 -> 6" in err and "optim.lr" not in err.split("Resume with")[0]

    assert cli.main(_args(run, tiny_data, "--resume", "--allow-config-change", "nosuch.key")) == 2
    assert "'nosuch.key' is not a config key or section" in capsys.readouterr().err

    assert cli.main(_args(run, tiny_data, "--resume", "--allow-config-change", "train.steps,optim.lr",
                          **{"optim.lr": 2e-3, "train.steps": 6})) == 0
    assert is_complete(run) and not (run / ".final.tmp-0a1b2c3d").exists()
    assert "lr: 0.002" in (run / "config.yaml").read_text()  # config.yaml tells the truth
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]  # cut back to the step-2 checkpoint, then resumed
    assert [m["train/lr"] for m in metrics] == [1e-3, 1e-3, 2e-3, 2e-3, 2e-3, 2e-3]  # the new LR is the one used


def test_resume_without_a_checkpoint_starts_clean(tmp_path, tiny_data):
    run = tmp_path / "run"
    assert cli.main(_args(run, tiny_data, **{"checkpoint.every": 0, "train.steps": 2})) == 0
    _interrupt(run)  # killed before any checkpoint: metrics 1, 2 and nothing to resume from
    assert not (run / "checkpoints").exists()
    assert cli.main(_args(run, tiny_data, "--resume", **{"checkpoint.every": 0, "train.steps": 2})) == 0
    assert [m["step"] for m in read_metrics(run)] == [1, 2]  # not 1, 2, 1, 2


def test_resume_removes_what_killed_writes_left(tmp_path, tiny_data):
    run = tmp_path / "run"
    assert cli.main(_args(run, tiny_data)) == 0
    _interrupt(run)
    stale = [run / ".final.tmp-0a1b2c3d", run / ".final.old-4e5f6a7b", run / "checkpoints" / ".step_0000004.tmp-89abcdef",
             run / "checkpoints" / ".step_0000004.tmp"]  # the last: a megatron checkpoint's temp directory
    for d in stale:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    (run / ".metrics.jsonl.tmp").write_text("half")
    (run / "config.yaml.tmp").write_text("half")
    assert cli.main(_args(run, tiny_data, "--resume")) == 0
    assert not any(d.exists() for d in stale)
    assert not (run / ".metrics.jsonl.tmp").exists() and not (run / "config.yaml.tmp").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002"]
    assert is_complete(run)


def test_resume_config_check_across_versions_of_the_config(tmp_path, capsys):
    """A run started before a setting existed resumes (absent = its default); a setting the config no longer has is
    reported, not fatal; a real change is listed."""
    from r1moe.config import load_config, save_config
    from r1moe.train.rundir import check_resume_config

    cfg = load_config(RECIPE, [f"logging.run_dir={tmp_path}"])
    saved = tmp_path / "config.yaml"
    save_config(cfg, saved)
    text = saved.read_text()
    assert "  max_nonfinite_steps: 3\n" in text
    saved.write_text(text.replace("  max_nonfinite_steps: 3\n", "  retired_knob: 7\n"))
    check_resume_config(cfg, saved)
    assert "sets train.retired_knob=7, which this version of the config no longer has" in capsys.readouterr().err
    changed = load_config(RECIPE, [f"logging.run_dir={tmp_path}", "train.max_nonfinite_steps=5"])
    with pytest.raises(ValueError, match=r"train.max_nonfinite_steps: \(absent\) -> 5"):
        check_resume_config(changed, saved)


def _poison(f):
    """A NaN written into the stored bytes of model.norm.weight (float32), the safetensors header left valid."""
    import struct

    data = bytearray(f.read_bytes())
    n = int.from_bytes(data[:8], "little")
    start = 8 + n + json.loads(data[8:8 + n])["model.norm.weight"]["data_offsets"][0]
    data[start:start + 4] = struct.pack("<f", float("nan"))
    f.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["nan_weights", "truncated_weights", "truncated_trainer_state",
                                    "garbled_trainer_state"])
def test_resume_from_a_damaged_checkpoint_is_an_input_error(damage, tmp_path, tiny_data, capsys):
    run = tmp_path / "run"
    assert cli.main(_args(run, tiny_data)) == 0
    _interrupt(run)
    ckpt = run / "checkpoints" / "step_0000002"
    if damage == "nan_weights":
        _poison(ckpt / "model.safetensors")
        expect = f"{ckpt / 'model.safetensors'}: tensor 'model.norm.weight' holds NaN/inf"
    elif damage == "truncated_weights":
        f = ckpt / "model.safetensors"
        f.write_bytes(f.read_bytes()[:1000])
        expect = f"{ckpt / 'model.safetensors'}: not a readable safetensors file"
    else:
        f = ckpt / "trainer_state.pt"
        if damage == "truncated_trainer_state":
            f.write_bytes(f.read_bytes()[:100])
        else:  # text where the pickle was (a pickle of "garbage" reads as an int opcode: ValueError)
            f.write_text("garbage\n")
        expect = f"{ckpt / 'trainer_state.pt'}: unreadable"
    assert cli.main(_args(run, tiny_data, "--resume")) == 2
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err
    assert not is_complete(run) and not (run / "final").exists()

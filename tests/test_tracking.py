"""MetricsLogger with a real wandb offline run; read_metrics; plot_run / plot_compare on a synthetic run."""

import json
import math

import pytest

from r1moe.plots import plot_compare, plot_run
from r1moe.tracking import MetricsLogger, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_default"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.delenv("WANDB_MODE", raising=False)


def test_metrics_logger_jsonl_and_wandb_offline(tmp_path, wandb_env, capsys):
    run_dir = tmp_path / "run"
    with MetricsLogger(run_dir, project="r1moe-test", run_name="unit", config={"lr": 3e-6, "G": 16}) as logger:
        logger.log(0, {"train/loss": 1.5, "reward/accuracy": 0.25, "rollout/num_seqs": 8})
        logger.log(1, {"train/loss": 1.25, "eval/pass@1": 0.5})
        wandb_dir = logger.wandb_dir
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["step"] == 0 and first["train/loss"] == 1.5 and first["rollout/num_seqs"] == 8
    assert second == {**second, "step": 1, "train/loss": 1.25, "eval/pass@1": 0.5}
    assert first["time"] <= second["time"] and second["elapsed_s"] >= 0
    # a real offline run directory inside run_dir, with its binary log
    assert wandb_dir is not None and wandb_dir.is_dir()
    assert wandb_dir.parent == run_dir / "wandb" and wandb_dir.name.startswith("offline-run-")
    assert list(wandb_dir.glob("run-*.wandb"))
    assert "train/loss" in capsys.readouterr().out


def test_metrics_logger_disabled_appends_and_validates(tmp_path):
    with MetricsLogger(tmp_path, project="p", run_name="r", wandb_mode="disabled", console=False) as logger:
        assert logger.wandb_dir is None
        logger.log(0, {"a": 1.0})
        with pytest.raises(ValueError, match="reserved"):
            logger.log(1, {"step": 3.0})
        with pytest.raises(TypeError, match="'b'"):
            logger.log(1, {"b": "text"})
    with MetricsLogger(tmp_path, project="p", run_name="r", wandb_mode="disabled", console=False) as logger:
        logger.log(1, {"a": 2.0})  # a resumed run appends
    assert [r["a"] for r in read_metrics(tmp_path)] == [1.0, 2.0]
    assert not (tmp_path / "wandb").exists()


def test_wandb_mode_disabled_in_the_environment_wins(tmp_path, wandb_env, monkeypatch):
    """WANDB_MODE=disabled (wandb's own switch) turns wandb off for every stage of a pipeline, whose recipes say
    offline."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    with MetricsLogger(tmp_path, project="p", run_name="r", wandb_mode="offline", console=False) as logger:
        assert logger.wandb_dir is None
        logger.log(0, {"a": 1.0})
    assert [r["a"] for r in read_metrics(tmp_path)] == [1.0]
    assert not (tmp_path / "wandb").exists()


def test_read_metrics_skips_only_a_truncated_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "x": 1}\n\n{"step": 1, "x": 2}\n{"step": 2, "x"')
    assert [r["x"] for r in read_metrics(path)] == [1, 2]
    path.write_text('{"step": 0, "x": 1}\nnot json\n{"step": 1, "x": 2}\n')
    with pytest.raises(ValueError, match=":2:"):
        read_metrics(path)


def _write_synthetic_run(run_dir, *, with_eval=True, with_std=True):
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(50):
            record = {
                "step": step,
                "train/loss": 1.0 / (1 + step),
                "reward/accuracy": step / 50,
                "reward/format": min(1.0, step / 10),
                "rollout/response_length": 100 + 10 * step,
            }
            if with_eval:  # an RL run's perf split and engine/trainer mismatch
                record.update({"perf/rollout_s": 2.0, "perf/train_s": 1.0, "perf/logprob_s": 0.3, "perf/sync_s": 0.1,
                               "rollout/logprob_abs_diff": 0.004, "rollout/logprob_abs_diff_max": 0.05})
            if with_std:
                record["rollout/response_length_std"] = 20 + step
            f.write(json.dumps(record) + "\n")
            if with_eval and step % 10 == 0:
                f.write(json.dumps({"step": step, "eval/pass@1": step / 60, "eval/cons@16": step / 50}) + "\n")
        f.write(json.dumps({"step": 50, "train/loss": math.nan}) + "\n")  # NaN is skipped, not plotted


def test_plot_run_writes_pngs(tmp_path):
    run_dir = tmp_path / "run"
    _write_synthetic_run(run_dir)
    paths = plot_run(run_dir, accuracy_refs={"reference": 0.7})
    names = sorted(p.name for p in paths)
    assert names == ["accuracy.png", "logprob_mismatch.png", "loss.png", "response_length.png", "rewards.png",
                     "step_time.png"]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_plot_run_skips_missing_keys(tmp_path):
    run_dir = tmp_path / "run"
    _write_synthetic_run(run_dir, with_eval=False, with_std=False)
    names = sorted(p.name for p in plot_run(run_dir, out_dir=tmp_path / "plots"))
    assert names == ["loss.png", "response_length.png", "rewards.png"]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text('{"step": 0, "other": 1.0}\n')
    assert plot_run(empty) == []


def test_plot_compare(tmp_path):
    out = plot_compare(
        {"R1-Zero": [(0, 0.1), (10, 0.4)], "R1": [(10, 0.5), (0, 0.2)], "empty": []},
        title="AIME pass@1",
        ylabel="Accuracy",
        out_path=tmp_path / "sub" / "compare.png",
    )
    assert out == tmp_path / "sub" / "compare.png"
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 5000


def _records(rows):
    return [{"step": step, **values} for step, values in rows]


def test_short_run_has_whole_step_ticks():
    from r1moe.plots import build_loss_figure

    fig = build_loss_figure(_records([(1, {"train/loss": 3.0}), (2, {"train/loss": 2.5}), (3, {"train/loss": 2.0})]))
    fig.canvas.draw()
    ticks = fig.axes[0].get_xticks()
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks


def test_zero_accuracy_sits_at_the_bottom_of_a_0_to_0_1_axis():
    from r1moe.plots import build_accuracy_figure

    fig = build_accuracy_figure(_records([(0, {"eval/digits/pass@1": 0.0}), (5, {"eval/digits/pass@1": 0.0})]))
    assert fig.axes[0].get_ylim() == (0.0, 0.1)
    fig = build_accuracy_figure(_records([(0, {"eval/digits/pass@1": 0.2}), (5, {"eval/digits/pass@1": 0.95})]))
    assert fig.axes[0].get_ylim() == (0.0, 1.0)


def test_total_reward_stays_visible_over_an_equal_component():
    from r1moe.plots import build_rewards_figure

    same = {"reward/accuracy": 0.5, "reward/format": 0.0, "reward/total": 0.5}
    fig = build_rewards_figure(_records([(1, same), (2, {**same, "reward/accuracy": 0.75, "reward/total": 0.75})]))
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert set(lines) == {"accuracy", "format", "total"}
    total, accuracy = lines["total"], lines["accuracy"]
    assert list(total.get_ydata()) == list(accuracy.get_ydata())  # the case that hid it
    assert total.get_linestyle() == "--" and total.get_zorder() > accuracy.get_zorder()
    assert fig.axes[0].get_lines()[-1] is total  # drawn last, on top

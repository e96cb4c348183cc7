"""The non-finite guard: NaN/inf loss or gradient norm skips the update (weights, optimizer state and LR schedule
untouched) and is counted; train.max_nonfinite_steps in a row stop the run; no checkpoint, final/ or DONE.json is
written from non-finite weights; the megatron step's decision (record_step, all_finite) on CPU tensors."""

import math

import pytest
import torch

from conftest import tiny_overrides
from r1moe import cli
from r1moe.config import load_config
from r1moe.model import build_model, from_pretrained, get_preset
from r1moe.parallel.train import StepResult, all_finite
from r1moe.tracking import read_metrics
from r1moe.train import checkpointing, common, rundir
from r1moe.train.guard import NonFiniteError, NonFiniteGuard, check_finite_state_dict
from r1moe.train.megatron_backend import record_step

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(("loss", "grad_norm", "finite"), [
    (1.0, 2.0, True), (NAN, 2.0, False), (1.0, NAN, False), (INF, 1.0, False), (1.0, -INF, False),
    (torch.tensor(NAN), None, False), (torch.tensor(0.5), torch.tensor(3.0), True), (None, None, True)])
def test_check_step_decides_on_loss_and_grad_norm(loss, grad_norm, finite):
    guard = NonFiniteGuard(3)
    assert guard.check_step(1, loss=loss, grad_norm=grad_norm) is finite
    assert guard.num_skipped == (0 if finite else 1)


def test_guard_counts_and_stops_after_n_in_a_row(capsys):
    guard = NonFiniteGuard(3, what="sft")
    assert guard.check_step(1, loss=NAN) is False
    assert guard.check_step(2, loss=1.0) is True  # a finite step resets the run of non-finite ones
    assert guard.check_step(3, loss=NAN) is False
    assert guard.check_step(4, grad_norm=INF) is False
    assert "sft: step 4: grad norm inf; update skipped (2 in a row" in capsys.readouterr().err
    with pytest.raises(NonFiniteError, match=r"sft stopped at step 5: loss nan; 3 non-finite step\(s\) in a row "
                                             r"\(train.max_nonfinite_steps=3\)"):
        guard.check_step(5, loss=NAN)
    assert guard.num_skipped == 4
    resumed = NonFiniteGuard(3)
    resumed.load_state_dict(guard.state_dict())
    assert (resumed.num_skipped, resumed.in_a_row) == (4, 3)
    with pytest.raises(ValueError, match="train.max_nonfinite_steps=0 must be >= 1"):
        NonFiniteGuard(0)


def test_check_finite_state_dict_names_the_tensor():
    good = {"a.weight": torch.ones(2), "b.counts": torch.tensor([1, 2])}
    check_finite_state_dict(good.items(), "ckpt")
    bad = {**good, "c.bias": torch.tensor([0.0, NAN])}
    with pytest.raises(NonFiniteError, match=r"ckpt: tensor 'c.bias' holds NaN/inf"):
        check_finite_state_dict(bad.items(), "ckpt")


def _linear_setup():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
    return model, opt, sched


def test_guarded_step_skips_a_nan_update_and_keeps_everything():
    model, opt, sched = _linear_setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = model(torch.full((3, 4), NAN)).sum()
    loss.backward()
    guard = NonFiniteGuard(2)
    out = common.guarded_step(model, opt, sched, 1.0, guard, step=1, loss=loss)
    assert out.skipped and math.isnan(out.grad_norm) and guard.num_skipped == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert opt.state == {} and sched.last_epoch == 0  # no Adam moment, no schedule advance
    assert all(p.grad is None for p in model.parameters())
    # the next finite step updates as usual
    model(torch.ones(3, 4)).sum().backward()
    out = common.guarded_step(model, opt, sched, 1.0, guard, step=2, loss=1.0)
    assert not out.skipped and math.isfinite(out.grad_norm) and sched.last_epoch == 1
    assert not torch.equal(model.weight, before["weight"])


def test_clip_and_step_stops_at_the_first_nan_before_updating():
    model, opt, sched = _linear_setup()
    before = model.weight.detach().clone()
    model(torch.full((3, 4), INF)).sum().backward()
    with pytest.raises(NonFiniteError, match="training stopped at optimizer update 1: grad norm inf"):
        common.clip_and_step(model, opt, sched, 1.0)
    assert torch.equal(model.weight, before)


@pytest.mark.parametrize(("result", "applied", "skipped"), [
    (StepResult({"loss": 1.0}, 0.5, True), True, 0),
    (StepResult({"loss": 1.0}, None, True), True, 0),  # megatron computes no norm when it does not clip
    (StepResult({"loss": NAN}, NAN, False), False, 1),  # parallel.train_step skipped it
    (StepResult({"loss": 1.0}, NAN, False), False, 1)])
def test_megatron_step_result_goes_through_the_same_guard(result, applied, skipped):
    guard = NonFiniteGuard(3)
    assert record_step(guard, 7, result) is applied
    assert guard.num_skipped == skipped


def test_all_finite_on_cpu_tensors():
    assert all_finite([torch.ones(3), torch.arange(4)])
    assert not all_finite([torch.ones(3), torch.tensor([1.0, INF])])
    assert not all_finite([torch.tensor([[NAN]], dtype=torch.bfloat16)])


# ---------------------------------------------------------------------------------------------- whole runs
def _pretrain_args(run, tiny_data, **extra):
    over = {"data.train": tiny_data / "corpus.jsonl", "train.steps": 6, "train.batch_size": 2, "data.seq_len": 128,
            "optim.warmup_steps": 0, "checkpoint.every": 1, "train.threads": 1}
    over.update(extra)
    return ["pretrain", "recipes/tiny/r1_zero/pretrain.yaml", *tiny_overrides(run, **over)]


def test_a_run_that_turns_nan_is_skipped_then_stopped_without_saving_nan(tmp_path, tiny_data, capsys, one_thread):
    """lr 1e30: step 1 is finite and throws the weights to ~1e30, so from step 2 on every gradient is NaN. Steps 2 and
    3 are skipped (weights unchanged), the third in a row stops the run: exit 1, one line, no final/, no DONE.json,
    every checkpoint written is finite (from_pretrained refuses NaN)."""
    run = tmp_path / "run"
    rc = cli.main(_pretrain_args(run, tiny_data, **{"optim.lr": 1e30}))
    err = capsys.readouterr().err
    assert rc == 1
    assert "pretrain stopped at step 4: grad norm nan; 3 non-finite step(s) in a row" in err
    assert not rundir.is_complete(run) and not (run / "final").exists()
    steps = {m["step"]: m for m in read_metrics(run)}
    assert sorted(steps) == [1, 2, 3]
    assert steps[1]["train/skipped"] == 0 and math.isfinite(steps[1]["train/grad_norm"])
    assert steps[2]["train/skipped"] == steps[3]["train/skipped"] == 1
    assert steps[3]["train/nonfinite_skipped"] == 2
    assert steps[2]["train/lr"] == steps[3]["train/lr"]  # a skipped step does not advance the schedule
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_0000002", "step_0000003"]  # checkpoint.keep=2
    a, b = (from_pretrained(run / "checkpoints" / c) for c in ckpts)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name  # the skipped step 3 did not move the weights


def test_max_nonfinite_steps_1_stops_at_the_first(tmp_path, tiny_data, capsys, one_thread):
    run = tmp_path / "run"
    assert cli.main(_pretrain_args(run, tiny_data, **{"optim.lr": 1e30, "train.max_nonfinite_steps": 1})) == 1
    assert "stopped at step 2" in capsys.readouterr().err
    assert [m["step"] for m in read_metrics(run)] == [1]
    assert not rundir.is_complete(run)


def test_finalize_and_save_checkpoint_refuse_nan_weights(tmp_path):
    from r1moe.data.tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer(["1 + 2 = 3"], vocab_size=300)
    model = build_model(get_preset("tiny-moe").replace(vocab_size=300), seed=0)
    with torch.no_grad():
        model.model.norm.weight[3] = NAN
    opt, sched = common.build_optimizer(model, load_config(None).optim, 10)
    with pytest.raises(NonFiniteError, match=r"checkpoint of step 5: tensor 'model.norm.weight' holds NaN/inf"):
        checkpointing.save_checkpoint(tmp_path, 5, model, tok, opt, sched, {}, keep=2)
    with pytest.raises(NonFiniteError, match=r"final weights: tensor 'model.norm.weight' holds NaN/inf"):
        checkpointing.finalize(tmp_path, model, tok, {"stage": "test"})
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, not even a temp directory

"""The GRPO loop (train/grpo.py) against a small fake policy and a fake rollout engine (real classes): what the
loop asks of each, in which order, with which shapes; and the errors for engines that cannot run here."""

import subprocess
import sys

import pytest
import torch

from conftest import tiny_overrides
from r1moe.config import load_config
from r1moe.rollout import Generation
from r1moe.tracking import read_metrics
from r1moe.train import grpo
from r1moe.train.rundir import is_complete


class ScriptedEngine:
    """Answers every prompt with a fixed completion: the first G/2 of each group right, the rest wrong."""

    def __init__(self, tok, group_size, answers):
        self.tok, self.G, self.answers = tok, group_size, answers
        self.calls: list[str] = []
        self.prompts_seen: list[int] = []

    def generate(self, prompts, params):
        self.calls.append("generate")
        self.prompts_seen.append(len(prompts))
        out = []
        for i, p in enumerate(prompts):
            right = (i % self.G) < self.G // 2
            text = f"<think> x </think> <answer> {self.answers.pop(0) if right else 'nope'} </answer>"
            ids = self.tok.encode(text).ids
            out.append(Generation(list(p), ids, [-0.5] * len(ids), text, "stop"))
        return out

    def update_weights(self, named_tensors):
        self.calls.append("update")

    def sleep(self):
        self.calls.append("sleep")

    def shutdown(self):
        self.calls.append("shutdown")


class RecordingPolicy:
    """A policy that trains nothing and records what the loop gave it."""

    is_main = True

    def __init__(self, model_cfg):
        self.model_cfg = model_cfg
        self.trainer_extra: dict = {}
        self.batches, self.events = [], []

    @property
    def lr(self):
        return 1e-3

    def train_grpo(self, batch, adv_N, a, norm_const, temperature, guard=None, step=0):
        self.batches.append((batch, adv_N.clone(), temperature))
        self.events.append("train")
        return {"train/kl": 0.0}

    def refresh_ref(self):
        self.events.append("refresh")

    def rollout_model(self):
        raise AssertionError("a fake engine needs no model")

    def export_to(self, engine):
        self.events.append("export")
        engine.update_weights([])

    def broadcast(self, obj):
        return obj

    def save_checkpoint(self, run_dir, step, extra=None):
        self.events.append(f"ckpt{step}")

    def restore(self, run_dir):
        return 0

    def save_final(self, run_dir, tok, summary):
        from r1moe.atomic import write_json_atomic

        self.events.append("final")
        write_json_atomic(run_dir / "DONE.json", summary)

    def build_logger(self, cfg, run_dir):
        from r1moe.tracking import MetricsLogger

        return MetricsLogger(run_dir, project="t", run_name="t", wandb_mode="disabled", config={})


def test_loop_drives_policy_and_engine_in_order(tmp_path, tiny_data, tiny_base):
    from r1moe.data import read_prompts
    from r1moe.model import ModelConfig

    cfg = load_config("recipes/tiny/r1_zero/grpo.yaml", tiny_overrides(tmp_path / "run", **{
        "model.init": tiny_base, "data.train": tiny_data / "train.jsonl", "data.eval": "null", "stage": "grpo",
        "train.steps": 3, "train.batch_size": 2, "rollout.group_size": 4, "rollout.temperature": 0.7,
        "checkpoint.every": 2, "algo.ref_refresh_every": 2}))
    train = read_prompts(tiny_data / "train.jsonl")
    answers = [s.answer for s in train] * 10  # plenty; the sampler's order decides which is used
    policy = RecordingPolicy(ModelConfig.from_json(tiny_base / "config.json"))
    engines = []

    def make_engine(cfg, pol, tok, run_dir):
        engines.append(ScriptedEngine(tok, cfg.rollout.group_size, answers))
        return engines[0]

    grpo.run(cfg, policy_factory=lambda c, t, d: policy, engine_factory=make_engine)
    engine = engines[0]
    assert engine.prompts_seen == [8, 8, 8]  # Q x G per step
    # per step: rollout, hand memory back, train, weights to the engine
    assert engine.calls[:4] == ["update", "generate", "sleep", "update"]
    assert engine.calls[-1] == "shutdown"
    assert policy.events == ["export", "train", "export", "train", "export", "refresh", "ckpt2", "train", "export",
                             "final"]
    for batch, adv, temperature in policy.batches:
        assert temperature == 0.7
        assert adv.shape == (8,) and batch.input_ids_NT.shape[0] == 8
        assert batch.rollout_logp_NT[batch.response_mask_NT].eq(-0.5).all()  # the engine's logprobs, aligned
    assert is_complete(cfg.run_dir)
    steps = [m for m in read_metrics(cfg.run_dir) if "reward/total" in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    assert all({"perf/rollout_s", "perf/train_s", "perf/sync_s"} <= set(m) for m in steps)


def test_sglang_settings_without_the_sglang_engine_are_an_error():
    with pytest.raises(ValueError, match=r"rollout.sglang.tp.*rollout.engine='builtin'"):
        load_config(None, ["rollout.sglang.tp=2"])
    cfg = load_config(None, ["rollout.engine=sglang", "rollout.sglang.tp=2", "rollout.sglang.dp=2"])
    assert cfg.rollout.sglang.tp == 2


@pytest.mark.parametrize(("override", "message"), [
    ("rollout.sglang.ep=3", "rollout.sglang.ep=3 must divide"),
    ("rollout.sglang.tp=0", "rollout.sglang.tp=0 must be >= 1"),
    ("rollout.sglang.mem_fraction_static=1.5", "mem_fraction_static=1.5"),
    ("rollout.sglang.cuda_graph_max_bs=-1", "cuda_graph_max_bs=-1"),
    ("rollout.sglang.sampling_backend=cuda", "sampling_backend"),
    ("rollout.sglang.base_gpu_id=-1", "base_gpu_id=-1 must be >= 0"),
    ("rollout.sglang.weight_bucket_mb=0", "weight_bucket_mb=0 must be >= 1"),
])
def test_sglang_section_validation(override, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("=", "=")):
        load_config(None, ["rollout.engine=sglang", override])


@pytest.mark.parametrize(("over", "message"), [
    ({"rollout.sglang.base_gpu_id": 1}, "set rollout.sglang.colocate=false"),
    ({"rollout.sglang.base_gpu_id": 1, "rollout.sglang.colocate": "false", "rollout.sglang.dp": 2},
     "rollout.sglang.dp=2: GRPO syncs the policy into SGLang every step"),
])
def test_sglang_on_gpus_of_its_own_needs_colocate_off_and_one_replica(over, message):
    """One training rank on the node (no torchrun): base_gpu_id=1 is a GPU of SGLang's own."""
    from r1moe.train.grpo import check_backends, sglang_has_own_gpus

    cfg = load_config(None, ["rollout.engine=sglang", *[f"{k}={v}" for k, v in over.items()]])
    assert sglang_has_own_gpus(cfg.rollout.sglang)
    with pytest.raises(ValueError, match=message):
        check_backends(cfg)


def test_grpo_with_several_sglang_replicas_is_refused_before_it_starts():
    """SGLang 0.5.17 takes weight updates with dp=1 only: colocated GRPO at dp=2 would fail at its first sync,
    after the engine started; it stops at the check instead, naming the key (no CUDA needed to reach it)."""
    from r1moe.train.grpo import check_backends

    cfg = load_config(None, ["rollout.engine=sglang", "rollout.sglang.dp=2"])
    with pytest.raises(ValueError, match=r"rollout\.sglang\.dp=2: GRPO syncs the policy"):
        check_backends(cfg)


def test_sglang_placement_follows_the_training_ranks_on_the_node(monkeypatch):
    from r1moe.config import SGLangSection
    from r1moe.train.grpo import sglang_has_own_gpus

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert not sglang_has_own_gpus(SGLangSection(base_gpu_id=0))
    assert not sglang_has_own_gpus(SGLangSection(base_gpu_id=2))  # on GPUs 2-3 of the trainer's: IPC
    assert sglang_has_own_gpus(SGLangSection(base_gpu_id=4, colocate=False))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_grpo_with_sglang_on_cpu_stops_before_anything(tmp_path, tiny_data, tiny_base):
    run = tmp_path / "run"
    args = tiny_overrides(run, **{"model.init": tiny_base, "data.train": tiny_data / "train.jsonl",
                                  "rollout.engine": "sglang"})
    p = subprocess.run([sys.executable, "-m", "r1moe.train.grpo", "recipes/tiny/r1_zero/grpo.yaml", *args],
                       check=False, capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    assert "rollout.engine=sglang needs CUDA" in p.stderr and "rollout.engine=builtin" in p.stderr
    assert not run.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_eval_with_sglang_on_cpu_is_a_clear_error(tmp_path, tiny_data, tiny_base):
    base = [sys.executable, "-m", "r1moe.evaluate", "--checkpoint", str(tiny_base), "--data",
            str(tiny_data / "eval.jsonl"), "--out", str(tmp_path / "r.json")]
    p = subprocess.run([*base, "--engine", "sglang", "--dp", "2"], check=False, capture_output=True, text=True)
    assert p.returncode == 2 and "engine=sglang needs CUDA" in p.stderr, p.stderr
    p = subprocess.run([*base, "--tp", "2"], check=False, capture_output=True, text=True)
    assert p.returncode == 2 and "--tp/--dp apply only with --engine sglang" in p.stderr
    assert not (tmp_path / "r.json").exists()


def test_grpo_that_diverges_stops_without_saving_nan(tmp_path, tiny_data, tiny_base):
    """lr=1e30 and a reward that always moves the policy (length): the first update leaves weights of ~1e30, whose
    logits overflow. The run stops at the next rollout with NonFiniteError (an applied update cannot be skipped),
    with no DONE.json and no final/; the checkpoint of step 1 holds finite weights."""
    from r1moe.train.guard import NonFiniteError

    cfg = load_config("recipes/tiny/r1_zero/grpo.yaml", tiny_overrides(tmp_path / "run", **{
        "model.init": tiny_base, "data.train": tiny_data / "train.jsonl", "data.eval": "null", "stage": "grpo",
        "train.steps": 8, "train.batch_size": 2, "rollout.group_size": 4, "rollout.max_new_tokens": 8,
        "optim.lr": 1e30, "rewards.weights": "{length: 1.0}", "checkpoint.every": 1,
        "train.max_nonfinite_steps": 2}))
    with pytest.raises(NonFiniteError):
        grpo.run(cfg)
    assert not is_complete(cfg.run_dir) and not (cfg.run_dir / "final").exists()
    from r1moe.model import from_pretrained

    ckpts = sorted((cfg.run_dir / "checkpoints").glob("step_*"))
    assert ckpts and all(torch.isfinite(p).all() for p in from_pretrained(ckpts[-1]).parameters())


def recording_engine(seen: list):
    """An engine factory: grpo.build_engine's engine, each generate call recorded as (max_new_tokens, prompts)."""

    def make_engine(cfg, policy, tok, run_dir):
        engine = grpo.build_engine(cfg, policy, tok, run_dir)
        inner = engine.generate

        def generate(prompts, params):
            seen.append((params.max_new_tokens, [tok.decode(p) for p in prompts]))
            return inner(prompts, params)

        engine.generate = generate
        return engine

    return make_engine


def test_length_and_data_schedules_switch_inside_one_resumable_run(tmp_path, tiny_data, tiny_base):
    """rollout.max_new_tokens_schedule and data.train_schedule: the switch happens at its step in one job, and a run
    resumed after the switch draws the same questions as the uninterrupted one."""
    from r1moe.data import make_dataset, read_prompts, write_jsonl

    write_jsonl(tmp_path / "late.jsonl", make_dataset("digits", 16, seed=7))
    late = {s.prompt for s in read_prompts(tmp_path / "late.jsonl")}
    early = {s.prompt for s in read_prompts(tiny_data / "train.jsonl")}

    def run(name):
        cfg = load_config("recipes/tiny/r1_zero/grpo.yaml", tiny_overrides(tmp_path / name, **{
            "model.init": tiny_base, "data.train": tiny_data / "train.jsonl", "data.eval": "null", "stage": "grpo",
            "train.steps": 4, "train.batch_size": 2, "rollout.group_size": 2, "rollout.max_new_tokens": 4,
            "rollout.max_new_tokens_schedule": "{3: 9}", "data.train_schedule": f"{{3: {tmp_path / 'late.jsonl'}}}",
            "checkpoint.every": 1}))
        seen = []
        grpo.run(cfg, policy_factory=grpo.build_policy, engine_factory=recording_engine(seen))
        return cfg, seen

    cfg, seen = run("a")
    assert [m for m, _ in seen] == [4, 4, 9, 9]
    assert all(any(q in p for q in early) for p in seen[1][1]) and all(any(q in p for q in late) for p in seen[2][1])
    assert [m["rollout/max_new_tokens"] for m in read_metrics(cfg.run_dir) if "reward/total" in m] == [4, 4, 9, 9]
    # resume after the switch: drop steps 4 onwards and continue from the step-3 checkpoint
    import shutil

    for extra in ("final", "DONE.json"):
        p = cfg.run_dir / extra
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    shutil.rmtree(cfg.run_dir / "checkpoints" / "step_0000004", ignore_errors=True)
    resumed = load_config(cfg.run_dir / "config.yaml", [])
    seen_r = []
    grpo.run(resumed, resume=True, policy_factory=grpo.build_policy, engine_factory=recording_engine(seen_r))
    assert seen_r == seen[3:]

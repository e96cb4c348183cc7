"""The catalogue of bad inputs and what the command line does with them: one row per case, grown as cases are
found. Each row makes its bad input in a fresh workspace, runs the command (in-process through `r1moe.cli.main`,
or as a real `python -m r1moe.cli` subprocess for a representative subset) and checks the contract: exit status 2,
one `r1moe ...: error:` line naming the file / line / key / tensor / flag, no traceback, and nothing written: the
workspace (run directory, --out target, their parents) is byte for byte what it was before the command.

Rows record what used to happen, so a regression reads against its history."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from r1moe import cli
from r1moe.data import make_cold_start, make_dataset, make_preference_pairs, write_jsonl
from r1moe.data.corpus import make_corpus

ROOT = Path(__file__).resolve().parent.parent
GRPO, SFT, PRETRAIN, RM = (f"recipes/tiny/{r}.yaml" for r in ("r1_zero/grpo", "r1/stage1_cold_start",
                                                               "r1_zero/pretrain", "r1/rm"))


@dataclass
class Env:
    ws: Path
    """The workspace of one case: everything the command could write to is under it."""
    ckpt: Path
    """A good tiny checkpoint (outside the workspace, shared)."""
    data: Path
    """Good data files (outside the workspace, shared): prompts.jsonl, sft.jsonl, corpus.jsonl, pairs.jsonl."""

    def stage(self, stage: str, recipe: str, *overrides: str, init: bool = True) -> list[str]:
        base = [f"logging.run_dir={self.ws / 'run'}", "logging.wandb=disabled", "logging.plots=false",
                "train.steps=1", "train.epochs=null", "train.batch_size=2"]
        train = {"grpo": "prompts.jsonl", "sft": "sft.jsonl", "pretrain": "corpus.jsonl", "rm": "pairs.jsonl"}[stage]
        base.append(f"data.train={self.data / train}")
        if init:
            base.append(f"model.init={self.ckpt}")
        if stage == "grpo":
            base.append("data.eval=null")
        if stage in ("sft", "rm"):
            base.append("train.epochs=null")  # the tiny recipes count epochs; train.steps=1 decides here
        return [stage, str(ROOT / recipe), *base, *overrides]

    def eval(self, *flags: str, checkpoint: Path | None = None, data: Path | None = None) -> list[str]:
        return ["eval", "--checkpoint", str(checkpoint or self.ckpt), "--data", str(data or self.data / "prompts.jsonl"),
                "--samples", "1", "--max-new-tokens", "4", *flags]


@dataclass
class Case:
    id: str
    argv: Callable[[Env], list[str]]
    expect: str | Callable[[Env], str]
    """A fragment of the error line (it may depend on the workspace's paths)."""
    prepare: Callable[[Env], None] = lambda env: None
    subprocess: bool = False
    was: str = ""
    """What happened before the check existed."""


# ---------------------------------------------------------------------------------------------- bad inputs, made
def _not_utf8(path: Path, good: str, line: int = 2) -> None:
    """`line` holds a Latin-1 byte (0xe9): valid JSON in every other respect."""
    lines = [good.encode()] * 3
    lines[line - 1] = '{"prompt": "caf\u00e9 1 + 1", "answer": "2"}'.encode("latin-1")
    path.write_bytes(b"\n".join(lines) + b"\n")


def _first_line(path: Path) -> str:
    return path.read_text().splitlines()[0]


def _copy_ckpt(env: Env) -> Path:
    dst = env.ws / "ckpt"
    shutil.copytree(env.ckpt, dst)
    return dst


def _truncate_weights(env: Env) -> None:
    f = _copy_ckpt(env) / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _garble_weights(env: Env) -> None:
    (_copy_ckpt(env) / "model.safetensors").write_bytes(b"\x00" * 64)


def _nan_weights(env: Env) -> None:
    """A NaN written into the stored bytes of model.norm.weight (float32), the header left valid."""
    f = _copy_ckpt(env) / "model.safetensors"
    data = bytearray(f.read_bytes())
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + n])["model.norm.weight"]
    assert meta["dtype"] == "F32"
    start = 8 + n + meta["data_offsets"][0]
    data[start:start + 4] = struct.pack("<f", float("nan"))
    f.write_bytes(bytes(data))


def _long_prompt(env: Env) -> None:
    write_jsonl(env.ws / "long.jsonl", [{"prompt": "Compute " + " + ".join(["12"] * 1200), "answer": "0", "id": "q-long"}])


def _unwritable(env: Env) -> Path:
    """A directory this process cannot write: chmod 0555, or for root (whom modes do not stop) a path in sysfs."""
    if os.geteuid() == 0:
        return Path("/sys/r1moe-unwritable")
    d = env.ws / "ro"
    d.mkdir()
    d.chmod(0o555)
    return d


def _file_at(env: Env, name: str) -> Path:
    (env.ws / name).write_text("a file, not a directory\n")
    return env.ws / name


CASES = [
    # ------------------------------------------------------------------ JSONL / corpus bytes that are not UTF-8
    Case("grpo-prompts-not-utf8",
         lambda env: env.stage("grpo", GRPO, f"data.train={env.ws / 'bad.jsonl'}"),
         lambda env: f"{env.ws / 'bad.jsonl'}:2: not valid UTF-8 (byte 0xe9 at column 16)",
         prepare=lambda env: _not_utf8(env.ws / "bad.jsonl", _first_line(env.data / "prompts.jsonl")),
         subprocess=True, was="UnicodeDecodeError text without file or line"),
    Case("sft-not-utf8-line-3",
         lambda env: env.stage("sft", SFT, f"data.train={env.ws / 'bad.jsonl'}"),
         lambda env: f"{env.ws / 'bad.jsonl'}:3: not valid UTF-8",
         prepare=lambda env: _not_utf8(env.ws / "bad.jsonl", _first_line(env.data / "sft.jsonl"), line=3)),
    Case("rm-pairs-not-utf8",
         lambda env: env.stage("rm", RM, f"data.train={env.ws / 'bad.jsonl'}"),
         lambda env: f"{env.ws / 'bad.jsonl'}:2: not valid UTF-8",
         prepare=lambda env: _not_utf8(env.ws / "bad.jsonl", _first_line(env.data / "pairs.jsonl"))),
    Case("pretrain-jsonl-corpus-not-utf8",
         lambda env: env.stage("pretrain", PRETRAIN, f"data.train={env.ws / 'bad.jsonl'}", init=False),
         lambda env: f"{env.ws / 'bad.jsonl'}:2: not valid UTF-8",
         prepare=lambda env: _not_utf8(env.ws / "bad.jsonl", _first_line(env.data / "corpus.jsonl"))),
    Case("pretrain-txt-corpus-not-utf8",
         lambda env: env.stage("pretrain", PRETRAIN, f"data.train={env.ws / 'bad.txt'}", init=False),
         lambda env: f"{env.ws / 'bad.txt'}:4: not valid UTF-8 (byte 0xff at column 3)",
         prepare=lambda env: (env.ws / "bad.txt").write_bytes(b"one doc\n\nanother\nab\xff\n")),
    # ------------------------------------------------------------------ config values
    Case("lr-inf", lambda env: env.stage("sft", SFT, "optim.lr=inf"), "optim.lr=inf must be a finite number",
         subprocess=True, was="accepted; the run wrote NaN checkpoints, a NaN final/ and DONE.json, exit 0"),
    Case("lr-nan", lambda env: env.stage("sft", SFT, "optim.lr=nan"), "optim.lr=nan must be a finite number"),
    Case("lr-negative", lambda env: env.stage("sft", SFT, "optim.lr=-0.1"), "optim.lr=-0.1 must be >= 0"),
    Case("reward-weight-inf", lambda env: env.stage("grpo", GRPO, "rewards.weights.accuracy=inf"),
         "rewards.weights.accuracy=inf must be a finite number"),
    Case("eval-temperature-negative", lambda env: env.stage("grpo", GRPO, "eval.temperature=-0.5"),
         "eval.temperature=-0.5 must be >= 0", was="accepted"),
    Case("eval-top-p-above-1", lambda env: env.stage("grpo", GRPO, "eval.top_p=1.5"),
         "eval.top_p=1.5 must be in (0, 1]", was="accepted"),
    Case("eval-samples-0", lambda env: env.stage("grpo", GRPO, "eval.samples=0"), "eval.samples=0 must be > 0",
         was="accepted; the held-out eval crashed in range()"),
    Case("micro-batch-negative", lambda env: env.stage("sft", SFT, "train.micro_batch_size=-1"),
         "train.micro_batch_size=-1 must be >= 0", was="accepted; range() error mid-run"),
    Case("log-every-0", lambda env: env.stage("sft", SFT, "train.log_every=0"), "train.log_every=0 must be > 0",
         was="ZeroDivisionError at step 1"),
    Case("max-nonfinite-0", lambda env: env.stage("sft", SFT, "train.max_nonfinite_steps=0"),
         "train.max_nonfinite_steps=0 must be > 0"),
    Case("betas-out-of-range", lambda env: env.stage("sft", SFT, "optim.betas=[0.9,1.5]"),
         "optim.betas=[0.9, 1.5] must be two numbers in [0, 1)"),
    Case("allow-config-change-unknown-key",
         lambda env: [*env.stage("sft", SFT), "--resume", "--allow-config-change", "optim.lrr"],
         "checkpoint.allow_config_change: 'optim.lrr' is not a config key or section"),
    Case("allow-config-change-without-resume",
         lambda env: [*env.stage("sft", SFT), "--allow-config-change", "train.steps"],
         "--allow-config-change applies to --resume only"),
    Case("recipe-of-another-stage", lambda env: [*env.stage("pretrain", SFT)],
         "stage='sft', but this runs the pretrain stage: run it with `r1moe sft`"),
    Case("override-of-another-stage", lambda env: [*env.stage("sft", SFT, "stage=grpo")],
         "override stage='grpo', but this runs the sft stage"),
    Case("recipe-is-a-list", lambda env: env.stage("sft", str(env.ws / "list.yaml")),
         "list.yaml: a recipe is a mapping of config sections", prepare=lambda env: (env.ws / "list.yaml").write_text(
             "- a\n- b\n")),
    Case("sft-reads-no-rollout", lambda env: env.stage("sft", SFT, "rollout.group_size=3", "algo.beta=0.1"),
         "rollout.group_size=3, algo.beta=0.1: `r1moe sft` does not read these keys"),
    Case("grpo-group-of-one", lambda env: env.stage("grpo", GRPO, "rollout.group_size=1"),
         "rollout.group_size=1: GRPO's advantage is relative"),
    Case("grpo-norm-const-unused", lambda env: env.stage("grpo", GRPO, "algo.norm_const=100"),
         "algo.norm_const=100.0: no effect with algo.agg='seq_mean_group_mean'"),
    Case("grpo-reads-no-mtp", lambda env: env.stage("grpo", GRPO, "train.mtp_weight=0.3"),
         "train.mtp_weight=0.3: `r1moe grpo` does not read this key"),
    Case("grpo-reference-layout", lambda env: env.stage("grpo", GRPO, "parallel.tp=2"),
         "parallel.tp=2: no effect with parallel.backend=reference"),
    Case("sft-prompts-past-seq-len", lambda env: env.stage("sft", SFT, "data.seq_len=4"),
         "no example has a token to train on after truncation at data.seq_len=4"),
    Case("train-device-unknown", lambda env: env.stage("grpo", GRPO, "train.device=tpu"),
         "train.device 'tpu' is not a device torch knows"),
    Case("train-device-absent-gpu", lambda env: env.stage("sft", SFT, "train.device=cuda:99"),
         "train.device 'cuda:99': this machine has"),
    Case("eval-device-unknown", lambda env: env.eval("--device", "tpu"), "device 'tpu' is not a device torch knows"),
    Case("negative-mtp-weight", lambda env: env.stage("pretrain", PRETRAIN, "train.mtp_weight=-1"),
         "train.mtp_weight=-1.0 must be >= 0"),
    # ------------------------------------------------------------------ r1moe eval flags
    Case("eval-flag-samples-0", lambda env: env.eval("--samples", "0"), "argument --samples: must be >= 1, got 0",
         subprocess=True, was="a range() error after loading the model"),
    Case("eval-flag-temperature-negative", lambda env: env.eval("--temperature", "-1"),
         "argument --temperature: must be in [0, inf], got -1", was="accepted"),
    Case("eval-flag-temperature-nan", lambda env: env.eval("--temperature", "nan"),
         "argument --temperature: must be in [0, inf], got nan"),
    Case("eval-flag-top-p-above-1", lambda env: env.eval("--top-p", "1.5"),
         "argument --top-p: must be in (0, 1], got 1.5", was="accepted"),
    Case("eval-flag-top-p-0", lambda env: env.eval("--top-p", "0"), "argument --top-p: must be in (0, 1], got 0"),
    Case("eval-flag-max-new-tokens-0", lambda env: env.eval("--max-new-tokens", "0"),
         "argument --max-new-tokens: must be >= 1, got 0"),
    Case("eval-flag-max-questions-negative", lambda env: env.eval("--max-questions", "-2"),
         "argument --max-questions: must be >= 0, got -2", was="silently dropped the last 2 questions"),
    # ------------------------------------------------------------------ checkpoints
    Case("eval-truncated-safetensors", lambda env: env.eval(checkpoint=env.ws / "ckpt"),
         lambda env: f"{env.ws / 'ckpt' / 'model.safetensors'}: not a readable safetensors file",
         prepare=_truncate_weights, subprocess=True, was="SafetensorError traceback, exit 1"),
    Case("eval-garbled-safetensors", lambda env: env.eval(checkpoint=env.ws / "ckpt"),
         lambda env: f"{env.ws / 'ckpt' / 'model.safetensors'}: not a readable safetensors file",
         prepare=_garble_weights, was="SafetensorError traceback, exit 1"),
    Case("eval-nan-in-tensor-bytes", lambda env: env.eval(checkpoint=env.ws / "ckpt"),
         lambda env: f"{env.ws / 'ckpt' / 'model.safetensors'}: tensor 'model.norm.weight' holds NaN/inf",
         prepare=_nan_weights, was="loaded silently; every sample was garbage"),
    Case("sft-init-nan-in-tensor-bytes", lambda env: env.stage("sft", SFT, f"model.init={env.ws / 'ckpt'}"),
         "tensor 'model.norm.weight' holds NaN/inf", prepare=_nan_weights,
         was="trained from NaN weights, wrote a NaN final/ and DONE.json"),
    Case("grpo-init-truncated-safetensors", lambda env: env.stage("grpo", GRPO, f"model.init={env.ws / 'ckpt'}"),
         "not a readable safetensors file", prepare=_truncate_weights),
    # ------------------------------------------------------------------ eval prompt longer than the context
    Case("eval-prompt-beyond-context", lambda env: env.eval(data=env.ws / "long.jsonl"),
         "question 1 (id 'q-long') has a", prepare=_long_prompt, was="tried to allocate a ~90 GB cache"),
    # ------------------------------------------------------------------ where results go
    Case("run-dir-unwritable",
         lambda env: env.stage("sft", SFT, f"logging.run_dir={_unwritable(env) / 'run'}"),
         "cannot write the run directory", subprocess=True, was="PermissionError traceback"),
    Case("run-dir-is-a-file", lambda env: env.stage("sft", SFT, f"logging.run_dir={_file_at(env, 'run')}"),
         lambda env: f"logging.run_dir={env.ws / 'run'}: cannot write the run directory"),
    Case("eval-out-is-a-directory", lambda env: env.eval("--out", str(env.ws / "outdir")),
         lambda env: f"--out {env.ws / 'outdir'}: is a directory", prepare=lambda env: (env.ws / "outdir").mkdir(),
         subprocess=True, was="IsADirectoryError traceback after the whole evaluation, a stray .outdir.tmp"),
    Case("eval-out-unwritable", lambda env: env.eval("--out", str(_unwritable(env) / "res.json")),
         "cannot write there"),
    Case("eval-out-under-a-file", lambda env: env.eval("--out", str(_file_at(env, "f") / "res.json")),
         "is not a writable directory"),
]


# ---------------------------------------------------------------------------------------------- fixtures + runner
@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Good data and a good tiny checkpoint (one pretraining step: a real HF directory with tokenizer.json)."""
    from r1moe.config import load_config
    from r1moe.train import pretrain

    d = tmp_path_factory.mktemp("good")
    write_jsonl(d / "prompts.jsonl", make_dataset("arithmetic", 4, seed=0))
    write_jsonl(d / "sft.jsonl", make_cold_start(make_dataset("arithmetic", 4, seed=1)))
    write_jsonl(d / "corpus.jsonl", make_corpus("arithmetic", 20, seeds=[2]))
    write_jsonl(d / "pairs.jsonl", make_preference_pairs(4, seed=3, template="chat"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = load_config(ROOT / PRETRAIN, [f"logging.run_dir={d / 'base'}", "logging.wandb=disabled",
                                        "logging.plots=false", f"data.train={d / 'corpus.jsonl'}", "train.steps=1",
                                        "train.batch_size=2", "data.seq_len=128"])
    pretrain.run(cfg)
    torch.set_num_threads(before)
    return d / "base" / "final", d


def _snapshot(root: Path) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), root) + "/"] = None
        for name in filenames:
            p = os.path.join(dirpath, name)
            out[os.path.relpath(p, root)] = Path(p).read_bytes()
    return out


def _run(argv: list[str], in_subprocess: bool, capsys) -> tuple[int, str]:
    if in_subprocess:
        p = subprocess.run([sys.executable, "-m", "r1moe.cli", *argv], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120, check=False)
        return p.returncode, p.stderr
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse: what the real command exits with
        rc = e.code
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_2_with_a_clear_line_and_writes_nothing(case, shared, tmp_path, capsys, one_thread):
    ckpt, data = shared
    env = Env(ws=tmp_path / "ws", ckpt=ckpt, data=data)
    env.ws.mkdir()
    case.prepare(env)
    argv = case.argv(env)
    before = _snapshot(env.ws)
    rc, err = _run(argv, case.subprocess, capsys)
    expect = case.expect(env) if callable(case.expect) else case.expect
    assert rc == 2, err
    assert expect in err, err
    assert "Traceback" not in err
    assert f"r1moe {argv[0]}: error:" in err
    assert _snapshot(env.ws) == before  # nothing half-written: no run dir, no temp file, no --out

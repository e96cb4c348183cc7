"""The SLURM launchers (slurm/*.sh): a real stage-2 GRPO run through `bash slurm/r1_stage2.sh` outside SLURM on CPU,
the trainer's failure status passed through, and the rendezvous each launcher resolves under SLURM, checked with small
stand-ins for `scontrol`, `srun`, `nvidia-smi` and the interpreter on PATH (they print what they were asked to run).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "slurm"
LAUNCHERS = ["pretrain.sh", "r1_stage1.sh", "r1_stage2.sh", "r1_stage3.sh", "r1_stage4.sh", "distill.sh", "eval.sh",
             "rm.sh", "pipeline.sh"]
TINY_STAGE2 = ROOT / "recipes/tiny/r1/stage2.yaml"
V3_STAGE2 = ROOT / "recipes/deepseek-v3/r1/stage2_reasoning_rl.yaml"
TINY_ZERO_GRPO = ROOT / "recipes/tiny/r1_zero/grpo.yaml"


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without anything a launcher reads from SLURM or from the user."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "R1MOE_")) and k not in ("GPUS_PER_NODE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(extra)
    return env


def launch(script: str, *args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SLURM / script), *map(str, args)], check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------- a real run
@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory) -> dict[str, Path]:
    """A random tiny-moe checkpoint with the tiny tokenizer, and a few arithmetic prompts."""
    from r1moe.data import make_dataset, write_jsonl
    from r1moe.data.tokenizer import build_tiny_tokenizer, default_corpus
    from r1moe.model import build_model, get_preset, save_pretrained

    d = tmp_path_factory.mktemp("slurm_inputs")
    tok = build_tiny_tokenizer(default_corpus(num_per_task=20), vocab_size=512)
    save_pretrained(build_model(get_preset("tiny-moe"), seed=0), d / "base", tokenizer=tok)
    write_jsonl(d / "prompts.jsonl", make_dataset("arithmetic", 8, seed=0))
    return {"base": d / "base", "prompts": d / "prompts.jsonl"}


def stage2_recipe(tmp_path: Path) -> Path:
    """recipes/tiny/r1/stage2.yaml once it exists; until then an equivalent tiny stage-2 recipe."""
    if TINY_STAGE2.is_file():
        return TINY_STAGE2
    recipe = tmp_path / "stage2.yaml"
    recipe.write_text(
        "name: test-stage2\nstage: grpo\n"
        "data: {template: chat, max_prompt_tokens: 256}\n"
        "rollout: {group_size: 2, temperature: 1.0, max_new_tokens: 8, stop: []}\n"
        "algo: {beta: 0.001, eps_low: 10.0, num_minibatches: 1}\n"
        "rewards: {weights: {accuracy: 1.0, format: 1.0, language: 1.0}}\n"
        "optim: {lr: 1.0e-4}\n")
    return recipe


def test_stage2_launcher_runs_outside_slurm_on_cpu(tmp_path, tiny_inputs):
    run_dir = tmp_path / "run"
    overrides = [
        f"model.init={tiny_inputs['base']}", "model.dtype=float32", "parallel.backend=reference",
        f"data.train={tiny_inputs['prompts']}", "data.eval=null", "data.tokenizer=null", "data.max_prompt_tokens=512",
        "train.steps=1", "train.batch_size=2", "train.device=cpu", "train.threads=1", "train.eval_every=0",
        "rollout.engine=builtin", "rollout.group_size=2", "rollout.max_new_tokens=8", "rollout.micro_batch_size=0",
        "algo.num_minibatches=1", "algo.ref_refresh_every=0", "rewards.reward_model=null", "checkpoint.every=0",
        f"logging.run_dir={run_dir}", "logging.wandb=disabled", "logging.plots=false",
    ]
    proc = launch("r1_stage2.sh", stage2_recipe(tmp_path), *overrides, env=clean_env(WANDB_MODE="disabled"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "r1moe.train.grpo: one process" in proc.stderr
    done = json.loads((run_dir / "DONE.json").read_text())
    assert done["stage"] == "grpo" and done["steps"] == 1
    assert (run_dir / "final" / "config.json").is_file() and (run_dir / "final" / "tokenizer.json").is_file()
    assert (run_dir / "config.yaml").is_file()
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1]


@pytest.mark.parametrize("args, message", [
    (["recipes/tiny/no_such_recipe.yaml"], "recipe not found"),
    ([str(TINY_ZERO_GRPO), "train.stepz=1"], "stepz"),
])
def test_failing_trainer_fails_the_launcher(args, message):
    proc = launch("r1_stage2.sh", *args, env=clean_env())
    assert proc.returncode != 0
    assert message in proc.stderr


@pytest.mark.parametrize("script", LAUNCHERS)
def test_launcher_without_arguments_is_a_usage_error(script):
    proc = launch(script, env=clean_env())
    assert proc.returncode == 2
    assert "usage: bash slurm/" in proc.stderr


# ---------------------------------------------------------------------------------------------- the scripts
@pytest.mark.parametrize("script", LAUNCHERS)
def test_launcher_header_and_hygiene(script):
    text = (SLURM / script).read_text()
    subprocess.run(["bash", "-n", str(SLURM / script)], check=True)
    header = re.findall(r"^#SBATCH (--[a-z-]+)=(\S+)", text, flags=re.MULTILINE)
    opts = dict(header)
    for needed in ("--nodes", "--gpus-per-node", "--time", "--output", "--ntasks-per-node"):
        assert needed in opts, f"{script}: no #SBATCH {needed}"
    assert opts["--ntasks-per-node"] == "1", "one torchrun per node"
    # sbatch reads #SBATCH lines only before the first command
    first_command = next(i for i, line in enumerate(text.splitlines()[1:], 1)
                         if line.strip() and not line.startswith("#"))
    assert all(i < first_command for i, line in enumerate(text.splitlines()) if line.startswith("#SBATCH"))
    assert "sbatch --nodes" in text or "overridable" in text
    assert "source \"$_dir/common.sh\"" in text


def test_no_launcher_kills_by_name():
    for path in SLURM.glob("*"):
        words = set(re.findall(r"[a-z]+", path.read_text()))
        assert not {"pkill", "killall"} & words, path


# ---------------------------------------------------------------------------------------------- rendezvous
@pytest.fixture
def fake_bin(tmp_path) -> Path:
    """scontrol lists two hosts; srun prints its command line, then runs the command as node 1 of the job (its
    options stripped); nvidia-smi lists two GPUs; `python` prints its arguments, except `python -` (the launcher's
    recipe query), which goes to the real interpreter."""
    b = tmp_path / "bin"
    b.mkdir()
    scripts = {
        "scontrol": '[[ "$1 $2" == "show job" ]] && { echo "   Command=$FAKE_SUBMITTED_SCRIPT x.yaml"; exit 0; }\n'
                    '[[ "$1 $2" == "show hostnames" ]] || exit 3\nprintf "gpu-node-07\\ngpu-node-08\\n"\n',
        "srun": 'echo "SRUN $*"\nwhile [[ $# -gt 0 && $1 == --* ]]; do shift; done\nSLURM_NODEID=1 exec "$@"\n',
        "nvidia-smi": '[[ "$1" == "-L" ]] || exit 3\necho "GPU 0: NVIDIA H100 (UUID: GPU-a)"\n'
                      'echo "GPU 1: NVIDIA H100 (UUID: GPU-b)"\n',
        "python": f'if [[ "${{1:-}}" == "-" ]]; then exec {shlex.quote(sys.executable)} "$@"; fi\necho "PY $*"\n',
    }
    for name, body in scripts.items():
        (b / name).write_text("#!/bin/bash\n" + body)
        (b / name).chmod(0o755)
    return b


def slurm_env(fake_bin: Path, **extra: str) -> dict[str, str]:
    return clean_env(**{"PATH": f"{fake_bin}:{os.environ['PATH']}", "R1MOE_PYTHON": str(fake_bin / "python"),
                        "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu-node-[07-08]",
                        "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_ON_NODE": "64", "SLURM_SUBMIT_DIR": str(ROOT),
                        **extra})


def test_megatron_recipe_under_slurm_starts_torchrun_on_every_node(fake_bin):
    proc = launch("r1_stage2.sh", V3_STAGE2, "train.steps=2", "--resume", env=slurm_env(fake_bin))
    assert proc.returncode == 0, proc.stderr
    srun, py = proc.stdout.splitlines()
    assert srun.startswith("SRUN --nodes=2 --ntasks=2 --ntasks-per-node=1 --cpus-per-task=64 ")
    # the node rank is read inside the srun task (the stand-in srun runs it as node 1)
    assert py == ("PY -m torch.distributed.run --node_rank=1 --nnodes=2 --nproc_per_node=8 "
                  "--master_addr=gpu-node-07 --master_port=24242 "
                  f"-m r1moe.train.grpo {V3_STAGE2} train.steps=2 --resume")


@pytest.mark.parametrize("how", ["job record", "R1MOE_ROOT"])
def test_sbatch_spool_copy_finds_the_repository(fake_bin, tmp_path, how):
    """sbatch runs a copy of the script from its spool directory, in the submit directory (here not the repository):
    common.sh is found next to the submitted script (scontrol's Command=) or under R1MOE_ROOT."""
    spool = tmp_path / "spool"
    spool.mkdir()
    copy = spool / "slurm_script"
    copy.write_text((SLURM / "r1_stage2.sh").read_text())
    extra = ({"FAKE_SUBMITTED_SCRIPT": str(SLURM / "r1_stage2.sh")} if how == "job record"
             else {"R1MOE_ROOT": str(ROOT), "FAKE_SUBMITTED_SCRIPT": "/nowhere/slurm/r1_stage2.sh"})
    proc = subprocess.run(["bash", str(copy), V3_STAGE2], check=False, cwd=tmp_path,
                          env=slurm_env(fake_bin, SLURM_SUBMIT_DIR=str(tmp_path), **extra),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--master_addr=gpu-node-07" in proc.stdout


def test_sbatch_spool_copy_without_the_repository_is_a_clear_error(fake_bin, tmp_path):
    copy = tmp_path / "slurm_script"
    copy.write_text((SLURM / "r1_stage1.sh").read_text())
    env = slurm_env(fake_bin, SLURM_SUBMIT_DIR=str(tmp_path), FAKE_SUBMITTED_SCRIPT="/nowhere/slurm/r1_stage1.sh")
    proc = subprocess.run(["bash", str(copy), V3_STAGE2], check=False, cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("slurm/r1_stage1.sh: slurm/common.sh not found; "
                                   "set R1MOE_ROOT=/path/to/r1moe")


def test_reference_recipe_under_slurm_is_one_process(fake_bin):
    proc = launch("r1_stage1.sh", TINY_ZERO_GRPO, "train.steps=2", env=slurm_env(fake_bin))
    assert proc.returncode == 0, proc.stderr
    srun, py = proc.stdout.splitlines()
    assert srun.startswith("SRUN --nodes=1 --ntasks=1 ")
    assert py == f"PY -m r1moe.train.sft {TINY_ZERO_GRPO} train.steps=2"


def test_megatron_recipe_outside_slurm_uses_the_local_gpus(fake_bin):
    env = clean_env(PATH=f"{fake_bin}:{os.environ['PATH']}", R1MOE_PYTHON=str(fake_bin / "python"))
    proc = launch("r1_stage4.sh", V3_STAGE2, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ("PY -m torch.distributed.run --node_rank=0 --nnodes=1 --nproc_per_node=2 "
                                   f"--master_addr=127.0.0.1 --master_port=29500 -m r1moe.train.grpo {V3_STAGE2}")


def test_no_gpus_means_plain_python(fake_bin):
    env = clean_env(PATH=f"{fake_bin}:{os.environ['PATH']}", R1MOE_PYTHON=str(fake_bin / "python"),
                    GPUS_PER_NODE="0")
    proc = launch("distill.sh", V3_STAGE2, "train.epochs=1", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"PY -m r1moe.train.sft {V3_STAGE2} train.epochs=1"


def test_eval_passes_its_arguments_through(fake_bin):
    args = ["--checkpoint", "runs/x/final", "--data", "data/aime.jsonl", "--samples", "64", "--top-p", "0.95"]
    proc = launch("eval.sh", *args, env=slurm_env(fake_bin, SLURM_NNODES="1"))
    assert proc.returncode == 0, proc.stderr
    srun, py = proc.stdout.splitlines()
    assert srun.startswith("SRUN --nodes=1 --ntasks=1 ")
    assert py == "PY -m r1moe.evaluate " + " ".join(args)


def test_dry_run_prints_the_command_and_runs_nothing(tmp_path):
    run_dir = tmp_path / "never"
    proc = launch("r1_stage2.sh", TINY_ZERO_GRPO, f"logging.run_dir={run_dir}",
                  env=clean_env(R1MOE_DRY_RUN="1", GPUS_PER_NODE="0"))
    assert proc.returncode == 0, proc.stderr
    assert shlex.split(proc.stdout)[1:] == ["-m", "r1moe.train.grpo", str(TINY_ZERO_GRPO), f"logging.run_dir={run_dir}"]
    assert not run_dir.exists()


def test_trainer_exit_status_survives_torchrun(tmp_path):
    """A megatron recipe starts real torchrun (one CPU rank here); the trainer's bad-input status 2 reaches the
    launcher's caller instead of torchrun's 1."""
    recipe = ROOT / "recipes/deepseek-v3/distill/qwen2.5-1.5b.yaml"
    missing = tmp_path / "no_such_data.jsonl"
    proc = launch("distill.sh", recipe, f"data.train={missing}", f"logging.run_dir={tmp_path / 'run'}",
                  env=clean_env(GPUS_PER_NODE="1", R1MOE_PYTHON=sys.executable, TMPDIR=str(tmp_path)), timeout=300)
    assert "r1moe.train.sft: torchrun, nodes=1 x 1 GPUs" in proc.stderr
    assert str(missing) in proc.stderr
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert not list(tmp_path.glob("r1moe-status.*")), "the launcher leaves no status file behind"

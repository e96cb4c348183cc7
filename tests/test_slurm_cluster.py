"""slurm/README.md's tiny CPU chain on a real SLURM cluster: the README's `r1moe data make` and `sbatch` commands
(pretrain -> stage 1 -> stage 2, each `--dependency=afterok` on the one before), submitted from a directory outside
the repository, with small `--n` and `train.steps` overrides; then a job whose trainer rejects its input.

The cluster is one node of Debian's slurm-wlm (munged + slurmctld + slurmd) that `.ci/run` starts with
`.ci/slurm.sh up DIR` and stops afterwards; SLURM_CONF points at it. Without a reachable cluster the tests skip,
saying how to start one, unless R1MOE_REQUIRE_SLURM=1 (set by .ci/run), where they fail.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "slurm/README.md"
TIMEOUT_S = 900

# what the README's commands become here: cheap enough for CI, the same programs and files
SMALL_N = {"corpus": "300", "cold_start": "16", "train.jsonl": "8", "eval.jsonl": "4"}
OVERRIDES = {
    "pretrain.sh": ["train.steps=2", "train.batch_size=2", "train.threads=1", "data.seq_len=128"],
    "r1_stage1.sh": ["train.epochs=null", "train.steps=2", "train.batch_size=2", "train.threads=1",
                     "data.seq_len=128"],
    "r1_stage2.sh": ["train.steps=1", "train.batch_size=2", "train.threads=1", "rollout.group_size=2",
                     "rollout.max_new_tokens=8", "data.eval=null"],
}


def _cluster_or_skip() -> None:
    how = 'start one with: eval "$(bash .ci/slurm.sh up /tmp/r1moe-slurm)" (what .ci/run does)'
    problem = None
    if shutil.which("sbatch") is None:
        problem = f"needs SLURM (sbatch not found); {how}"
    else:
        proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30, check=False)
        if proc.returncode != 0 or "idle" not in proc.stdout.split():
            problem = f"needs an idle SLURM node (sinfo: {(proc.stdout + proc.stderr).strip()!r}); {how}"
    if problem is None:
        return
    if os.environ.get("R1MOE_REQUIRE_SLURM") == "1":
        pytest.fail(problem)
    pytest.skip(problem)


@pytest.fixture(scope="module")
def job_env() -> dict[str, str]:
    _cluster_or_skip()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "R1MOE_")) or k == "SLURM_CONF"}
    env.update(R1MOE_PYTHON=sys.executable, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    return env


def readme_chain() -> tuple[list[list[str]], str, list[tuple[str, list[str]]]]:
    """(data make commands, the $S sbatch prefix, [(job variable, sbatch arguments after $S)]) of the README's
    tiny CPU chain."""
    block = README.read_text().split("## The tiny R1 stages as a SLURM chain on CPU", 1)[1].split("```bash", 1)[1]
    block = block.split("```", 1)[0]
    data = [shlex.split(line) for line in block.splitlines() if line.startswith("r1moe data make ")]
    prefix = re.search(r'^S="(.+)"$', block, flags=re.MULTILINE).group(1)
    jobs = [(m.group(1), shlex.split(m.group(2)))
            for m in re.finditer(r"^(j\d)=\$\(\$S (.+)\)$", block, flags=re.MULTILINE)]
    return data, prefix, jobs


def small(cmd: list[str]) -> list[str]:
    out_name = Path(cmd[cmd.index("--out") + 1]).name
    key = cmd[3] if cmd[3] in SMALL_N else out_name
    cmd = list(cmd)
    cmd[cmd.index("--n") + 1] = SMALL_N[key]
    return cmd


def job_record(job_id: str, env: dict[str, str]) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, env=env,
                         check=True, timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for(job_ids: list[str], env: dict[str, str]) -> dict[str, dict[str, str]]:
    deadline = time.monotonic() + TIMEOUT_S
    final = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL")
    while True:
        records = {j: job_record(j, env) for j in job_ids}
        if all(r["JobState"] in final for r in records.values()):
            return records
        if time.monotonic() > deadline:
            subprocess.run(["scancel", *job_ids], env=env, check=False)
            pytest.fail(f"jobs not finished after {TIMEOUT_S}s: {records}")
        time.sleep(2)


def test_readme_chain_runs_to_completion_from_another_directory(tmp_path, job_env):
    data, prefix, jobs = readme_chain()
    assert [Path(args[-2]).name for _, args in jobs] == ["pretrain.sh", "r1_stage1.sh", "r1_stage2.sh"]
    assert len(data) == 4
    before = sorted(ROOT.glob("slurm-*.out"))
    for cmd in data:
        proc = subprocess.run([sys.executable, "-m", "r1moe.cli", *small(cmd)[1:]], cwd=tmp_path, env=job_env,
                              capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr

    ids: dict[str, str] = {}
    for var, args in jobs:
        args = [re.sub(r"\$(j\d)", lambda m: ids[m.group(1)], a) for a in args]
        script, recipe = ROOT / args[-2], ROOT / args[-1]  # submitted from tmp_path, outside the repository
        cmd = [*shlex.split(prefix), *args[:-2], str(script), str(recipe), *OVERRIDES[script.name]]
        proc = subprocess.run(cmd, cwd=tmp_path, env=job_env, capture_output=True, text=True, timeout=60,
                              check=False)
        assert proc.returncode == 0, proc.stderr
        ids[var] = proc.stdout.strip().split(";")[0]

    records = wait_for(list(ids.values()), job_env)
    logs = {name: (tmp_path / f"slurm-{r['JobName']}-{j}.out") for name, j in ids.items() for r in [records[j]]}
    for var, job_id in ids.items():
        r = records[job_id]
        log = logs[var].read_text() if logs[var].is_file() else "(no log)"
        assert (r["JobState"], r["ExitCode"]) == ("COMPLETED", "0:0"), f"{var} {r}\n{log[-3000:]}"
    assert "[r1moe] r1moe.train.pretrain: one process" in logs["j0"].read_text()
    assert "[r1moe] r1moe.train.sft: one process" in logs["j1"].read_text()
    assert "[r1moe] r1moe.train.grpo: one process" in logs["j2"].read_text()

    # each job started only after the one before it had ended
    for earlier, later in (("j0", "j1"), ("j1", "j2")):
        assert records[ids[later]]["StartTime"] >= records[ids[earlier]]["EndTime"]

    runs = tmp_path / "runs/tiny-r1"
    for stage, expected_steps in (("base", 2), ("stage1", 2), ("stage2", 1)):
        done = (runs / stage / "DONE.json").read_text()
        assert f'"steps": {expected_steps}' in done, done
        assert (runs / stage / "final/config.json").is_file()
        assert (runs / stage / "final/tokenizer.json").is_file()
        assert (runs / stage / "metrics.jsonl").read_text().count("\n") == expected_steps
    assert (runs / "stage1/loss.png").is_file()
    assert sorted(ROOT.glob("slurm-*.out")) == before, "job logs belong in the submit directory"


def test_bad_input_fails_the_job_with_status_2(tmp_path, job_env):
    recipe = ROOT / "recipes/tiny/r1/stage2.yaml"
    proc = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", str(ROOT / "slurm/r1_stage2.sh"),
                           str(recipe), "train.stepz=1"], cwd=tmp_path, env=job_env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    record = wait_for([job_id], job_env)[job_id]
    assert (record["JobState"], record["ExitCode"]) == ("FAILED", "2:0"), record
    log = (tmp_path / f"slurm-{record['JobName']}-{job_id}.out").read_text()
    assert "r1moe grpo: error:" in log and "stepz" in log, log

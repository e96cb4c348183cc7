# shellcheck shell=bash
# Sourced by every launcher in slurm/: resolve the interpreter, the rendezvous and the process layout, then
# `r1moe_launch MODE MODULE ARGS...` runs the job; the launcher exits with its status (under torchrun the
# trainer's own status, not torchrun's 1).
# No training logic lives here, and nothing is ever killed by name.
#
# Rendezvous (torchrun's static one: every rank's place is fixed, which megatron's TP/EP/PP grid relies on):
#   under SLURM (SLURM_JOB_ID set)   MASTER_ADDR = first host of `scontrol show hostnames $SLURM_JOB_NODELIST`
#                                    MASTER_PORT = 20000 + SLURM_JOB_ID % 20000 (jobs sharing a node differ)
#                                    NNODES = SLURM_NNODES; node rank = SLURM_NODEID, read inside each srun task
#                                    one srun task per node, each running `torchrun --nproc_per_node=GPUS_PER_NODE`
#   outside SLURM                    one node: MASTER_ADDR=127.0.0.1, MASTER_PORT=29500, node rank 0, no srun
# GPUS_PER_NODE = $GPUS_PER_NODE if set, else SLURM_GPUS_ON_NODE, else the GPUs `nvidia-smi -L` lists, else 0.
#
# Process layout, decided by what the job can use:
#   torchrun on every node with GPUS_PER_NODE ranks   recipe jobs whose parallel.backend is megatron, on GPUs
#   one plain `python -m MODULE` process               no GPUs (CPU), parallel.backend=reference (the pure-PyTorch
#                                                      model runs on one device: more ranks would only repeat the
#                                                      same run into the same directory), and MODE=single
#                                                      (r1moe.evaluate, r1moe.pipeline: single-process programs)
#
# Environment knobs: R1MOE_PYTHON (interpreter; default .venv/bin/python of the repository, else python3),
# GPUS_PER_NODE, MASTER_PORT, R1MOE_DRY_RUN=1 (print the command instead of running it).

set -euo pipefail

# Under sbatch the script runs from a spool copy, so the repository is found from the submit directory.
if [[ -z "${R1MOE_ROOT:-}" ]]; then
    _here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
    if [[ -f "$_here/../r1moe/__init__.py" ]]; then
        R1MOE_ROOT="$(cd "$_here/.." && pwd)"
    else
        R1MOE_ROOT="${SLURM_SUBMIT_DIR:-$PWD}"
    fi
fi

if [[ -n "${R1MOE_PYTHON:-}" ]]; then
    PYTHON="$R1MOE_PYTHON"
elif [[ -x "$R1MOE_ROOT/.venv/bin/python" ]]; then
    PYTHON="$R1MOE_ROOT/.venv/bin/python"
else
    PYTHON="python3"
fi

if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    IN_SLURM=1
    NNODES="${SLURM_NNODES:-1}"
    # sed reads the whole list (head would close the pipe early and, under pipefail, fail the script on SIGPIPE)
    MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"
    MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
else
    IN_SLURM=0
    NNODES=1
    MASTER_ADDR=127.0.0.1
    MASTER_PORT="${MASTER_PORT:-29500}"
fi
export MASTER_ADDR MASTER_PORT

r1moe_gpus_per_node() {
    if [[ -n "${GPUS_PER_NODE:-}" ]]; then
        echo "$GPUS_PER_NODE"
    elif [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        # counts "GPU i: ..." lines only (MIG devices are listed indented under their GPU); no driver -> 0
        { nvidia-smi -L 2>/dev/null || true; } | grep -c '^GPU ' || true
    else
        echo 0
    fi
}

# parallel.backend of RECIPE + overrides, or nothing when the recipe does not load (the trainer then reports why).
r1moe_recipe_backend() {
    "$PYTHON" - "$@" 2>/dev/null <<'PY' || true
import sys
from r1moe.config import load_config
overrides = [a for a in sys.argv[2:] if "=" in a and not a.startswith("-")]
print(load_config(sys.argv[1], overrides).parallel.backend)
PY
}

# srun (Slurm >= 22.05) does not inherit the batch script's CPU count: without it each task, and so all of torchrun's
# ranks on a node, would be bound to one core.
r1moe_srun_cpus() {
    echo "${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}"
}

r1moe_usage() {  # SCRIPT "ARGS DESCRIPTION"
    cat >&2 <<EOF
usage: bash $1 $2
       sbatch [--nodes=N --time=...] $1 $2
       sbatch --nodes=1 --gpus-per-node=0 $1 ...      # a partition without GPUs (tiny recipes on CPU)
       sbatch --nodes=1 --gpus-per-node=1 $1 ...      # one GPU
(the #SBATCH defaults are sized for the real models; slurm/README.md says how to change them)
EOF
    exit 2
}

# r1moe_launch MODE MODULE ARGS...   MODE: recipe (ARGS = RECIPE key=value... [--resume]) | single
r1moe_launch() {
    local mode=$1 module=$2
    shift 2
    local gpus backend=""
    gpus="$(r1moe_gpus_per_node)"
    if [[ "$mode" == recipe && "$gpus" -gt 0 ]]; then
        backend="$(r1moe_recipe_backend "$@")"
    fi
    local -a cmd
    if [[ "$backend" == megatron ]]; then
        local -a rdzv=(--nnodes="$NNODES" --nproc_per_node="$gpus" --master_addr="$MASTER_ADDR"
                       --master_port="$MASTER_PORT" -m "$module" "$@")
        if [[ "$IN_SLURM" == 1 ]]; then
            # one task per node; the node rank is only known inside the task, hence the small bash -c
            cmd=(srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --cpus-per-task="$(r1moe_srun_cpus)"
                 --kill-on-bad-exit=1
                 bash -c 'exec "$0" -m torch.distributed.run --node_rank="$SLURM_NODEID" "$@"' "$PYTHON" "${rdzv[@]}")
        else
            cmd=("$PYTHON" -m torch.distributed.run --node_rank=0 "${rdzv[@]}")
        fi
        echo "[r1moe] $module: torchrun, nodes=$NNODES x $gpus GPUs, rendezvous $MASTER_ADDR:$MASTER_PORT" >&2
    else
        cmd=("$PYTHON" -m "$module" "$@")
        if [[ "$IN_SLURM" == 1 ]]; then
            cmd=(srun --nodes=1 --ntasks=1 --cpus-per-task="$(r1moe_srun_cpus)" "${cmd[@]}")
        fi
        echo "[r1moe] $module: one process (GPUs on node: $gpus, backend: ${backend:-n/a})" >&2
    fi
    if [[ "${R1MOE_DRY_RUN:-0}" == 1 ]]; then
        printf '%q ' "${cmd[@]}"
        echo
        return 0
    fi
    if [[ "$backend" != megatron ]]; then
        exec "${cmd[@]}"
    fi
    # torchrun turns any rank's failure into status 1; rank 0 writes the trainer's own status (2 = bad input) to
    # R1MOE_STATUS_FILE (r1moe.train.common.run_cli), which lives on this node, where rank 0 runs.
    local status_file rc=0
    status_file="$(mktemp "${TMPDIR:-/tmp}/r1moe-status.XXXXXX")"
    R1MOE_STATUS_FILE="$status_file" "${cmd[@]}" || rc=$?
    if [[ $rc -ne 0 && -s "$status_file" ]]; then
        rc="$(cat "$status_file")"
    fi
    rm -f "$status_file"
    exit "$rc"
}

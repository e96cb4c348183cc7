#!/bin/bash
# A pipeline recipe in one process on one node (r1moe.pipeline): the data, rejection-sampling, eval and report
# stages between the training jobs, e.g. stage 3's rejection sampling (R1 v1 §2.3.3, v2 B.3.3):
#
#   sbatch slurm/pipeline.sh recipes/deepseek-v3/r1/stage3_rejection.yaml [--force STAGE]
#   bash   slurm/pipeline.sh recipes/tiny/r1_zero.yaml                        # the whole tiny run, no SLURM
#
# Stages already complete (DONE.json) are skipped, so a resubmitted job continues. Training stages of a real-scale
# model belong in the per-stage launchers (r1_stage*.sh, distill.sh), which start torchrun on every node; here they
# would run in this single process. Chosen: 1 node, 8 GPUs, 2 days; overridable with sbatch --time=... etc.
# Submit from any directory: the job runs there (relative paths in the recipe and the arguments are read from
# it) and the job's log, slurm-<job name>-<job id>.out, lands there.
#SBATCH --job-name=r1-pipeline
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=2-00:00:00
#SBATCH --output=slurm-%x-%j.out

# sbatch runs a spool copy of this file: common.sh is then found under $R1MOE_ROOT, else next to the script as
# submitted (the job record's Command), from whatever directory it was submitted.
_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[[ -f "$_dir/common.sh" || -z "${R1MOE_ROOT:-}" ]] || _dir="$R1MOE_ROOT/slurm"
[[ -f "$_dir/common.sh" || -z "${SLURM_JOB_ID:-}" ]] ||
    _dir="$(dirname "$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null |
                       sed -n 's/^ *Command=//p' | sed 's/\.sh .*/.sh/')")"
if [[ ! -f "$_dir/common.sh" ]]; then
    echo "slurm/pipeline.sh: slurm/common.sh not found; set R1MOE_ROOT=/path/to/r1moe" >&2
    exit 2
fi
# shellcheck source=slurm/common.sh
source "$_dir/common.sh"

[[ $# -ge 1 ]] || r1moe_usage slurm/pipeline.sh "PIPELINE_RECIPE [--force STAGE]"
r1moe_launch single r1moe.pipeline "$@"

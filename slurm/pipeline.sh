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
# Submit from the repository root: the job runs in the submit directory and finds slurm/common.sh there.
#SBATCH --job-name=r1-pipeline
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=2-00:00:00
#SBATCH --output=slurm-%x-%j.out

_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[[ -f "$_dir/common.sh" ]] || _dir="${SLURM_SUBMIT_DIR:-$PWD}/slurm"   # sbatch runs a spool copy of this file
# shellcheck source=slurm/common.sh
source "$_dir/common.sh"

[[ $# -ge 1 ]] || r1moe_usage slurm/pipeline.sh "PIPELINE_RECIPE [--force STAGE]"
r1moe_launch single r1moe.pipeline "$@"

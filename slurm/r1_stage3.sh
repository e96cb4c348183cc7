#!/bin/bash
# DeepSeek-R1 stage 3: SFT of DeepSeek-V3-Base on about 800k rejection-sampled reasoning + non-reasoning samples
# (R1 v1 §2.3.3, v2 B.3.3 and B.4.2).
#
#   sbatch slurm/pipeline.sh  recipes/deepseek-v3/r1/stage3_rejection.yaml    # 1. rejection sampling (a pipeline stage)
#   sbatch slurm/r1_stage3.sh recipes/deepseek-v3/r1/stage3_sft.yaml [key=value ...] [--resume]    # 2. the SFT
#   bash   slurm/r1_stage3.sh recipes/tiny/r1/stage3_sft.yaml                 # one node, no SLURM (CPU or GPUs)
#
# Runs r1moe.train.sft. Rejection sampling is the pipeline's "rejection" stage (r1moe.pipeline, one process), so it
# has its own launcher, slurm/pipeline.sh; this script only trains. #SBATCH values are real-scale defaults, each
# overridable (sbatch --nodes=... --time=...). Chosen: 64 nodes x 8 GPUs as for the other 671B stages; 2 days.
# Submit from the repository root: the job runs in the submit directory and finds slurm/common.sh there.
#SBATCH --job-name=r1-stage3-sft
#SBATCH --nodes=64
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=2-00:00:00
#SBATCH --output=slurm-%x-%j.out

_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[[ -f "$_dir/common.sh" ]] || _dir="${SLURM_SUBMIT_DIR:-$PWD}/slurm"   # sbatch runs a spool copy of this file
# shellcheck source=slurm/common.sh
source "$_dir/common.sh"

[[ $# -ge 1 ]] || r1moe_usage slurm/r1_stage3.sh "RECIPE [key=value ...] [--resume]"
r1moe_launch recipe r1moe.train.sft "$@"

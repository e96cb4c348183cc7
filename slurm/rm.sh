#!/bin/bash
# DeepSeek-R1 reward model (R1 v2 §3.1): Bradley-Terry on preference pairs, for stage 4's R_RM.
#
#   sbatch slurm/rm.sh recipes/deepseek-v3/r1/rm.yaml [key=value ...] [--resume]
#   bash   slurm/rm.sh recipes/tiny/r1/rm.yaml                                # one node, no SLURM (CPU or GPUs)
#
# Runs r1moe.train.rm, which trains on the reference backend only (one process, one device; the megatron reward
# model is not built yet): one node and one GPU is what the job uses, so that is what it asks for. Chosen (the paper
# states no compute for it): 12 hours (66k pairs, 1 epoch, 8K tokens). Each value is overridable (sbatch --time=...).
# Submit from the repository root: the job runs in the submit directory and finds slurm/common.sh there.
#SBATCH --job-name=r1-rm
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --time=12:00:00
#SBATCH --output=slurm-%x-%j.out

_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[[ -f "$_dir/common.sh" ]] || _dir="${SLURM_SUBMIT_DIR:-$PWD}/slurm"   # sbatch runs a spool copy of this file
# shellcheck source=slurm/common.sh
source "$_dir/common.sh"

[[ $# -ge 1 ]] || r1moe_usage slurm/rm.sh "RECIPE [key=value ...] [--resume]"
r1moe_launch recipe r1moe.train.rm "$@"

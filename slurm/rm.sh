#!/bin/bash
# DeepSeek-R1 reward model (R1 v2 §3.1): Bradley-Terry on preference pairs, for stage 4's R_RM.
#
#   sbatch slurm/rm.sh recipes/deepseek-v3/r1/rm.yaml [key=value ...] [--resume]
#   bash   slurm/rm.sh recipes/tiny/r1/rm.yaml                                # one node, no SLURM (CPU or GPUs)
#
# Runs r1moe.train.rm. The #SBATCH values are real-scale defaults, each overridable (sbatch --nodes=... --time=...).
# Chosen (the paper states no compute for it): 64 nodes x 8 GPUs as for the other 671B stages; 12 hours
# (66k pairs, 1 epoch, 8K tokens).
# Submit from the repository root: the job runs in the submit directory and finds slurm/common.sh there.
#SBATCH --job-name=r1-rm
#SBATCH --nodes=64
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=12:00:00
#SBATCH --output=slurm-%x-%j.out

_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[[ -f "$_dir/common.sh" ]] || _dir="${SLURM_SUBMIT_DIR:-$PWD}/slurm"   # sbatch runs a spool copy of this file
# shellcheck source=slurm/common.sh
source "$_dir/common.sh"

[[ $# -ge 1 ]] || r1moe_usage slurm/rm.sh "RECIPE [key=value ...] [--resume]"
r1moe_launch recipe r1moe.train.rm "$@"

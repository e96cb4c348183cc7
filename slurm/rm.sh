#!/bin/bash
# DeepSeek-R1 reward model (R1 v2 §3.1): Bradley-Terry on preference pairs, for stage 4's R_RM.
#
#   sbatch slurm/rm.sh recipes/deepseek-v3/r1/rm.yaml [key=value ...] [--resume]
#   bash   slurm/rm.sh recipes/tiny/r1/rm.yaml                                # one node, no SLURM (CPU or GPUs)
#
# Runs r1moe.train.rm; the real-scale recipe trains on the megatron backend with the 671B layout of the other
# stages. #SBATCH values are real-scale defaults, each overridable (sbatch --nodes=... --time=...). Chosen (the
# paper states no compute for it): 64 nodes x 8 GPUs as for the other 671B stages; 12 hours (66k pairs, 1 epoch,
# 8K tokens). A reference-backend recipe (one device) runs with sbatch --nodes=1 --gpus-per-node=1.
# Submit from any directory: the job runs there (relative paths in the recipe and the arguments are read from
# it) and the job's log, slurm-<job name>-<job id>.out, lands there.
#SBATCH --job-name=r1-rm
#SBATCH --nodes=64
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=12:00:00
#SBATCH --output=slurm-%x-%j.out

# sbatch runs a spool copy of this file: common.sh is then found under $R1MOE_ROOT, else next to the script as
# submitted (the job record's Command), from whatever directory it was submitted.
_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[[ -f "$_dir/common.sh" || -z "${R1MOE_ROOT:-}" ]] || _dir="$R1MOE_ROOT/slurm"
[[ -f "$_dir/common.sh" || -z "${SLURM_JOB_ID:-}" ]] ||
    _dir="$(dirname "$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null |
                       sed -n 's/^ *Command=//p' | sed 's/\.sh .*/.sh/')")"
if [[ ! -f "$_dir/common.sh" ]]; then
    echo "slurm/rm.sh: slurm/common.sh not found; set R1MOE_ROOT=/path/to/r1moe" >&2
    exit 2
fi
# shellcheck source=slurm/common.sh
source "$_dir/common.sh"

[[ $# -ge 1 ]] || r1moe_usage slurm/rm.sh "RECIPE [key=value ...] [--resume]"
r1moe_launch recipe r1moe.train.rm "$@"

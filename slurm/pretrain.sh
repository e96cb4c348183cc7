#!/bin/bash
# Pretraining: next-token prediction (+ MTP, + the aux-loss-free expert-bias update) of a base model (V3 §4).
#
#   sbatch slurm/pretrain.sh RECIPE [key=value ...] [--resume]
#   sbatch --nodes=1 --gpus-per-node=0 slurm/pretrain.sh recipes/tiny/r1/base.yaml     # a partition without GPUs
#   bash   slurm/pretrain.sh recipes/tiny/r1_zero/pretrain.yaml                        # one node, no SLURM
#
# Runs r1moe.train.pretrain. The #SBATCH values are real-scale defaults, each overridable (sbatch --nodes=...
# --time=...). 256 nodes x 8 GPUs: the 2048 H800 on which DeepSeek-V3 was pretrained (V3 §3.1). Chosen: 3 days per
# job; a longer run continues from its last checkpoint with --resume (checkpoint.every > 0).
# Submit from any directory: the job runs there (relative paths in the recipe and the arguments are read from
# it) and the job's log, slurm-<job name>-<job id>.out, lands there.
#SBATCH --job-name=r1-pretrain
#SBATCH --nodes=256
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=3-00:00:00
#SBATCH --output=slurm-%x-%j.out

# sbatch runs a spool copy of this file: common.sh is then found under $R1MOE_ROOT, else next to the script as
# submitted (the job record's Command), from whatever directory it was submitted.
_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[[ -f "$_dir/common.sh" || -z "${R1MOE_ROOT:-}" ]] || _dir="$R1MOE_ROOT/slurm"
[[ -f "$_dir/common.sh" || -z "${SLURM_JOB_ID:-}" ]] ||
    _dir="$(dirname "$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null |
                       sed -n 's/^ *Command=//p' | sed 's/\.sh .*/.sh/')")"
if [[ ! -f "$_dir/common.sh" ]]; then
    echo "slurm/pretrain.sh: slurm/common.sh not found; set R1MOE_ROOT=/path/to/r1moe" >&2
    exit 2
fi
# shellcheck source=slurm/common.sh
source "$_dir/common.sh"

[[ $# -ge 1 ]] || r1moe_usage slurm/pretrain.sh "RECIPE [key=value ...] [--resume]"
r1moe_launch recipe r1moe.train.pretrain "$@"

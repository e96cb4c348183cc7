#!/bin/bash
# DeepSeek-R1 stage 1: cold-start SFT of DeepSeek-V3-Base on long-CoT data (R1 v1 §2.3.1, v2 B.4.2).
#
#   sbatch slurm/r1_stage1.sh recipes/deepseek-v3/r1/stage1_cold_start.yaml [key=value ...] [--resume]
#   bash   slurm/r1_stage1.sh recipes/tiny/r1/stage1_cold_start.yaml        # one node, no SLURM (CPU or GPUs)
#
# Runs r1moe.train.sft. The #SBATCH values below are the real-scale defaults; every one is overridable on the
# command line (sbatch --nodes=16 --time=04:00:00 ...). Chosen (the paper states no per-stage compute): 64 nodes x 8
# GPUs = 512, the cluster size R1 reports for its RL (64x8 H800, v2 B.4.4); the 671B layout of the recipe
# (tp 8, pp 4, ep 32) needs 128 GPUs, and 512 let the distributed optimizer shard the expert states 4 ways.
# Submit from any directory: the job runs there (relative paths in the recipe and the arguments are read from
# it) and the job's log, slurm-<job name>-<job id>.out, lands there.
#SBATCH --job-name=r1-stage1-cold-start
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
    echo "slurm/r1_stage1.sh: slurm/common.sh not found; set R1MOE_ROOT=/path/to/r1moe" >&2
    exit 2
fi
# shellcheck source=slurm/common.sh
source "$_dir/common.sh"

[[ $# -ge 1 ]] || r1moe_usage slurm/r1_stage1.sh "RECIPE [key=value ...] [--resume]"
r1moe_launch recipe r1moe.train.sft "$@"

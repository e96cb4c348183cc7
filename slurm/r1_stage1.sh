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
# Submit from the repository root: the job runs in the submit directory and finds slurm/common.sh there.
#SBATCH --job-name=r1-stage1-cold-start
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

[[ $# -ge 1 ]] || r1moe_usage slurm/r1_stage1.sh "RECIPE [key=value ...] [--resume]"
r1moe_launch recipe r1moe.train.sft "$@"

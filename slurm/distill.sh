#!/bin/bash
# Distillation (R1 v1 §2.4, v2 B.4.3): SFT of a dense student (Qwen2.5 / Llama) on the 800k R1 samples; no RL.
#
#   sbatch slurm/distill.sh recipes/deepseek-v3/distill/qwen2.5-7b.yaml [key=value ...] [--resume]
#   sbatch --nodes=1 slurm/distill.sh recipes/deepseek-v3/distill/qwen2.5-1.5b.yaml
#   bash   slurm/distill.sh recipes/tiny/r1/distill.yaml                      # one node, no SLURM (CPU or GPUs)
#
# Runs r1moe.train.sft. The #SBATCH default fits the largest student (Llama-3.3-70B: tp 8 x pp 4 = 32 GPUs per
# replica, 8 nodes = 2 replicas); override per student with sbatch --nodes=N. Chosen node counts (the paper states
# none): 1.5B, 7B, 8B: 2 nodes; 14B: 4; 32B: 4; 70B: 8. Chosen: 2 days.
# Submit from the repository root: the job runs in the submit directory and finds slurm/common.sh there.
#SBATCH --job-name=r1-distill
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=2-00:00:00
#SBATCH --output=slurm-%x-%j.out

_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[[ -f "$_dir/common.sh" ]] || _dir="${SLURM_SUBMIT_DIR:-$PWD}/slurm"   # sbatch runs a spool copy of this file
# shellcheck source=slurm/common.sh
source "$_dir/common.sh"

[[ $# -ge 1 ]] || r1moe_usage slurm/distill.sh "RECIPE [key=value ...] [--resume]"
r1moe_launch recipe r1moe.train.sft "$@"

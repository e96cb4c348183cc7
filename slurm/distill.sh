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
# Submit from any directory: the job runs there (relative paths in the recipe and the arguments are read from
# it) and the job's log, slurm-<job name>-<job id>.out, lands there.
#SBATCH --job-name=r1-distill
#SBATCH --nodes=8
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
    echo "slurm/distill.sh: slurm/common.sh not found; set R1MOE_ROOT=/path/to/r1moe" >&2
    exit 2
fi
# shellcheck source=slurm/common.sh
source "$_dir/common.sh"

[[ $# -ge 1 ]] || r1moe_usage slurm/distill.sh "RECIPE [key=value ...] [--resume]"
r1moe_launch recipe r1moe.train.sft "$@"

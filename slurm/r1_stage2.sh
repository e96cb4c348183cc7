#!/bin/bash
# DeepSeek-R1 stage 2: reasoning-oriented RL, GRPO from the cold-start checkpoint (R1 v1 §2.3.2, v2 §3.2.1).
#
#   sbatch slurm/r1_stage2.sh recipes/deepseek-v3/r1/stage2_reasoning_rl.yaml [key=value ...] [--resume]
#   bash   slurm/r1_stage2.sh recipes/tiny/r1/stage2.yaml                     # one node, no SLURM (CPU or GPUs)
#
# Runs r1moe.train.grpo. The #SBATCH values are real-scale defaults, each overridable (sbatch --nodes=... --time=...).
# 64 nodes x 8 GPUs: the 64x8 H800 on which R1 reports its RL runs (v2 B.4.4: R1-Zero about 198 h, R1 about 80 h).
# Chosen: 3 days per job; a longer run continues from its last checkpoint with --resume (checkpoint.every > 0).
# Submit from any directory: the job runs there (relative paths in the recipe and the arguments are read from
# it) and the job's log, slurm-<job name>-<job id>.out, lands there.
#SBATCH --job-name=r1-stage2-reasoning-rl
#SBATCH --nodes=64
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
    echo "slurm/r1_stage2.sh: slurm/common.sh not found; set R1MOE_ROOT=/path/to/r1moe" >&2
    exit 2
fi
# shellcheck source=slurm/common.sh
source "$_dir/common.sh"

[[ $# -ge 1 ]] || r1moe_usage slurm/r1_stage2.sh "RECIPE [key=value ...] [--resume]"
r1moe_launch recipe r1moe.train.grpo "$@"

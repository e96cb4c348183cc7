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
# Submit from any directory: the job runs there (relative paths in the recipe and the arguments are read from
# it) and the job's log, slurm-<job name>-<job id>.out, lands there.
#SBATCH --job-name=r1-stage3-sft
#SBATCH --nodes=64
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
    echo "slurm/r1_stage3.sh: slurm/common.sh not found; set R1MOE_ROOT=/path/to/r1moe" >&2
    exit 2
fi
# shellcheck source=slurm/common.sh
source "$_dir/common.sh"

[[ $# -ge 1 ]] || r1moe_usage slurm/r1_stage3.sh "RECIPE [key=value ...] [--resume]"
r1moe_launch recipe r1moe.train.sft "$@"

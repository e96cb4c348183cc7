#!/bin/bash
# Evaluation as the paper does it (R1 v2 D.1): K samples per question at T=0.6, top-p 0.95; pass@1, cons@K.
#
#   sbatch slurm/eval.sh --checkpoint runs/deepseek-r1/stage4_all_scenario_rl/final --data data/aime2024.jsonl \
#       --samples 64 --temperature 0.6 --top-p 0.95 --max-new-tokens 32768 --template chat --out results.json
#   bash   slurm/eval.sh --checkpoint runs/tiny-r1/grpo/final --data runs/tiny-r1/data/eval.jsonl --samples 4
#
# Runs r1moe.evaluate with the arguments exactly as given (it takes --checkpoint/--data, not a recipe). It is one
# process (the built-in engine on one device), so the job is one node; a 671B checkpoint needs the sglang engine.
# Chosen: 1 node, 8 GPUs, 1 day; overridable with sbatch --time=... etc.
# Submit from any directory: the job runs there (relative paths in the recipe and the arguments are read from
# it) and the job's log, slurm-<job name>-<job id>.out, lands there.
#SBATCH --job-name=r1-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=1-00:00:00
#SBATCH --output=slurm-%x-%j.out

# sbatch runs a spool copy of this file: common.sh is then found under $R1MOE_ROOT, else next to the script as
# submitted (the job record's Command), from whatever directory it was submitted.
_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[[ -f "$_dir/common.sh" || -z "${R1MOE_ROOT:-}" ]] || _dir="$R1MOE_ROOT/slurm"
[[ -f "$_dir/common.sh" || -z "${SLURM_JOB_ID:-}" ]] ||
    _dir="$(dirname "$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null |
                       sed -n 's/^ *Command=//p' | sed 's/\.sh .*/.sh/')")"
if [[ ! -f "$_dir/common.sh" ]]; then
    echo "slurm/eval.sh: slurm/common.sh not found; set R1MOE_ROOT=/path/to/r1moe" >&2
    exit 2
fi
# shellcheck source=slurm/common.sh
source "$_dir/common.sh"

[[ $# -ge 1 ]] || r1moe_usage slurm/eval.sh "--checkpoint DIR --data FILE [--samples K ...]"
r1moe_launch single r1moe.evaluate "$@"

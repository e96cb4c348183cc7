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
# Submit from the repository root: the job runs in the submit directory and finds slurm/common.sh there.
#SBATCH --job-name=r1-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=1-00:00:00
#SBATCH --output=slurm-%x-%j.out

_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[[ -f "$_dir/common.sh" ]] || _dir="${SLURM_SUBMIT_DIR:-$PWD}/slurm"   # sbatch runs a spool copy of this file
# shellcheck source=slurm/common.sh
source "$_dir/common.sh"

[[ $# -ge 1 ]] || r1moe_usage slurm/eval.sh "--checkpoint DIR --data FILE [--samples K ...]"
r1moe_launch single r1moe.evaluate "$@"

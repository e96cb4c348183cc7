"""Rewards: pure `(completion, sample) -> float` functions in one registry (`REWARD_FUNCS`), batch scoring, and the
code sandbox. See `rule.py` for the dispatch and `sandbox.py` for what the sandbox guarantees."""

from r1moe.rewards.rule import (
    REWARD_FUNCS,
    BatchReward,
    RewardBatch,
    RewardFunc,
    accuracy_reward,
    chain_of_thought,
    compute_rewards,
    extract_answer,
    extract_code,
    format_reward,
    language_consistency_reward,
    last_boxed,
    length_reward,
    math_answers_equal,
    same_answer,
)
from r1moe.rewards.sandbox import SandboxLimits, SandboxResult, run_python

__all__ = [
    "REWARD_FUNCS",
    "BatchReward",
    "RewardBatch",
    "RewardFunc",
    "SandboxLimits",
    "SandboxResult",
    "accuracy_reward",
    "chain_of_thought",
    "compute_rewards",
    "extract_answer",
    "extract_code",
    "format_reward",
    "language_consistency_reward",
    "last_boxed",
    "length_reward",
    "math_answers_equal",
    "run_python",
    "same_answer",
]

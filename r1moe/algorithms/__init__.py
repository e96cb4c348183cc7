"""Loss and advantage math shared by every backend: GRPO (grpo.py), token log-probs (logprobs.py), SFT /
reward-model / MTP losses and the MoE expert-bias update (losses.py). Import from here."""

from r1moe.algorithms.grpo import (
    AGGREGATIONS,
    Aggregation,
    GRPOStats,
    compute_advantages,
    compute_grpo_loss,
    compute_kl_k3,
    compute_loss_denominator,
    filter_groups,
)
from r1moe.algorithms.logprobs import IGNORE_INDEX, compute_token_logprobs
from r1moe.algorithms.losses import (
    compute_bradley_terry_loss,
    compute_expert_bias_update,
    compute_mtp_loss,
    compute_sft_loss,
)

__all__ = [
    "AGGREGATIONS",
    "IGNORE_INDEX",
    "Aggregation",
    "GRPOStats",
    "compute_advantages",
    "compute_bradley_terry_loss",
    "compute_expert_bias_update",
    "compute_grpo_loss",
    "compute_kl_k3",
    "compute_loss_denominator",
    "compute_mtp_loss",
    "compute_sft_loss",
    "compute_token_logprobs",
    "filter_groups",
]

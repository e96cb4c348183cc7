"""GRPO: group-relative advantages, the clipped surrogate with a k3 KL penalty, dynamic-sampling filter.

Follows DeepSeek-R1 (arXiv 2501.12948) eq. (1) (objective) and eq. (3) (advantage), with the KL estimator of
v2 eq. (11)-(12) (= DeepSeekMath eq. 4, Schulman's "k3"). Per token, as in DeepSeekMath's GRPO:

    J = E_q (1/G) sum_i (1/|o_i|) sum_t [ min(rho_it A_i, clip(rho_it, 1-eps_low, 1+eps_high) A_i) - beta KL_it ]
    rho_it = pi(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t),   A_i = (r_i - mean(r_group)) / std(r_group)

and loss = -J. Two published variants of the aggregation are selectable (`agg`): DAPO's token-level mean
(arXiv 2503.14476 eq. 8) and Dr. GRPO's sum / constant (arXiv 2503.20783 eq. 2, which also drops the std in
the advantage: `compute_advantages(scale="none")`). DAPO's clip-higher is `eps_high > eps_low`, its dynamic
sampling is `filter_groups`. Pure tensor functions shared by every backend (slime `ppo_utils.py` style).

Gradient accumulation / data parallelism: the loss is `sum of per-unit terms / loss_denominator`, where a unit
is a sequence (seq_* modes) or a token (token_mean) and the denominator defaults to the units in *this* call.
To split one optimizer step over micro-batches so that the summed gradients equal the full-batch gradient,
pass every call the step's total: `loss_denominator = compute_loss_denominator(full_mask_BT, agg)` (with
DDP-style gradient averaging over W ranks: the all-rank total divided by W), then backward each micro-batch
loss without further scaling. `GRPOStats.merge` combines the micro-batch statistics the same way.

Legend: B sequences in the batch (= number of groups x G), T tokens (response positions, right-padded),
G group size, N rewards (= B).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

import torch
from torch import Tensor

Aggregation = Literal["seq_mean_group_mean", "token_mean", "seq_sum_norm"]
AGGREGATIONS: tuple[str, ...] = ("seq_mean_group_mean", "token_mean", "seq_sum_norm")

LOG_RATIO_CLAMP = 20.0
"""|log ratio| bound before exp (in the PPO ratio and the k3 KL). e^20 ~ 4.9e8 is finite in fp32 and bf16, so one
runaway token cannot turn the loss into inf/NaN; past the bound the term is constant (no gradient), which only
affects tokens whose probability moved by a factor > 10^8 since sampling: these are clipped anyway for A > 0."""


def _grouped(rewards_N: Tensor, group_size: int) -> Tensor:
    if rewards_N.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards_N.shape)}")
    if group_size < 1 or rewards_N.numel() % group_size != 0:
        raise ValueError(f"{rewards_N.numel()} rewards cannot be split into groups of group_size={group_size}")
    return rewards_N.view(-1, group_size)


def compute_advantages(
    rewards_N: Tensor, group_size: int, scale: Literal["std", "none"] = "std", eps: float = 1e-6
) -> Tensor:
    """Eq. (3): A_i = (r_i - mean(group)) / (std(group) + eps); consecutive blocks of `group_size` rewards are
    the outputs of one question. `scale="none"` is Dr. GRPO: mean-centred only.

    std is the *sample* std (Bessel-corrected, torch.std's default), as in TRL's GRPOTrainer and verl's
    `compute_grpo_outcome_advantage`; the paper writes std() without saying which. For G=16 the two differ by
    sqrt(16/15) = 1.03, a constant rescaling of every advantage (i.e. of the learning rate), so we follow the
    implementations people compare against. eps is added to the std (verl's 1e-6; TRL uses 1e-4) so that a
    group with equal rewards gets A = 0 exactly, not NaN. With group_size=1 the advantage is 0.
    """
    if scale not in ("std", "none"):
        raise ValueError(f"scale must be 'std' or 'none', got {scale!r}")
    rewards_GN = _grouped(rewards_N.float(), group_size)
    centred_GN = rewards_GN - rewards_GN.mean(dim=1, keepdim=True)
    if scale == "std" and group_size > 1:
        centred_GN = centred_GN / (rewards_GN.std(dim=1, keepdim=True) + eps)
    return centred_GN.reshape(-1)


def filter_groups(rewards_N: Tensor, group_size: int, atol: float = 0.0) -> Tensor:
    """DAPO dynamic sampling: bool keep-mask [N], False for every output of a group whose rewards are all equal
    (max - min <= atol): such a group has zero advantage and only dilutes the batch."""
    rewards_GN = _grouped(rewards_N, group_size)
    spread_G = rewards_GN.max(dim=1).values - rewards_GN.min(dim=1).values
    return (spread_G > atol).repeat_interleave(group_size)


def compute_kl_k3(logp_BT: Tensor, ref_logp_BT: Tensor) -> Tensor:
    """Per-token unbiased KL(pi || pi_ref) estimator of R1 v2 eq. (12): pi_ref/pi - log(pi_ref/pi) - 1 >= 0.

    Computed from the log-ratio d = ref_logp - logp as e^d - d - 1, with d clamped to +-LOG_RATIO_CLAMP.
    """
    log_ratio_BT = (ref_logp_BT.float() - logp_BT.float()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(log_ratio_BT) - log_ratio_BT - 1.0


@dataclass
class GRPOStats:
    """Detached 0-dim tensors (no host sync until `to_dict`). Token means are over response tokens."""

    pg_loss: Tensor  # the policy-gradient part of the returned loss (same normalisation)
    kl: Tensor  # token mean of the k3 KL; 0 when no ref_logp was given
    clip_frac: Tensor  # fraction of tokens whose clipped term was the min (gradient cut)
    ratio_mean: Tensor
    ratio_max: Tensor
    num_tokens: Tensor
    num_seqs: Tensor

    def to_dict(self, prefix: str = "") -> dict[str, float]:
        names = [f.name for f in fields(self)]
        values = torch.stack([getattr(self, n).float().reshape(()) for n in names]).tolist()
        return {prefix + n: v for n, v in zip(names, values)}

    @staticmethod
    def merge(stats: list[GRPOStats]) -> GRPOStats:
        """Combine micro-batch stats: token-weighted means, max of ratio_max, sums of pg_loss and counts
        (pg_loss sums to the full-batch value when each call got the step's total `loss_denominator`)."""
        if not stats:
            raise ValueError("merge needs at least one GRPOStats")
        tokens = torch.stack([s.num_tokens for s in stats]).float()
        weight = tokens / tokens.sum().clamp(min=1)

        def weighted(name: str) -> Tensor:
            return (torch.stack([getattr(s, name) for s in stats]) * weight).sum()

        return GRPOStats(
            pg_loss=torch.stack([s.pg_loss for s in stats]).sum(),
            kl=weighted("kl"),
            clip_frac=weighted("clip_frac"),
            ratio_mean=weighted("ratio_mean"),
            ratio_max=torch.stack([s.ratio_max for s in stats]).max(),
            num_tokens=torch.stack([s.num_tokens for s in stats]).sum(),
            num_seqs=torch.stack([s.num_seqs for s in stats]).sum(),
        )


def compute_loss_denominator(mask_BT: Tensor, agg: Aggregation) -> Tensor:
    """Units the loss is averaged over: sequences for the seq_* modes, response tokens for token_mean.
    Call it on the whole optimizer step's mask and pass the result to every micro-batch (see module doc)."""
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")
    if agg == "token_mean":
        return mask_BT.bool().sum()
    return torch.tensor(mask_BT.shape[0], device=mask_BT.device)


def _aggregate(
    values_BT: Tensor, mask_BT: Tensor, agg: str, norm_const: float | None, denominator: Tensor | float
) -> Tensor:
    """sum over units / denominator; masked positions are already zero in values_BT."""
    if agg == "token_mean":
        total = values_BT.sum()
    elif agg == "seq_mean_group_mean":
        total = (values_BT.sum(dim=1) / mask_BT.sum(dim=1).clamp(min=1)).sum()
    else:  # seq_sum_norm
        total = values_BT.sum() / norm_const
    return total / denominator


def compute_grpo_loss(
    logp_BT: Tensor,
    old_logp_BT: Tensor | None,
    advantages_B: Tensor,
    mask_BT: Tensor,
    *,
    ref_logp_BT: Tensor | None = None,
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    agg: Aggregation = "seq_mean_group_mean",
    norm_const: float | None = None,
    loss_denominator: Tensor | float | None = None,
) -> tuple[Tensor, GRPOStats]:
    """-J of eq. (1) on a batch of B response sequences (right-padded, `mask_BT` true on response tokens).

    old_logp_BT: log pi_old of the sampled tokens (no gradient); None means on-policy (= logp_BT.detach()).
    beta, ref_logp_BT: KL weight and log pi_ref; with beta=0 ref_logp_BT may be None (if given, the KL is
        only logged). eps_high=None is the symmetric clip of the paper; eps_high > eps_low is DAPO clip-higher.
    agg: "seq_mean_group_mean" (the paper: (1/|o_i|) sum_t, then mean over the G outputs and the groups; with
        equal-size groups this is the mean over sequences), "token_mean" (DAPO: every token weighs the same),
        "seq_sum_norm" (Dr. GRPO: sum_t / norm_const, e.g. the max generation length, then mean over sequences).
    loss_denominator: units to divide by instead of this batch's own count (gradient accumulation, see module
        docstring).

    The KL term is aggregated exactly like the surrogate (it sits inside the same sums in eq. 1). Padded
    positions may hold anything (even NaN): they are selected away before any arithmetic reaches the loss.
    """
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")
    if agg == "seq_sum_norm" and (norm_const is None or norm_const <= 0):
        raise ValueError(f"agg='seq_sum_norm' needs a positive norm_const (e.g. max response length), got {norm_const}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and ref_logp_BT is None:
        raise ValueError("beta > 0 needs ref_logp_BT")
    eps_high = eps_low if eps_high is None else eps_high
    # eps_low >= 1 is allowed: DeepSeek-R1's reasoning RL uses clip epsilon 10 (v2 §3.2.1), where the lower bound
    # 1 - eps is <= 0 and only the upper clip ever binds.
    if not (eps_low >= 0 and eps_high >= 0):
        raise ValueError(f"need eps_low >= 0 and eps_high >= 0, got eps_low={eps_low}, eps_high={eps_high}")
    num_seqs = logp_BT.shape[0]
    if logp_BT.dim() != 2 or mask_BT.shape != logp_BT.shape or advantages_B.shape != (num_seqs,):
        raise ValueError(
            f"shapes: logp {tuple(logp_BT.shape)}, mask {tuple(mask_BT.shape)}, advantages "
            f"{tuple(advantages_B.shape)}; expected [B, T], [B, T], [B]"
        )

    mask_BT = mask_BT.bool()
    logp_BT = logp_BT.float()
    old_logp_BT = logp_BT.detach() if old_logp_BT is None else old_logp_BT.float()
    zeros_BT = torch.zeros_like(logp_BT)

    log_ratio_BT = torch.where(mask_BT, logp_BT - old_logp_BT, zeros_BT).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio_BT = torch.exp(log_ratio_BT)
    adv_B1 = advantages_B.float()[:, None]
    unclipped_BT = ratio_BT * adv_B1
    clipped_BT = ratio_BT.clamp(1.0 - eps_low, 1.0 + eps_high) * adv_B1
    surrogate_BT = torch.where(mask_BT, torch.minimum(unclipped_BT, clipped_BT), zeros_BT)

    if loss_denominator is None:
        loss_denominator = compute_loss_denominator(mask_BT, agg).clamp(min=1)
    pg_loss = -_aggregate(surrogate_BT, mask_BT, agg, norm_const, loss_denominator)

    num_tokens = mask_BT.sum()
    token_den = num_tokens.clamp(min=1)
    if ref_logp_BT is not None:
        kl_BT = compute_kl_k3(torch.where(mask_BT, logp_BT, zeros_BT), torch.where(mask_BT, ref_logp_BT, zeros_BT))
        kl_mean = kl_BT.detach().sum() / token_den
    else:
        kl_BT, kl_mean = None, zeros_BT.new_zeros(())
    loss = pg_loss
    if beta > 0:
        loss = pg_loss + beta * _aggregate(kl_BT, mask_BT, agg, norm_const, loss_denominator)

    with torch.no_grad():
        clipped_chosen_BT = (clipped_BT < unclipped_BT) & mask_BT
        ratio_masked_BT = torch.where(mask_BT, ratio_BT, zeros_BT)
        stats = GRPOStats(
            pg_loss=pg_loss.detach(),
            kl=kl_mean,
            clip_frac=clipped_chosen_BT.sum() / token_den,
            ratio_mean=ratio_masked_BT.sum() / token_den,
            ratio_max=ratio_masked_BT.max() if num_seqs > 0 else zeros_BT.new_zeros(()),
            num_tokens=num_tokens,
            num_seqs=torch.tensor(num_seqs, device=logp_BT.device),
        )
    return loss, stats

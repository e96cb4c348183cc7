"""The non-RL losses of the R1 pipeline and DeepSeek-V3's expert-bias update, as pure tensor functions.

- SFT (cold start, rejection-sampling SFT, distillation; R1 v2 B.4.2-B.4.3): token cross-entropy over the
  response only.
- Reward model (R1 v2 §3.1, helpful RM on preference pairs): Bradley-Terry, -log sigmoid(s_chosen - s_rejected).
- MTP (DeepSeek-V3 §2.2 eq. 25): L_MTP = (lambda / D) sum_k L_MTP^k.
- Auxiliary-loss-free balancing (DeepSeek-V3 §2.1.2; arXiv 2408.15664 Alg. 1): b_i += u * sign(mean load - load_i).

Legend: B batch, T tokens, V vocabulary, D MTP depth, L MoE layers, E routed experts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from r1moe.algorithms.logprobs import compute_token_logprobs


def compute_sft_loss(
    logits_BTV: Tensor,
    targets_BT: Tensor,
    loss_mask_BT: Tensor,
    *,
    loss_denominator: Tensor | float | None = None,
    chunk_rows: int | None = None,
) -> Tensor:
    """Mean negative log-likelihood over the tokens where `loss_mask_BT` is true (the response; prompt and
    padding excluded). `logits_BTV[b, t]` predicts `targets_BT[b, t]` (already shifted by the caller).

    loss_denominator: the optimizer step's total number of loss tokens when one step is split into
    micro-batches (sum of the micro-batch losses then equals the full-batch loss); default: this batch's.
    """
    mask_BT = loss_mask_BT.bool()
    logp_BT = compute_token_logprobs(logits_BTV, torch.where(mask_BT, targets_BT, -100), chunk_rows=chunk_rows)
    if loss_denominator is None:
        loss_denominator = mask_BT.sum().clamp(min=1)
    return -logp_BT.sum() / loss_denominator


def compute_bradley_terry_loss(chosen_scores_B: Tensor, rejected_scores_B: Tensor) -> Tensor:
    """Pairwise reward-model loss mean_b -log sigmoid(s_chosen - s_rejected), in float32 (logsigmoid is
    stable for large margins of either sign)."""
    if chosen_scores_B.shape != rejected_scores_B.shape:
        raise ValueError(f"chosen {tuple(chosen_scores_B.shape)} vs rejected {tuple(rejected_scores_B.shape)}")
    return -F.logsigmoid(chosen_scores_B.float() - rejected_scores_B.float()).mean()


def compute_mtp_loss(mtp_losses: Sequence[Tensor] | Tensor, weight: float) -> Tensor:
    """V3 eq. 25: weight * mean over the D prediction depths of their cross-entropy losses (lambda = 0.3,
    then 0.1 in V3 pre-training). Add the result to the main next-token loss."""
    losses_D = torch.stack(list(mtp_losses)) if not isinstance(mtp_losses, Tensor) else mtp_losses
    if losses_D.numel() == 0:
        raise ValueError("compute_mtp_loss needs at least one MTP depth")
    return weight * losses_D.float().mean()


def compute_expert_bias_update(bias_E: Tensor, counts_E: Tensor, rate: float) -> Tensor:
    """New routing biases after one step: b_i + rate * sign(mean_j load_j - load_i).

    counts_E: tokens routed to each expert over the whole step (global batch, summed over ranks), shape [E]
    or [L, E] for all MoE layers at once (the mean is per layer). An overloaded expert's bias goes down by
    `rate`, an underloaded one's up, a balanced one's stays. The bias only shifts top-k selection, never
    the gate values (V3 eq. 16), so it has no gradient; returns a new tensor in bias_E's dtype.
    """
    if bias_E.shape != counts_E.shape:
        raise ValueError(f"bias {tuple(bias_E.shape)} and counts {tuple(counts_E.shape)} must match")
    load_E = counts_E.float()
    direction_E = torch.sign(load_E.mean(dim=-1, keepdim=True) - load_E)
    return (bias_E.float() + rate * direction_E).to(bias_E.dtype)

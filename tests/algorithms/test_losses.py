"""Token log-probs (chunked custom autograd) vs torch's log_softmax; SFT, Bradley-Terry, MTP, expert bias.

Legend: B batch, T tokens, V vocabulary, L layers, E experts.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from r1moe.algorithms import (
    compute_bradley_terry_loss,
    compute_expert_bias_update,
    compute_mtp_loss,
    compute_sft_loss,
    compute_token_logprobs,
)


def _reference_logprobs(logits_BTV, targets_BT, temperature=1.0):
    logp_BTV = torch.log_softmax(logits_BTV.double() / temperature, dim=-1)
    return logp_BTV.gather(-1, targets_BT.clamp(min=0)[..., None]).squeeze(-1) * (targets_BT >= 0)


@pytest.mark.parametrize("chunk_rows", [1, 4, None])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_match_log_softmax(chunk_rows, temperature):
    g = torch.Generator().manual_seed(0)
    logits_BTV = (3 * torch.randn(3, 5, 11, generator=g)).requires_grad_()
    targets_BT = torch.randint(0, 11, (3, 5), generator=g)
    targets_BT[2, 3:] = -100  # padding
    logp_BT = compute_token_logprobs(logits_BTV, targets_BT, temperature=temperature, chunk_rows=chunk_rows)
    assert logp_BT.dtype == torch.float32 and logp_BT.shape == (3, 5)
    ref_BT = _reference_logprobs(logits_BTV, targets_BT, temperature)
    torch.testing.assert_close(logp_BT.double(), ref_BT, atol=1e-5, rtol=1e-5)
    assert logp_BT[2, 3:].abs().max().item() == 0.0

    w_BT = torch.randn(3, 5, generator=g)
    (grad,) = torch.autograd.grad((logp_BT * w_BT).sum(), logits_BTV)
    (ref_grad,) = torch.autograd.grad((ref_BT * w_BT.double()).sum(), logits_BTV)
    torch.testing.assert_close(grad.double(), ref_grad.double(), atol=1e-5, rtol=1e-5)
    assert grad[2, 3:].abs().max().item() == 0.0


def test_token_logprobs_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    logits_BTV = torch.randn(2, 3, 7, dtype=torch.float64, generator=g, requires_grad=True)
    targets_BT = torch.tensor([[0, 6, 3], [2, -100, 5]])
    assert torch.autograd.gradcheck(
        lambda x: compute_token_logprobs(x, targets_BT, temperature=0.9, chunk_rows=2), (logits_BTV,)
    )


def test_token_logprobs_bf16_logits_computed_in_float32():
    g = torch.Generator().manual_seed(2)
    logits_BTV = (4 * torch.randn(2, 8, 300, generator=g)).bfloat16().requires_grad_()
    targets_BT = torch.randint(0, 300, (2, 8), generator=g)
    logp_BT = compute_token_logprobs(logits_BTV, targets_BT, chunk_rows=3)
    assert logp_BT.dtype == torch.float32
    # exact w.r.t. the bf16 values themselves: the reference upcasts the same bf16 numbers to float64
    torch.testing.assert_close(
        logp_BT.double(), _reference_logprobs(logits_BTV.detach(), targets_BT), atol=1e-5, rtol=0
    )
    logp_BT.sum().backward()
    assert logits_BTV.grad.dtype == torch.bfloat16 and torch.isfinite(logits_BTV.grad.float()).all()


def test_sft_loss_masks_prompt_tokens():
    g = torch.Generator().manual_seed(3)
    logits_BTV = torch.randn(2, 4, 6, generator=g, requires_grad=True)
    targets_BT = torch.randint(0, 6, (2, 4), generator=g)
    loss_mask_BT = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 0]], dtype=torch.bool)  # prompt, response, padding
    loss = compute_sft_loss(logits_BTV, targets_BT, loss_mask_BT)
    nll_BT = F.cross_entropy(logits_BTV.detach().transpose(1, 2), targets_BT, reduction="none")
    assert loss.item() == pytest.approx((nll_BT[loss_mask_BT].sum() / 4).item(), rel=1e-6)
    loss.backward()
    assert logits_BTV.grad[~loss_mask_BT].abs().max().item() == 0.0
    assert logits_BTV.grad[loss_mask_BT].abs().max().item() > 0.0
    # changing the prompt targets changes nothing
    other_BT = torch.where(loss_mask_BT, targets_BT, (targets_BT + 1) % 6)
    assert compute_sft_loss(logits_BTV, other_BT, loss_mask_BT).item() == pytest.approx(loss.item())


def test_sft_loss_micro_batches_sum_to_full_batch():
    g = torch.Generator().manual_seed(4)
    logits_BTV = torch.randn(4, 3, 5, generator=g)
    targets_BT = torch.randint(0, 5, (4, 3), generator=g)
    mask_BT = torch.tensor([[1, 1, 1], [0, 1, 0], [1, 0, 0], [0, 1, 1]], dtype=torch.bool)
    full = compute_sft_loss(logits_BTV, targets_BT, mask_BT)
    den = mask_BT.sum()
    parts = [
        compute_sft_loss(logits_BTV[r], targets_BT[r], mask_BT[r], loss_denominator=den)
        for r in (slice(0, 1), slice(1, 4))
    ]
    assert sum(parts).item() == pytest.approx(full.item(), rel=1e-6)


def test_bradley_terry_hand_values():
    chosen_B = torch.tensor([2.0, 0.0, -1.0, 100.0])
    rejected_B = torch.tensor([1.0, 0.0, 1.0, -100.0])
    # -log sigmoid(d) = log(1 + e^-d): d = 1, 0, -2, 200
    expected = (math.log1p(math.exp(-1)) + math.log(2) + math.log1p(math.exp(2)) + 0.0) / 4
    assert compute_bradley_terry_loss(chosen_B, rejected_B).item() == pytest.approx(expected, rel=1e-6)
    assert torch.isfinite(compute_bradley_terry_loss(torch.tensor([-1e4]), torch.tensor([1e4])))


def test_mtp_loss_is_lambda_over_depth_times_sum():
    assert compute_mtp_loss([torch.tensor(2.0)], weight=0.3).item() == pytest.approx(0.6)
    assert compute_mtp_loss([torch.tensor(2.0), torch.tensor(4.0)], weight=0.1).item() == pytest.approx(0.1 / 2 * 6)
    assert compute_mtp_loss(torch.tensor([1.0, 2.0, 3.0]), weight=0.3).item() == pytest.approx(0.3 / 3 * 6)


def test_expert_bias_update_signs():
    bias_E = torch.tensor([0.0, 0.5, -0.5, 0.0])
    counts_E = torch.tensor([10, 2, 4, 0])  # mean load 4: overloaded, under, balanced, under
    new_E = compute_expert_bias_update(bias_E, counts_E, rate=0.001)
    torch.testing.assert_close(new_E, torch.tensor([-0.001, 0.501, -0.5, 0.001]))
    assert bias_E.tolist() == [0.0, 0.5, -0.5, 0.0]  # pure: input untouched


def test_expert_bias_update_per_layer():
    bias_LE = torch.zeros(2, 3)
    counts_LE = torch.tensor([[3.0, 3.0, 0.0], [0.0, 0.0, 9.0]])  # means 2 and 3
    new_LE = compute_expert_bias_update(bias_LE, counts_LE, rate=0.01)
    torch.testing.assert_close(new_LE, torch.tensor([[-0.01, -0.01, 0.01], [0.01, 0.01, -0.01]]))
    balanced = compute_expert_bias_update(bias_LE, torch.full((2, 3), 5.0), rate=0.01)
    assert balanced.abs().max().item() == 0.0

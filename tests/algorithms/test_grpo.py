"""GRPO math against hand-computed numbers from R1 eq. (1) and (3) and the k3 KL of v2 eq. (12).

Legend: B sequences, T tokens, N rewards.
"""

import math

import pytest
import torch

from r1moe.algorithms import (
    GRPOStats,
    compute_advantages,
    compute_grpo_loss,
    compute_kl_k3,
    compute_loss_denominator,
    filter_groups,
)

# ---------------------------------------------------------------- advantages (eq. 3)


def test_advantages_one_group_sample_std():
    adv_N = compute_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=4)
    # mean 0.5; sample std = sqrt((4 * 0.25) / (4 - 1)) = sqrt(1/3); A = +-0.5 / sqrt(1/3) = +-sqrt(3)/2
    a = 0.5 / math.sqrt(1.0 / 3.0)
    assert a == pytest.approx(0.8660254)
    torch.testing.assert_close(adv_N, torch.tensor([a, -a, -a, a]), atol=1e-5, rtol=0)


def test_advantages_equal_rewards_are_zero_not_nan():
    adv_N = compute_advantages(torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]), group_size=4)
    assert torch.isfinite(adv_N).all()
    assert adv_N.abs().max().item() == 0.0


def test_advantages_groups_are_independent():
    rewards_N = torch.tensor([2.0, 0.0, 5.0, 5.0, 3.0, 1.0])
    adv_N = compute_advantages(rewards_N, group_size=2)
    # each pair: mean m, sample std = |r1 - r2| / sqrt(2); A = +-(|d|/2) / (|d|/sqrt(2)) = +-1/sqrt(2)
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(adv_N, torch.tensor([s, -s, 0.0, 0.0, s, -s]), atol=1e-5, rtol=0)


def test_advantages_dr_grpo_no_std():
    adv_N = compute_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 0.0, 0.0, 1.0]), group_size=4, scale="none")
    torch.testing.assert_close(adv_N, torch.tensor([0.5, -0.5, -0.5, 0.5, 2.0, -1.0, -1.0, 0.0]))


def test_advantages_bad_group_size():
    with pytest.raises(ValueError, match="group_size"):
        compute_advantages(torch.zeros(6), group_size=4)


def test_filter_groups_drops_constant_groups():
    rewards_N = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.0])
    keep_N = filter_groups(rewards_N, group_size=3)
    assert keep_N.tolist() == [False, False, False, False, False, False, True, True, True]
    assert keep_N.dtype == torch.bool


# ---------------------------------------------------------------- k3 KL (v2 eq. 12)


def test_kl_k3_hand_values():
    kl = compute_kl_k3(torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-2.0, -1.0, -0.5]))
    # d = ref - logp: -1 -> e^-1 + 1 - 1 = e^-1;  +1 -> e - 1 - 1 = e - 2;  0 -> 0
    torch.testing.assert_close(kl, torch.tensor([math.exp(-1), math.e - 2, 0.0]))


def test_kl_k3_nonnegative_and_finite_for_extreme_ratios():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(1000, generator=g) * 50
    ref = -torch.rand(1000, generator=g) * 50
    kl = compute_kl_k3(logp, ref)
    assert (kl >= 0).all() and torch.isfinite(kl).all()
    assert compute_kl_k3(torch.tensor([0.0]), torch.tensor([-1000.0])).isfinite().all()
    assert compute_kl_k3(torch.tensor([-1000.0]), torch.tensor([0.0])).isfinite().all()


# ---------------------------------------------------------------- the clipped surrogate (eq. 1)
#
# 2 groups x 2 sequences, T = 3, lengths 3, 2, 1, 2; eps = 0.2 so clip range [0.8, 1.2].
#   seq0 A = +1,   ratios [1.5, 1.0, 0.5]: min(1.5, 1.2)=1.2, 1.0, min(0.5, 0.8)=0.5   sum  2.7  mean  0.9
#   seq1 A = -1,   ratios [1.5, 0.5]:      min(-1.5,-1.2)=-1.5, min(-0.5,-0.8)=-0.8  sum -2.3  mean -1.15
#   seq2 A = +0.5, ratios [1.1]:           0.55                                      sum  0.55 mean  0.55
#   seq3 A = -2,   ratios [0.9, 2.0]:      -1.8, min(-4.0, -2.4)=-4.0                sum -5.8  mean -2.9
# The clipped term is the min (gradient cut) at seq0 t0 and seq1 t1: clip_frac = 2/8.

RATIOS_BT = [[1.5, 1.0, 0.5], [1.5, 0.5, 1.0], [1.1, 1.0, 1.0], [0.9, 2.0, 1.0]]
MASK_BT = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 0]], dtype=torch.bool)
ADV_B = torch.tensor([1.0, -1.0, 0.5, -2.0])


def _example():
    old_logp_BT = torch.full((4, 3), -1.0)
    logp_BT = old_logp_BT + torch.tensor(RATIOS_BT).log()
    logp_BT[~MASK_BT] = float("nan")  # padding may hold garbage; it must not reach the loss
    return logp_BT.requires_grad_(), old_logp_BT


@pytest.mark.parametrize(
    "agg, norm_const, expected",
    [
        ("seq_mean_group_mean", None, -(0.9 - 1.15 + 0.55 - 2.9) / 4),  # 0.65
        ("token_mean", None, -(2.7 - 2.3 + 0.55 - 5.8) / 8),  # 0.60625
        ("seq_sum_norm", 4.0, -(2.7 / 4 - 2.3 / 4 + 0.55 / 4 - 5.8 / 4) / 4),  # 0.303125
    ],
)
def test_grpo_loss_hand_worked(agg, norm_const, expected):
    logp_BT, old_logp_BT = _example()
    loss, stats = compute_grpo_loss(logp_BT, old_logp_BT, ADV_B, MASK_BT, agg=agg, norm_const=norm_const)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats.pg_loss.item() == pytest.approx(expected, abs=1e-6)
    d = stats.to_dict()
    assert d["clip_frac"] == pytest.approx(2 / 8)
    assert d["num_tokens"] == 8 and d["num_seqs"] == 4 and d["kl"] == 0.0
    assert d["ratio_max"] == pytest.approx(2.0)
    assert d["ratio_mean"] == pytest.approx((1.5 + 1.0 + 0.5 + 1.5 + 0.5 + 1.1 + 0.9 + 2.0) / 8)
    loss.backward()
    assert torch.isfinite(logp_BT.grad).all()
    assert logp_BT.grad[~MASK_BT].abs().max().item() == 0.0


def test_grpo_loss_expected_values_are_the_documented_numbers():
    assert -(0.9 - 1.15 + 0.55 - 2.9) / 4 == pytest.approx(0.65)
    assert -(2.7 - 2.3 + 0.55 - 5.8) / 8 == pytest.approx(0.60625)


def test_grpo_loss_beta_adds_kl_inside_the_sequence_mean():
    logp_BT, old_logp_BT = _example()
    ref_logp_BT = torch.where(MASK_BT, logp_BT.detach(), torch.zeros(4, 3))
    ref_logp_BT[0, 0] += math.log(2)  # d = ln 2:  k3 = 2 - ln 2 - 1 = 1 - ln 2
    ref_logp_BT[3, 1] -= math.log(2)  # d = -ln 2: k3 = 1/2 + ln 2 - 1 = ln 2 - 1/2
    beta = 0.1
    loss, stats = compute_grpo_loss(logp_BT, old_logp_BT, ADV_B, MASK_BT, ref_logp_BT=ref_logp_BT, beta=beta)
    kl0, kl3 = 1 - math.log(2), math.log(2) - 0.5
    kl_seq_mean = (kl0 / 3 + 0 + 0 + kl3 / 2) / 4  # per-sequence token mean, then mean over the 4 sequences
    assert loss.item() == pytest.approx(0.65 + beta * kl_seq_mean, abs=1e-6)
    assert stats.pg_loss.item() == pytest.approx(0.65, abs=1e-6)
    assert stats.kl.item() == pytest.approx((kl0 + kl3) / 8, abs=1e-6)  # logged as a token mean

    loss_tok, _ = compute_grpo_loss(
        logp_BT, old_logp_BT, ADV_B, MASK_BT, ref_logp_BT=ref_logp_BT, beta=beta, agg="token_mean"
    )
    assert loss_tok.item() == pytest.approx(0.60625 + beta * (kl0 + kl3) / 8, abs=1e-6)


def test_grpo_loss_beta_zero_needs_no_ref_and_ref_only_logs():
    logp_BT, old_logp_BT = _example()
    ref_logp_BT = torch.where(MASK_BT, logp_BT.detach() - 1.0, torch.zeros(4, 3))
    loss, stats = compute_grpo_loss(logp_BT, old_logp_BT, ADV_B, MASK_BT, ref_logp_BT=ref_logp_BT, beta=0.0)
    assert loss.item() == pytest.approx(0.65, abs=1e-6)
    assert stats.kl.item() == pytest.approx(math.exp(-1), abs=1e-6)  # d = -1 on every token
    with pytest.raises(ValueError, match="ref_logp"):
        compute_grpo_loss(logp_BT, old_logp_BT, ADV_B, MASK_BT, beta=0.001)


def test_grpo_gradient_on_policy_is_minus_adv_over_length_over_n():
    logp_BT, _ = _example()
    logp_BT = torch.where(MASK_BT, logp_BT.detach(), torch.zeros(4, 3)).requires_grad_()
    loss, stats = compute_grpo_loss(logp_BT, logp_BT.detach(), ADV_B, MASK_BT)
    loss.backward()
    lengths_B = MASK_BT.sum(1).float()
    expected_BT = (-ADV_B / lengths_B / 4)[:, None] * MASK_BT
    torch.testing.assert_close(logp_BT.grad, expected_BT)
    assert stats.clip_frac.item() == 0.0 and stats.ratio_max.item() == 1.0
    # old_logp=None means on-policy: same loss and gradient
    logp2_BT = logp_BT.detach().clone().requires_grad_()
    compute_grpo_loss(logp2_BT, None, ADV_B, MASK_BT)[0].backward()
    torch.testing.assert_close(logp2_BT.grad, expected_BT)


def test_grpo_clipped_tokens_have_no_gradient():
    logp_BT, old_logp_BT = _example()
    compute_grpo_loss(logp_BT, old_logp_BT, ADV_B, MASK_BT)[0].backward()
    grad_BT = logp_BT.grad
    assert grad_BT[0, 0].item() == 0.0  # ratio 1.5 > 1.2 with A > 0
    assert grad_BT[1, 1].item() == 0.0  # ratio 0.5 < 0.8 with A < 0
    # unclipped: d/dlogp of -(ratio * A) / |o| / N = -ratio * A / |o| / N
    assert grad_BT[1, 0].item() == pytest.approx(-1.5 * -1.0 / 2 / 4)
    assert grad_BT[3, 1].item() == pytest.approx(-2.0 * -2.0 / 2 / 4)
    assert grad_BT[0, 2].item() == pytest.approx(-0.5 * 1.0 / 3 / 4)


def test_clip_higher_is_asymmetric():
    old_logp_BT = torch.zeros(1, 4)
    logp_BT = torch.tensor([[1.25, 1.5, 0.75, 0.5]]).log()
    mask_BT = torch.ones(1, 4, dtype=torch.bool)
    pos, neg = torch.tensor([1.0]), torch.tensor([-1.0])
    sym, _ = compute_grpo_loss(logp_BT, old_logp_BT, pos, mask_BT, eps_low=0.2)
    dapo, stats = compute_grpo_loss(logp_BT, old_logp_BT, pos, mask_BT, eps_low=0.2, eps_high=0.28)
    # A > 0: upper clip 1.2 vs 1.28; the lower side never clips for A > 0 (min picks the smaller ratio)
    assert sym.item() == pytest.approx(-(1.2 + 1.2 + 0.75 + 0.5) / 4)
    assert dapo.item() == pytest.approx(-(1.25 + 1.28 + 0.75 + 0.5) / 4)
    assert stats.clip_frac.item() == pytest.approx(1 / 4)
    # A < 0: only the lower bound 1 - eps_low matters, identical in both
    sym_n, _ = compute_grpo_loss(logp_BT, old_logp_BT, neg, mask_BT, eps_low=0.2)
    dapo_n, _ = compute_grpo_loss(logp_BT, old_logp_BT, neg, mask_BT, eps_low=0.2, eps_high=0.28)
    assert sym_n.item() == pytest.approx(dapo_n.item())
    assert sym_n.item() == pytest.approx((1.25 + 1.5 + 0.8 + 0.8) / 4)


def test_micro_batches_with_global_denominator_match_full_batch():
    g = torch.Generator().manual_seed(1)
    logp_BT = (-torch.rand(6, 5, generator=g) * 3).requires_grad_()
    old_logp_BT = logp_BT.detach() + 0.3 * torch.randn(6, 5, generator=g)
    ref_logp_BT = logp_BT.detach() + 0.3 * torch.randn(6, 5, generator=g)
    adv_B = torch.randn(6, generator=g)
    mask_BT = torch.arange(5)[None, :] < torch.tensor([5, 3, 1, 4, 2, 5])[:, None]
    for agg in ("seq_mean_group_mean", "token_mean", "seq_sum_norm"):
        kw = {"ref_logp_BT": ref_logp_BT, "beta": 0.05, "agg": agg, "norm_const": 5.0, "eps_high": 0.28}
        full, full_stats = compute_grpo_loss(logp_BT, old_logp_BT, adv_B, mask_BT, **kw)
        (full_grad,) = torch.autograd.grad(full, logp_BT)
        den = compute_loss_denominator(mask_BT, agg)
        total, parts = 0.0, []
        for rows in (slice(0, 2), slice(2, 6)):
            kw["ref_logp_BT"] = ref_logp_BT[rows]
            part, st = compute_grpo_loss(
                logp_BT[rows], old_logp_BT[rows], adv_B[rows], mask_BT[rows], loss_denominator=den, **kw
            )
            total = total + part
            parts.append(st)
        (acc_grad,) = torch.autograd.grad(total, logp_BT)
        torch.testing.assert_close(total, full)
        torch.testing.assert_close(acc_grad, full_grad)
        merged = GRPOStats.merge(parts).to_dict()
        for key, value in full_stats.to_dict().items():
            assert merged[key] == pytest.approx(value, abs=1e-6), (agg, key)


def test_grpo_loss_validates():
    logp_BT, old_logp_BT = _example()
    with pytest.raises(ValueError, match="norm_const"):
        compute_grpo_loss(logp_BT, old_logp_BT, ADV_B, MASK_BT, agg="seq_sum_norm")
    with pytest.raises(ValueError, match="agg"):
        compute_grpo_loss(logp_BT, old_logp_BT, ADV_B, MASK_BT, agg="sum")
    with pytest.raises(ValueError, match="shapes"):
        compute_grpo_loss(logp_BT, old_logp_BT, ADV_B[:3], MASK_BT)


def test_grpo_loss_accepts_bf16_and_huge_ratios():
    logp_BT = torch.tensor([[-1.0, -60.0]], dtype=torch.bfloat16, requires_grad=True)
    old_logp_BT = torch.tensor([[-60.0, -1.0]], dtype=torch.bfloat16)
    loss, stats = compute_grpo_loss(logp_BT, old_logp_BT, torch.tensor([-1.0]), torch.ones(1, 2, dtype=torch.bool))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(logp_BT.grad.float()).all()
    assert stats.ratio_max.item() == pytest.approx(math.exp(20), rel=1e-5)  # log ratio 59 clamped to 20


def test_r1_clip_epsilon_10_only_clips_above():
    # R1 reasoning RL: epsilon = 10 -> ratio clipped to [-9, 11]; a ratio of e^3 ~ 20 with A > 0 is clipped at 11
    logp = torch.tensor([[3.0, -3.0]])
    old = torch.zeros(1, 2)
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, _ = compute_grpo_loss(logp, old, torch.tensor([1.0]), mask, eps_low=10.0)
    expected = -(11.0 + math.exp(-3.0)) / 2  # e^-3 is inside [-9, 11]: unclipped
    assert loss.item() == pytest.approx(expected, rel=1e-6)

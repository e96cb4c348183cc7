"""Reference model: KV-cache decode equals the full forward; routing against hand-computed selections; analytic
parameter counts equal the allocated ones."""

import pytest
import torch

from r1moe.model import build_model, count_params, get_preset
from r1moe.model.layers import Router


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-dense"])
def test_kv_cache_decode_equals_full_forward_with_left_padding(preset):
    model = build_model(get_preset(preset), seed=0).eval()
    B, T, P = 3, 9, 5
    x = torch.randint(3, model.cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :2] = 0
    mask[2, :4] = 0
    with torch.no_grad():
        full = model(x, attention_mask=mask).logits
        cache = model.new_cache(B, 16)
        steps = [model(x[:, :P], attention_mask=mask[:, :P], cache=cache).logits]
        for t in range(P, T):
            steps.append(model(x[:, t:t + 1], attention_mask=mask[:, t:t + 1], cache=cache).logits)
    inc = torch.cat(steps, 1)
    assert cache.length == T
    assert (full - inc)[mask.bool()].abs().max() < 1e-5


def test_unpadded_forward_matches_masked_forward():
    model = build_model(get_preset("tiny-moe"), seed=0).eval()
    x = torch.randint(3, 128, (2, 7))
    with torch.no_grad():
        a = model(x).logits
        b = model(x, attention_mask=torch.ones_like(x)).logits
    assert (a - b).abs().max() < 1e-5


def _router(**kw):
    cfg = get_preset("tiny-moe").replace(hidden_size=4, **kw)
    r = Router(cfg)
    return r, cfg


def test_bias_changes_selection_not_weights():
    r, _ = _router(n_routed_experts=4, n_group=1, topk_group=1, num_experts_per_tok=2, norm_topk_prob=False,
                     routed_scaling_factor=1.0)
    with torch.no_grad():
        r.weight.zero_()
        r.weight[:, 0] = torch.tensor([2.0, 1.0, 0.0, -1.0])  # logits = x0 * w
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    s = torch.sigmoid(torch.tensor([2.0, 1.0, 0.0, -1.0]))
    w, idx, _ = r(x)
    assert sorted(idx[0].tolist()) == [0, 1]
    torch.testing.assert_close(w[0].sort().values, s[[1, 0]].sort().values)
    r.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.9]))  # expert 3: 0.269 + 0.9 beats expert 1
    w, idx, _ = r(x)
    assert sorted(idx[0].tolist()) == [0, 3]
    # the gate value of expert 3 is its *unbiased* affinity
    got = dict(zip(idx[0].tolist(), w[0].tolist()))
    assert got[3] == pytest.approx(s[3].item(), abs=1e-6)
    assert got[0] == pytest.approx(s[0].item(), abs=1e-6)


def test_group_limited_topk_and_normalisation():
    # 8 experts in 4 groups of 2; top-2 groups by the sum of each group's top-2 scores
    r, _ = _router(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2, norm_topk_prob=True,
                     routed_scaling_factor=2.5)
    logits = torch.tensor([3.0, -3.0, 1.0, 1.0, 2.0, -2.0, 0.5, 0.4])
    with torch.no_grad():
        r.weight.zero_()
        r.weight[:, 0] = logits
    s = torch.sigmoid(logits)
    group_sums = s.view(4, 2).sum(-1)  # g0 = .953+.047, g1 = .731*2, g2 = .881+.119, g3 = .622+.599
    assert group_sums.topk(2).indices.tolist() == [1, 3]
    w, idx, _ = r(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    # expert 0 has the best single score but its group is excluded; the winners come from groups 1 and 3
    assert sorted(idx[0].tolist()) == [2, 3]
    torch.testing.assert_close(w[0], torch.tensor([1.25, 1.25]))  # normalised over the chosen, times 2.5


def test_expert_counts_and_routed_tokens_only():
    model = build_model(get_preset("tiny-moe"), seed=0).eval()
    x = torch.randint(3, 128, (2, 6))
    mask = torch.ones_like(x)
    mask[0, :2] = 0
    out = model(x, attention_mask=mask)
    cfg = model.cfg
    assert out.expert_counts.shape == (cfg.num_hidden_layers - cfg.first_k_dense_replace, cfg.n_routed_experts)
    assert (out.expert_counts.sum(-1) == mask.sum() * cfg.num_experts_per_tok).all()


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-dense"])
def test_analytic_counts_equal_allocated(preset):
    model = build_model(get_preset(preset))
    cfg = model.cfg
    allocated = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    c = count_params(cfg, include_mtp=True)
    # the MTP copies of embedding/head are shared tensors, counted once by parameters()
    assert allocated == c["total_params"]


def test_mtp_logits_and_aux_loss():
    cfg = get_preset("tiny-moe").replace(aux_loss_alpha=1e-2)
    model = build_model(cfg, seed=0).train()
    out = model(torch.randint(3, 128, (2, 8)), compute_mtp=True)
    assert len(out.mtp_logits) == 1 and out.mtp_logits[0].shape == out.logits.shape
    assert out.aux_loss.item() > 0
    (out.logits.mean() + out.mtp_logits[0].mean() + out.aux_loss).backward()
    assert model.model.layers[cfg.num_hidden_layers].eh_proj.weight.grad is not None


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-dense"])
def test_packed_attention_by_segment_groups_equals_the_block_diagonal_mask(preset):
    """Packed rows attend segment by segment (groups of similar length, model/segments.py SegmentLayout); with an
    attention_mask the model takes the [T, T] block-diagonal mask path instead: same logits, same gradients."""
    g = torch.Generator().manual_seed(0)
    B, T = 3, 40
    seg = torch.full((B, T), -1)
    for b in range(B):  # segments of 1-9 tokens, then the row's padding (its own segment, -1)
        t, i = 0, 0
        while t < T - 6 + 2 * b:
            n = int(torch.randint(1, 10, (1,), generator=g))
            seg[b, t:t + n] = i
            t, i = t + n, i + 1
    assert sum(len(r.unique_consecutive()) for r in seg) > 16  # more than one group of segments
    ids = torch.randint(3, 128, (B, T), generator=g)
    grads = []
    for mask in (None, torch.ones(B, T, dtype=torch.long)):
        model = build_model(get_preset(preset), seed=0).train()
        logits = model(ids, attention_mask=mask, segment_ids=seg).logits
        (logits.float() ** 2).mean().backward()
        grads.append((logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (la, ga), (lb, gb) = grads
    assert (la - lb).abs().max() < 1e-5
    assert ga.keys() == gb.keys()
    for n in ga:
        assert torch.allclose(ga[n], gb[n], atol=1e-6, rtol=1e-4), n


def test_packed_segments_equal_separate_sequences():
    model = build_model(get_preset("tiny-moe"), seed=0).eval()
    a = torch.randint(3, 128, (1, 5))
    b = torch.randint(3, 128, (1, 4))
    packed = torch.cat([a, b], 1)
    seg = torch.tensor([[0] * 5 + [1] * 4])
    with torch.no_grad():
        out = model(packed, segment_ids=seg).logits
        la, lb = model(a).logits, model(b).logits
    assert (out[:, :5] - la).abs().max() < 1e-5
    assert (out[:, 5:] - lb).abs().max() < 1e-5

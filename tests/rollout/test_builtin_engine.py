"""Built-in rollout engine: greedy decoding with the KV cache equals step-by-step full forwards; logprobs are the
policy's; a shared prompt's prefill and the dropping of finished rows change nothing; EOS / stop-string / length
finish reasons; sampling filters, and top-p's candidate search samples the exact nucleus distribution."""

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from r1moe.model import build_model, get_preset
from r1moe.rollout import BuiltinEngine, SamplingParams
from r1moe.rollout.builtin import sample_next


def _tokenizer(vocab_size=128):
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "</answer>": 3}
    for i in range(4, vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins with spaces
    return tok


@pytest.fixture(scope="module")
def engine():
    model = build_model(get_preset("tiny-moe"), seed=0).eval()
    return BuiltinEngine(model, _tokenizer(), eos_ids=[2])


def _greedy_reference(model, prompt, n):
    ids = list(prompt)
    out, lps = [], []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1]
            t = int(logits.argmax())
            out.append(t)
            lps.append(float(torch.log_softmax(logits, -1)[t]))
            ids.append(t)
    return out, lps


def test_greedy_batched_with_cache_equals_full_forward(engine):
    prompts = [[1, 10, 11, 12, 13], [1, 20], [1, 30, 31]]
    gens = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=6))
    for p, g in zip(prompts, gens):
        ref, ref_lp = _greedy_reference(engine.model, p, len(g.token_ids))
        assert g.token_ids == ref
        assert g.logprobs == pytest.approx(ref_lp, abs=1e-4)
        assert g.prompt_ids == p
        assert g.finish_reason in ("length", "eos", "stop")


def test_shared_prompts_and_dropped_rows_decode_as_alone(engine):
    """Rows of one prompt share its prefill, and rows that finish early leave the batch: every row still decodes
    exactly as its prompt does alone."""
    a, b, c = [1, 10, 11, 12, 13], [1, 20], [1, 30, 31]
    greedy = SamplingParams(temperature=0, max_new_tokens=8)
    alone = {tuple(p): engine.generate([p], greedy)[0] for p in (a, b, c)}
    batch = [a, b, a, c, a, b, c, c]
    for p, g in zip(batch, engine.generate(batch, greedy)):
        assert g.token_ids == alone[tuple(p)].token_ids
        assert g.logprobs == pytest.approx(alone[tuple(p)].logprobs, abs=1e-4)
    # one token of `a`'s greedy reply made an EOS: `a`'s rows (3 of 8) finish there and are dropped, the rest go on
    eos = alone[tuple(a)].token_ids[1]
    early = BuiltinEngine(engine.model, engine.tokenizer, eos_ids=[eos])
    for p, g in zip(batch, early.generate(batch, greedy)):
        ref = alone[tuple(p)].token_ids
        n = ref.index(eos) + 1 if eos in ref else len(ref)
        assert g.token_ids == ref[:n]
        assert g.finish_reason == ("eos" if eos in ref[:n] else "length")
    assert early.generate([a], greedy)[0].finish_reason == "eos"


def _nucleus(logits, top_p):
    """The top-p distribution, by a full sort (the definition)."""
    p = logits.softmax(-1)
    sp, order = p.sort(descending=True)
    keep = sp.cumsum(-1) - sp < top_p
    out = torch.zeros_like(p)
    out[order[keep]] = sp[keep]
    return out / out.sum()


@pytest.mark.parametrize("spread", [0.5, 8.0])  # a nucleus of a few tokens (among the candidates) / of hundreds
def test_top_p_samples_the_nucleus_distribution(spread):
    V, n = 512, 40000
    logits = torch.randn(V, generator=torch.Generator().manual_seed(0)) * (8.0 / spread)
    want = _nucleus(logits, 0.95)
    got = sample_next(logits.expand(n, V), SamplingParams(temperature=1.0, top_p=0.95), torch.Generator().manual_seed(1))
    freq = torch.bincount(got, minlength=V).float() / n
    assert set(got.tolist()) <= set(want.nonzero().squeeze(-1).tolist())
    assert (freq - want).abs().max() < 4 * (want.max() / n) ** 0.5 + 1e-3
    assert (want > 0).sum() > 64 if spread > 1 else (want > 0).sum() < 64


def test_finish_reasons(engine):
    model = engine.model
    # force the model to emit one token: an output head whose only non-zero row points along the hidden state
    saved = model.lm_head.weight.detach().clone()
    try:
        for forced, reason in [(2, "eos"), (3, "stop"), (50, "length")]:
            with torch.no_grad():
                model.lm_head.weight.zero_()
                model.lm_head.weight[forced] = 1e-3 * torch.ones(model.cfg.hidden_size)
                hidden_sign = model(torch.tensor([[1, 5]])).hidden[0, -1].sum().sign()
                model.lm_head.weight[forced] *= hidden_sign * 1e4
            g = engine.generate([[1, 5]], SamplingParams(temperature=0, max_new_tokens=4, stop=["</answer>"]))[0]
            assert g.finish_reason == reason, (forced, g)
            assert len(g.token_ids) == (4 if reason == "length" else 1)
    finally:
        with torch.no_grad():
            model.lm_head.weight.copy_(saved)


def test_sampling_is_seeded_and_filters():
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0]] * 2000)
    torch.manual_seed(0)
    top1 = sample_next(logits, SamplingParams(temperature=1.0, top_k=1), None)
    assert (top1 == 0).all()
    nucleus = sample_next(logits, SamplingParams(temperature=1.0, top_p=0.5), None)
    assert (nucleus == 0).all()  # p(token 0) = 0.72 >= 0.5 alone
    wide = sample_next(logits, SamplingParams(temperature=1.0, top_p=0.95), None)
    assert set(wide.tolist()) == {0, 1}  # tokens 2, 3 fall outside the 95% nucleus
    g1 = torch.Generator().manual_seed(3)
    g2 = torch.Generator().manual_seed(3)
    a = sample_next(logits[:50], SamplingParams(temperature=1.0), g1)
    b = sample_next(logits[:50], SamplingParams(temperature=1.0), g2)
    assert torch.equal(a, b)


def test_update_weights_from_hf_named_tensors(engine):
    other = build_model(get_preset("tiny-moe"), seed=7).eval()
    target = BuiltinEngine(build_model(get_preset("tiny-moe"), seed=1).eval(), _tokenizer(), eos_ids=[2])
    target.update_weights(other.state_dict().items())
    x = torch.tensor([[1, 4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(target.model(x).logits, other(x).logits)

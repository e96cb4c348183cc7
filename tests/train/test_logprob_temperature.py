"""Log-probs at the rollout temperature (rollout/base.py, train/policy.py): the built-in engine reports
log softmax(logits / T) of the sampled token, the trainer computes the same, so on-policy the ratio is 1."""

import pytest
import torch

from r1moe.algorithms import compute_token_logprobs
from r1moe.config import load_config
from r1moe.data.tokenizer import load_tokenizer
from r1moe.model import from_pretrained
from r1moe.rollout import BuiltinEngine, SamplingParams
from r1moe.rollout.sglang_engine import cut_at_stop, sampling_dict
from r1moe.train.policy import ReferencePolicy, build_rl_batch


def _teacher_forced(model, gens, temperature):
    batch = build_rl_batch(gens, 0, torch.device("cpu"))
    with torch.no_grad():
        logits = model(batch.input_ids_NT).logits
    return compute_token_logprobs(logits, batch.targets_NT, temperature=temperature), batch


def test_builtin_engine_logprobs_are_of_the_tempered_policy(tiny_base, one_thread):
    model, tok = from_pretrained(tiny_base).eval(), load_tokenizer(tiny_base)
    engine = BuiltinEngine(model, tok, eos_ids=[2])
    prompts = [tok.encode("3 + 4 =").ids, tok.encode("12 + 9 =").ids]
    for T, top_p in ((0.6, 0.95), (1.0, 1.0), (1.4, 0.9)):
        gens = engine.generate(prompts, SamplingParams(temperature=T, top_p=top_p, max_new_tokens=8, seed=1))
        ref, batch = _teacher_forced(model, gens, T)
        got = batch.rollout_logp_NT[batch.response_mask_NT]
        assert torch.allclose(got, ref[batch.response_mask_NT], atol=1e-4), T
        untempered, _ = _teacher_forced(model, gens, 1.0)
        if T != 1.0:  # the tempered and untempered distributions differ: the test can tell them apart
            assert not torch.allclose(got, untempered[batch.response_mask_NT], atol=1e-3)


def test_on_policy_ratio_is_one_at_any_temperature(tmp_path, tiny_base, tiny_data, one_thread):
    """The first mini-batch's pi_old (trainer) equals the engine's logprobs: logprob_abs_diff ~ 0 at T=0.7."""
    cfg = load_config("recipes/tiny/r1_zero/grpo.yaml", [f"model.init={tiny_base}", "algo.num_minibatches=2",
                                                         "train.batch_size=2", "rollout.temperature=0.7"])
    tok = load_tokenizer(tiny_base)
    policy = ReferencePolicy(cfg, tok, torch.device("cpu"), total_updates=4)
    engine = BuiltinEngine(policy.rollout_model(), tok, eos_ids=[2])
    gens = engine.generate([tok.encode("1 + 2 =").ids] * 4,
                           SamplingParams(temperature=0.7, max_new_tokens=6, seed=3))
    batch = build_rl_batch(gens, 0, torch.device("cpu"))
    m = policy.train_grpo(batch, torch.tensor([1.0, -1.0, 0.5, -0.5]), cfg.algo, 6.0, temperature=0.7)
    assert m["rollout/logprob_abs_diff"] < 1e-4
    assert abs(m["train/ratio_mean"] - 1.0) < 1e-3 or m["train/clip_frac"] >= 0  # second mini-batch moved
    # the same rollout judged at T=1 would not match: the temperature is what makes the ratio 1
    policy2 = ReferencePolicy(cfg, tok, torch.device("cpu"), total_updates=4)
    m1 = policy2.train_grpo(batch, torch.tensor([1.0, -1.0, 0.5, -0.5]), cfg.algo, 6.0, temperature=1.0)
    assert m1["rollout/logprob_abs_diff"] > 1e-3


def test_sglang_sampling_dict_and_stop_cut(tiny_base):
    from r1moe.rollout import SamplingParams as SP

    d = sampling_dict(SP(temperature=0.6, top_p=0.95, top_k=0, max_new_tokens=7), [2, 9])
    assert d["top_k"] == -1 and d["stop_token_ids"] == [2, 9] and d["max_new_tokens"] == 7
    assert d["temperature"] == 0.6 and d["top_p"] == 0.95
    tok = load_tokenizer(tiny_base)
    ids = tok.encode("7 = 7 done then more").ids
    cut, lps, was_cut = cut_at_stop(ids, [0.1] * len(ids), tok, ["done"])
    assert was_cut and tok.decode(cut).rstrip().endswith("done") and len(lps) == len(cut) < len(ids)
    same, _, was_cut = cut_at_stop(ids, [0.1] * len(ids), tok, ["absent"])
    assert same == ids and not was_cut


def test_sglang_engine_dir_holds_the_checkpoints_config_files(tmp_path, tiny_base):
    """SGLang starts from config files only when there is no init checkpoint: the same ones save_pretrained writes."""
    from r1moe.model import ModelConfig
    from r1moe.rollout.sglang_weights import write_engine_dir

    cfg = ModelConfig.from_json(tiny_base / "config.json")
    d = write_engine_dir(cfg, tmp_path / "engine", dtype=torch.float32)
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "generation_config.json"]
    for name in ("config.json", "generation_config.json"):
        assert (d / name).read_text() == (tiny_base / name).read_text()


def test_reference_grpo_micro_batches_accumulate_to_the_same_update(tiny_base, one_thread):
    """train.micro_batch_size splits each update's minibatch into forward/backward passes whose gradients add up to
    the whole minibatch's: the same weights after the step (any aggregation), the same metrics."""
    tok = load_tokenizer(tiny_base)
    engine = BuiltinEngine(from_pretrained(tiny_base).eval(), tok, eos_ids=[2])
    gens = engine.generate([tok.encode("1 + 2 =").ids, tok.encode("30 - 4 =").ids] * 3,
                           SamplingParams(temperature=1.0, max_new_tokens=7, seed=5))
    batch = build_rl_batch(gens, 0, torch.device("cpu"))
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.25, -0.25])
    for agg in ("seq_mean_group_mean", "token_mean"):
        after = []
        for micro in (0, 2, 1):
            torch.manual_seed(0)
            cfg = load_config("recipes/tiny/r1_zero/grpo.yaml", [
                f"model.init={tiny_base}", "algo.num_minibatches=2", "train.batch_size=2", f"algo.agg={agg}",
                f"train.micro_batch_size={micro}", "optim.lr=1e-3"])
            policy = ReferencePolicy(cfg, tok, torch.device("cpu"), total_updates=4)
            m = policy.train_grpo(batch, adv, cfg.algo, 6.0, temperature=1.0)
            after.append((m, [p.detach().clone() for p in policy.model.parameters()]))
        (m0, w0), *rest = after
        for m, w in rest:
            # float rounding of other batch shapes only (~3e-6), against steps of ~lr = 1e-3 (below)
            assert max(float((a - b).abs().max()) for a, b in zip(w0, w)) < 2e-5, agg
            assert m["train/grad_norm"] == pytest.approx(m0["train/grad_norm"], rel=1e-5)
            assert m["train/pg_loss"] == pytest.approx(m0["train/pg_loss"], abs=1e-6)
            assert m["rollout/logprob_abs_diff"] == pytest.approx(m0["rollout/logprob_abs_diff"], abs=1e-6)
        base = [p.detach() for p in from_pretrained(tiny_base).parameters()]
        moved = max(float((a - b).abs().max()) for a, b in zip(w0, base))
        assert moved > 5e-4, "the step changed nothing"

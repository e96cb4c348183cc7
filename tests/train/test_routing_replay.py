"""MoE routing replay (rollout.routing_replay, R3): the model routes by given expert ids, the built-in engine
returns the ids it routed each fed token to, SGLang's encoding decodes to the same layout, and GRPO carries them
from the engine into every forward of the update."""

import base64

import numpy as np
import pytest
import torch

from conftest import tiny_overrides
from r1moe.config import load_config
from r1moe.model import build_model, get_preset
from r1moe.rollout import BuiltinEngine, SamplingParams
from r1moe.rollout.sglang_engine import decode_routes
from r1moe.train import grpo
from r1moe.train.policy import ReferencePolicy, build_rl_batch, sequence_logprobs


def _tokenizer():
    from tokenizers import Tokenizer, models

    return Tokenizer(models.WordLevel({"<pad>": 0, **{f"w{i}": i for i in range(1, 512)}}, unk_token="<pad>"))


@pytest.fixture(scope="module")
def moe():
    return build_model(get_preset("tiny-moe"), seed=0).eval()


def test_replaying_the_models_own_routes_changes_nothing_and_keeps_the_gate_gradient(moe):
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        own = moe(ids, return_routes=True)
    M = len(moe.cfg.moe_layer_ids())
    assert own.routed_experts.shape == (2, 12, M, moe.cfg.num_experts_per_tok)
    moe.zero_grad()
    replayed = moe(ids, routed_experts=own.routed_experts)
    assert torch.equal(replayed.logits, own.logits)
    replayed.logits.float().pow(2).mean().backward()
    gate = moe.model.layers[moe.cfg.moe_layer_ids()[0]].mlp.gate.weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0  # the gating weights still come from the router
    moe.zero_grad()


def test_replay_routes_tokens_to_the_given_experts(moe):
    ids = torch.randint(3, 200, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        own = moe(ids, return_routes=True).routed_experts
        forced = (own + 1) % moe.cfg.n_routed_experts
        out = moe(ids, routed_experts=forced, return_routes=True)
    assert torch.equal(out.routed_experts, forced)
    assert not torch.allclose(out.logits, moe(ids).logits)


def test_routes_of_the_wrong_shape_name_the_expected_one(moe):
    ids = torch.zeros((1, 5), dtype=torch.long)
    with pytest.raises(ValueError, match="routed_experts: shape"):
        moe(ids, routed_experts=torch.zeros((1, 4, 1, moe.cfg.num_experts_per_tok), dtype=torch.long))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_builtin_engine_routes_reproduce_its_own_logprobs(moe, temperature):
    """Prompts of different lengths (left padding in the engine's batch) and early finishes: teacher forcing the
    returned sequences with the returned routes gives the engine's logprobs. Misaligned routes would route tokens
    to other experts and move them by far more than the tolerance (cached decode vs full forward, fp32)."""
    engine = BuiltinEngine(moe, _tokenizer(), eos_ids=[2], return_routed_experts=True)
    prompts = [[1, 10, 11, 12, 13, 14, 15], [1, 20], [1, 30, 31, 32]]
    gens = engine.generate(prompts, SamplingParams(temperature=temperature, max_new_tokens=9, seed=3))
    M, K = len(moe.cfg.moe_layer_ids()), moe.cfg.num_experts_per_tok
    for g in gens:
        assert g.routed_experts.dtype == torch.uint8
        assert tuple(g.routed_experts.shape) == (len(g.prompt_ids) + len(g.token_ids) - 1, M, K)
    batch = build_rl_batch(gens, 0, torch.device("cpu"))
    assert batch.routes_NTMK is not None and batch.routes_NTMK.shape[:2] == batch.input_ids_NT.shape
    with torch.no_grad():
        logp, _ = sequence_logprobs(moe, batch, temperature)
    m = batch.response_mask_NT
    assert (logp - batch.rollout_logp_NT).abs()[m].max() < 1e-4
    shifted = build_rl_batch(gens, 0, torch.device("cpu"))
    shifted.routes_NTMK = (shifted.routes_NTMK + 1) % moe.cfg.n_routed_experts
    with torch.no_grad():
        wrong, _ = sequence_logprobs(moe, shifted, temperature)
    assert (wrong - batch.rollout_logp_NT).abs()[m].max() > 1e-2


def test_builtin_engine_without_routes_returns_none_and_refuses_dense_models(moe):
    gens = BuiltinEngine(moe, _tokenizer(), eos_ids=[2]).generate([[1, 5]], SamplingParams(max_new_tokens=2))
    assert gens[0].routed_experts is None
    with pytest.raises(ValueError, match="no MoE layers"):
        BuiltinEngine(build_model(get_preset("tiny-dense")), _tokenizer(), eos_ids=[2], return_routed_experts=True)


def test_sglang_route_encoding_decodes_to_the_moe_layers_of_the_fed_tokens():
    """SGLang's meta_info["routed_experts"]: base64 of int32 [tokens, num_hidden_layers, K], dense layers zero."""
    cfg = get_preset("tiny-moe").replace(first_k_dense_replace=1)
    L, K, fed = cfg.num_hidden_layers, cfg.num_experts_per_tok, 7
    arr = np.random.default_rng(0).integers(0, cfg.n_routed_experts, (fed + 1, L, K)).astype(np.int32)
    arr[:, 0] = 0  # the dense layer
    raw = base64.b64encode(arr.tobytes()).decode()
    got = decode_routes(raw, cfg, fed)
    assert torch.equal(got.long(), torch.from_numpy(arr[:fed, 1:]).long())
    with pytest.raises(RuntimeError, match="routed expert ids"):
        decode_routes(raw, cfg, fed + 2)
    with pytest.raises(RuntimeError, match="routed expert ids"):
        decode_routes(base64.b64encode(arr.tobytes()[:-4]).decode(), cfg, fed)


def test_grpo_replays_the_engines_routes_in_every_forward(tmp_path, tiny_data, tiny_base):
    seen = []

    class Recording(ReferencePolicy):
        def train_grpo(self, batch, *args, **kwargs):
            seen.append(batch.routes_NTMK)
            return super().train_grpo(batch, *args, **kwargs)

    cfg = load_config("recipes/tiny/r1_zero/grpo.yaml", tiny_overrides(tmp_path / "run", **{
        "model.init": tiny_base, "data.train": tiny_data / "train.jsonl", "data.eval": "null", "stage": "grpo",
        "train.steps": 2, "train.batch_size": 2, "rollout.group_size": 4, "rollout.max_new_tokens": 8,
        "rewards.weights": "{length: 1.0}", "algo.num_minibatches": 2, "rollout.routing_replay": "true"}))
    grpo.run(cfg, policy_factory=lambda c, tok, dev: Recording(c, tok, dev, 4))
    from r1moe.tracking import read_metrics

    steps = [m for m in read_metrics(cfg.run_dir) if "reward/total" in m]
    assert len(seen) == 2 and all(r is not None and r.dtype == torch.uint8 for r in seen)
    assert all(m["rollout/logprob_abs_diff"] < 1e-4 for m in steps)


def test_routing_replay_needs_an_moe_policy(tmp_path, tiny_data, tiny_base):
    class Dense:
        model_cfg = get_preset("tiny-dense")
        is_main = True

    cfg = load_config("recipes/tiny/r1_zero/grpo.yaml", tiny_overrides(tmp_path / "run", **{
        "model.init": tiny_base, "data.train": tiny_data / "train.jsonl", "rollout.routing_replay": "true"}))
    from r1moe.data.tokenizer import load_tokenizer

    with pytest.raises(ValueError, match="rollout.routing_replay=true"):
        grpo.build_engine(cfg, Dense(), load_tokenizer(tiny_base), tmp_path)


def test_routing_replay_with_pipeline_recompute_is_refused():
    from r1moe.train.checks import check_megatron_config

    cfg = load_config("recipes/tiny/r1_zero/grpo.yaml", [
        "parallel.backend=megatron", "parallel.pp=2", "parallel.recompute=full", "rollout.routing_replay=true"])
    with pytest.raises(ValueError, match="rollout.routing_replay=true with parallel.pp=2"):
        check_megatron_config(cfg)


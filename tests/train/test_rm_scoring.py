"""Batched reward-model scoring (stage 4's R_RM): scores of length-sorted batches equal one-by-one scores, in the
input order, with one forward per batch instead of one per completion; compute_rewards scores a BatchReward with one
call per step; under torch.distributed every rank scores its share (torchrun, 2 CPU processes, gloo) and receives
all the scores; the megatron reward model's data-parallel micro-batch plan covers the step's examples once, and
its micro-batch losses add up to the step's loss under megatron's reductions, and its save path writes the
reference's final/ layout.

Tolerance: 1e-5 absolute on scores of order 1. Float32 on the CPU; mathematically a sequence's score does not
depend on its batch (right padding after the last token, causal attention, per-token MoE routing without capacity),
only the blocking of the GEMMs changes with the batch shape (differences ~1e-7 here). A wrong index (the last pad
instead of the last token) or a mixed-up order moves scores by O(1).
"""

import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from r1moe.config import load_config
from r1moe.data import PromptSample, make_preference_pairs
from r1moe.data.tokenizer import build_tiny_tokenizer, default_corpus
from r1moe.model import build_model, get_preset
from r1moe.rewards import compute_rewards
from r1moe.train.megatron_rm import MegatronRewardModel, micro_batch_loss, plan_micro_batches
from r1moe.train.rm import (
    PairwiseObjective,
    PointwiseObjective,
    RewardModel,
    RewardModelReward,
    encode_scored,
    length_batches,
    load_reward_model,
    save_reward_model,
    score_sequences,
)

WORKER = Path(__file__).with_name("rm_shard_worker.py")
META = {"template": "chat", "scope": "summary", "seq_len": 256}


@pytest.fixture(scope="module", autouse=True)
def _single_thread(one_thread):
    """Every test of this module runs on one intra-op thread (tests/conftest.py: one_thread)."""


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A reward model with a random (non-zero) head, saved; 24 sequences of different lengths."""
    root = tmp_path_factory.mktemp("rm_scoring")
    tok = build_tiny_tokenizer(default_corpus(num_per_task=50), vocab_size=512)
    rm = RewardModel(build_model(get_preset("tiny-moe").replace(num_hidden_layers=2), seed=0)).eval()
    torch.manual_seed(0)
    torch.nn.init.normal_(rm.score_head.weight, std=0.1)
    torch.nn.init.normal_(rm.score_head.bias, std=0.1)
    save_reward_model(rm, tok, root / "rm", META)
    pairs = make_preference_pairs(12, seed=2, template="chat")
    seqs = [encode_scored(tok, "chat", p.prompt, r, "summary", 256) for p in pairs for r in (p.chosen, p.rejected)]
    assert len({len(s) for s in seqs}) > 4  # batches really pad
    return root, tok, rm, seqs


def _counting(rm: RewardModel) -> list[int]:
    """Rows of every forward of `rm` from now on."""
    rows: list[int] = []
    rm.register_forward_hook(lambda module, args, output: rows.append(args[0].shape[0]))
    return rows


def test_length_batches_sort_and_cover():
    seqs = [[1] * n for n in (5, 1, 9, 3, 3, 7, 2)]
    batches = length_batches(seqs, 3)
    assert [len(b) for b in batches] == [3, 3, 1]
    assert sorted(i for b in batches for i in b) == list(range(7))
    lengths = [len(seqs[i]) for b in batches for i in b]
    assert lengths == sorted(lengths)


def test_batched_scores_equal_one_by_one_with_fewer_forwards(scored):
    _, _, rm, seqs = scored
    forwards = _counting(rm)
    one_by_one = torch.cat([score_sequences(rm, [s], pad_id=0) for s in seqs])
    assert len(forwards) == len(seqs)
    forwards.clear()
    batched = score_sequences(rm, seqs, pad_id=0, batch=8)
    assert len(forwards) == math.ceil(len(seqs) / 8) == 3
    assert one_by_one.std() > 0.1  # not a constant
    assert torch.allclose(batched, one_by_one, atol=1e-5, rtol=0), (batched - one_by_one).abs().max()


def test_compute_rewards_scores_a_step_with_one_forward(scored):
    root, _, _, _ = scored
    rm, tok, meta = load_reward_model(root / "rm", device="cpu")
    fn = RewardModelReward(rm, tok, meta, "chat")
    pairs = make_preference_pairs(6, seed=5, template="chat")
    samples = [PromptSample(prompt=p.prompt, answer="", kind="general") for p in pairs] + [
        PromptSample(prompt="Compute 2 + 3", answer="5", kind="math", task="arithmetic")] * 2
    completions = ["<think>\n" + p.chosen for p in pairs] + ["<think>\nx\n</think>\n<answer>5</answer>"] * 2
    forwards = _counting(rm)
    one_by_one = [fn(c, s) for c, s in zip(completions, samples)]
    assert len(forwards) == len(pairs)  # one forward per general completion (a math one gets 0.0 unscored)
    forwards.clear()
    rewards = compute_rewards(completions, samples, {"reward_model": 1.0}, extra={"reward_model": fn})
    assert len(forwards) == 1 and forwards[0] == len(pairs)  # the general ones, in one forward
    assert rewards.components["reward_model"] == pytest.approx(one_by_one, abs=1e-5)
    assert rewards.components["reward_model"][-2:] == [0.0, 0.0]


def test_each_rank_scores_its_share_and_gets_all_scores(scored, tmp_path):
    root, _, _, seqs = scored
    (tmp_path / "seqs.json").write_text(json.dumps(seqs))
    out = tmp_path / "ranks.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER),
           str(root / "rm"), str(tmp_path / "seqs.json"), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = json.loads(out.read_text())
    expected = score_sequences(load_reward_model(root / "rm", device="cpu")[0], seqs, pad_id=0)
    for r in ranks:
        assert torch.allclose(torch.tensor(r["scores"]), expected, atol=1e-5, rtol=0)
        # 24 sequences, 12 per rank, batches of 4: three forwards each instead of six for one process
        assert r["forward_rows"] == [4, 4, 4]


@pytest.mark.parametrize("num, dp, micro", [(16, 1, 4), (16, 2, 4), (5, 2, 0), (3, 4, 2), (10, 3, 3), (7, 2, 0)])
def test_megatron_micro_batch_plan_covers_each_example_once(num, dp, micro):
    plan = plan_micro_batches(num, dp, micro)
    assert len(plan) == dp
    assert len({len(rank) for rank in plan}) == 1  # every rank runs the same number of micro-batches
    flat = [i for rank in plan for r in rank for i in r]
    assert flat == list(range(num))  # contiguous blocks in order, each example once
    assert all(len(r) <= (micro or math.ceil(num / dp)) for rank in plan for r in rank)


@pytest.mark.parametrize("objective", [PairwiseObjective(), PointwiseObjective()], ids=["pairwise", "pointwise"])
@pytest.mark.parametrize("num, dp, micro", [(16, 1, 4), (16, 2, 4), (10, 3, 3), (7, 4, 0)])
def test_megatron_micro_batch_losses_add_up_to_the_step_loss(objective, num, dp, micro):
    """What megatron does with micro_batch_loss (sum of losses over micro-batches, mean of the other metrics; then
    the mean over data-parallel ranks) gives the full batch's loss, accuracy and margin, as the reference step
    computes them; padding rows (after each micro-batch's own) hold garbage that must not count."""
    g = torch.Generator().manual_seed(num * 100 + dp)
    pairwise = isinstance(objective, PairwiseObjective)
    # an example is (chosen score, rejected score) or (score, safe); sequences() only needs its length
    examples = [(float(torch.randn(1, generator=g)), float(torch.randn(1, generator=g))) if pairwise
                else ([0], bool(i % 3)) for i in range(num)]
    score_of = {id(ex): float(torch.randn(1, generator=g)) for ex in examples}

    def rows(part: list) -> torch.Tensor:
        own = ([c for c, _ in part] + [r for _, r in part]) if pairwise else [score_of[id(ex)] for ex in part]
        return torch.tensor(own + [1e3, -1e3])  # padding rows

    full_loss, full_ok, full_margin = objective.loss(rows(examples)[:-2], examples)
    plan = plan_micro_batches(num, dp, micro)
    per_rank = []
    for rank in plan:
        parts = [[examples[j] for j in r] for r in rank]
        out = [micro_batch_loss(objective, rows(part), part, num / dp, len(parts)) for part in parts]
        per_rank.append((sum(float(loss) for loss, _ in out),
                         sum(float(m["accuracy"]) for _, m in out) / len(out),
                         sum(float(m["margin"]) for _, m in out) / len(out)))
    loss, accuracy, margin = (sum(x) / dp for x in zip(*per_rank))
    assert loss == pytest.approx(float(full_loss), abs=1e-5)
    assert accuracy == pytest.approx(sum(full_ok) / num, abs=1e-6)
    assert margin == pytest.approx(sum(full_margin) / num, abs=1e-5)


class _ExportedRM(MegatronRewardModel):
    """MegatronRewardModel's save path in a world of one, without megatron: its export is a reference model's
    HF-named tensors and its score head is given (what the megatron model gathers from its ranks)."""

    def __init__(self, rm: RewardModel):
        self.cfg, self.rank, self.models, self.model_cfg = load_config(None), 0, [rm.backbone], rm.backbone.cfg
        self._head = {k: v.detach().clone() for k, v in rm.score_head.state_dict().items()}

    def _export(self):
        yield from self.models[0].state_dict().items()

    def head_state(self) -> dict[str, torch.Tensor]:
        return self._head


def test_megatron_final_dir_loads_with_the_reference_loader(scored, tmp_path):
    """save_final_rm (rank 0 of a gloo world of one) writes final/ + DONE.json; the reference loader reads back
    the model it exported, with the same scores."""
    _, tok, rm, seqs = scored
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        _ExportedRM(rm).save_final_rm(tmp_path, tok, META, {"stage": "rm"})
    finally:
        dist.destroy_process_group()
    loaded, _, meta = load_reward_model(tmp_path / "final", device="cpu")
    assert meta == META
    assert json.loads((tmp_path / "DONE.json").read_text())["backend"] == "megatron"
    expected = score_sequences(rm, seqs, pad_id=0)
    assert expected.std() > 0.1  # not a constant
    assert torch.allclose(score_sequences(loaded, seqs, pad_id=0), expected, atol=1e-5, rtol=0)

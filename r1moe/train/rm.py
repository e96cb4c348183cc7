"""The reward models of DeepSeek-R1 (v2 §3.1): the R1 architecture with a scalar head, used by all-scenario RL
(stage 4, v2 §3.2.2 eq. 8-10) to score `general` prompts, whose replies no rule can check. `rm.kind`:
- helpful: Bradley-Terry on preference pairs, -log sigmoid(s_chosen - s_rejected), reading the final summary;
- safety: pointwise safe/unsafe labels (SafetySample JSONL, v2: "106k prompts ... labelled safe/unsafe, pointwise"),
  binary cross-entropy on the score (label 1 = safe), reading the whole response, reasoning included.

    r1moe rm recipes/tiny/r1/rm.yaml [key=value ...] [--resume]
    python -m r1moe.train.rm recipes/tiny/r1/rm.yaml

Paper settings (R1-SETTINGS §2): batch 256 pairs, LR 6e-6, 1 epoch, max length 8,192, "scores the final summary
only". Here `train.batch_size` counts pairs, `data.seq_len` is the max length, `model.init` the checkpoint the
backbone starts from (required), `data.template` renders the prompt.

What the RM reads (`scope`): "summary" (the paper's helpful RM) = rendered prompt + the reply after its last
`</think>` (the whole reply when it has none); "full" (the paper's safety RM reads the whole response) = rendered
prompt + the reply. Training and scoring apply the same scope; it is saved with the model. Each sequence is
[bos] + prompt + scored reply + [eos], left-truncated to `seq_len`; the score is the head on the final normed hidden
state of the last non-pad token (the EOS). Pairs whose two scored sequences are identical carry no signal for the
chosen scope (e.g. two replies with the same summary) and are dropped, with their count logged.

Saved reward model = an HF checkpoint directory of the backbone (tokenizer included, so `from_pretrained` reads it)
+ `score_head.safetensors` + `reward_model.json` (template, scope, max length, squash), written atomically as one
directory by `save_pretrained(extra_files=...)`. Intermediate checkpoints keep the head in trainer_state.pt.

Squash: GRPO adds R_RM to rule rewards in {0, 1} (v2 eq. 8); a Bradley-Terry score is a logit defined up to a
constant, so `load_reward_fn` returns sigmoid(score) in (0, 1): the probability that the reply beats a reference
reply of score 0. Group-normalised advantages (eq. 3) see only the ranking and spread inside a group; the squash sets
the RM's weight against the rule rewards. The paper does not state its normalisation.

Backends: this file is the reference backend (one device); `parallel.backend: megatron` trains the same model and
objective over TP/PP/EP/DP (train/megatron_rm.py) and writes the same final/ directory. Stage 4 scores every
completion of a step in one call (`RewardModelReward.score_batch`: length-sorted batches of EVAL_BATCH, and under
torchrun each rank its share, `score_shared`).

Legend: B pairs in a (micro-)batch, N = 2B sequences (chosen rows then rejected rows), T padded length, H hidden.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from tokenizers import Tokenizer
from torch import nn

from r1moe.algorithms import compute_bradley_terry_loss
from r1moe.cli import stage_main
from r1moe.config import JobConfig
from r1moe.data import PreferencePair, PromptSample, SafetySample, read_pairs, read_safety
from r1moe.data.prompts import encode, encode_prompt
from r1moe.data.tokenizer import special_ids
from r1moe.model import CausalLM
from r1moe.progress import progress_bar
from r1moe.templates import THINK_CLOSE, completion_prefix
from r1moe.tracking import MetricsLogger

from . import checkpointing, checks, common, rundir
from .guard import NonFiniteGuard, check_finite_state_dict, nonfinite_tensor
from .packing import shuffled_indices

Scope = Literal["summary", "full"]
DEFAULT_SCOPE: Scope = "summary"
"""The paper's helpful RM; the safety RM (rm.kind=safety) reads the whole response ("full")."""
SCOPE_OF_KIND: dict[str, Scope] = {"helpful": "summary", "safety": "full"}
SCORE_HEAD_FILE = "score_head.safetensors"
META_FILE = "reward_model.json"
EVAL_BATCH = 64


# ---------------------------------------------------------------------------------------------- model
@dataclass
class RMOutput:
    scores_N: torch.Tensor
    """float32 scalar score per sequence."""
    aux_loss: torch.Tensor
    expert_counts: torch.Tensor | None


class RewardModel(nn.Module):
    """A CausalLM backbone + `score_head` (hidden -> 1, float32) on the last non-pad token's final hidden state."""

    def __init__(self, backbone: CausalLM):
        super().__init__()
        self.backbone = backbone
        p = backbone.lm_head.weight
        self.score_head = nn.Linear(backbone.cfg.hidden_size, 1, device=p.device, dtype=torch.float32)
        # Zero init: every pair starts at the Bradley-Terry baseline loss log 2.
        nn.init.zeros_(self.score_head.weight)
        nn.init.zeros_(self.score_head.bias)

    def forward(self, input_ids_NT: torch.Tensor, attention_mask_NT: torch.Tensor) -> RMOutput:
        out = self.backbone(input_ids_NT, attention_mask=attention_mask_NT)
        T = input_ids_NT.shape[1]
        # Index of the last 1 in the mask: right or left padding alike.
        last_N = (attention_mask_NT.long() * torch.arange(1, T + 1, device=input_ids_NT.device)).argmax(-1)
        h_NH = out.hidden[torch.arange(len(last_N), device=last_N.device), last_N]
        return RMOutput(self.score_head(h_NH.float()).squeeze(-1), out.aux_loss, out.expert_counts)


def scored_reply(reply: str, scope: Scope) -> str:
    """The part of a reply the RM reads: after the last `</think>` for "summary" (the whole reply if none)."""
    if scope == "full":
        return reply
    if scope == "summary":
        return reply.rsplit(THINK_CLOSE, 1)[-1]
    raise ValueError(f"reward model scope {scope!r}: expected 'summary' or 'full'")


def encode_scored(tok: Tokenizer, template: str, prompt: str, reply: str, scope: Scope, seq_len: int) -> list[int]:
    """[bos] + rendered prompt + scored reply + [eos], keeping the last `seq_len` tokens (the score reads the end)."""
    ids = encode_prompt(tok, template, prompt)
    ids += encode(tok, scored_reply(reply, scope)) + [special_ids(tok)[2]]
    return ids[-seq_len:]


def build_rm_batch(seqs: Sequence[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids_NT, attention_mask_NT)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for n, s in enumerate(seqs):
        ids[n, :len(s)] = torch.tensor(s)
        mask[n, :len(s)] = 1
    return ids.to(device), mask.to(device)


def length_batches(seqs: Sequence[list[int]], batch: int) -> list[list[int]]:
    """Indices of `seqs` sorted by length, in chunks of `batch`: each chunk is padded only to its own longest."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    return [order[i:i + batch] for i in range(0, len(order), batch)]


@torch.no_grad()
def score_sequences(rm: RewardModel, seqs: Sequence[list[int]], pad_id: int, batch: int = EVAL_BATCH) -> torch.Tensor:
    """Raw scores [N] of token sequences in their input order, in eval mode (the caller's mode is restored): one
    forward per `batch` sequences of similar length (length_batches). A sequence's score does not depend on its
    batch: right padding follows the last token, which attends to its own prefix only."""
    was_training = rm.training
    rm.eval()
    device = rm.score_head.weight.device
    out = torch.zeros(len(seqs))
    for idx in length_batches(seqs, batch):
        out[idx] = rm(*build_rm_batch([seqs[i] for i in idx], pad_id, device)).scores_N.float().cpu()
    rm.train(was_training)
    return out


# ---------------------------------------------------------------------------------------------- save / load
def save_reward_model(rm: RewardModel, tok: Tokenizer, path: str | Path, meta: dict[str, Any]) -> Path:
    """One atomic directory: backbone HF checkpoint + tokenizer + score_head.safetensors + reward_model.json."""
    from r1moe.model import save_pretrained

    head = {k: v.detach().float().cpu().contiguous() for k, v in rm.score_head.state_dict().items()}
    extra = {SCORE_HEAD_FILE: save(head), META_FILE: json.dumps(meta, indent=2) + "\n"}
    return save_pretrained(rm.backbone, path, tokenizer=tok, extra_files=extra)


def load_reward_model(path: str | Path, device: str = "auto") -> tuple[RewardModel, Tokenizer, dict[str, Any]]:
    """(reward model in eval mode, its tokenizer, reward_model.json). Errors name the missing file."""
    from r1moe.data.tokenizer import load_tokenizer
    from r1moe.model import from_pretrained

    path = Path(path)
    for name in ("config.json", SCORE_HEAD_FILE, META_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path}: not a reward model directory (no {name}; train one with `r1moe rm`)")
    meta = json.loads((path / META_FILE).read_text())
    dev = common.resolve_device(device)
    if dev.type == "cuda" and dev.index is None:  # under torchrun (stage 4 on megatron): this rank's GPU
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    rm = RewardModel(from_pretrained(path, device=str(dev)))
    try:
        head = load_file(path / SCORE_HEAD_FILE, device=str(dev))
    except SafetensorError as e:
        raise ValueError(f"{path / SCORE_HEAD_FILE}: not a readable safetensors file ({e})") from None
    if nonfinite_tensor(head.items()) is not None:
        raise ValueError(f"{path / SCORE_HEAD_FILE}: tensor {nonfinite_tensor(head.items())!r} holds NaN/inf")
    rm.score_head.load_state_dict(head)
    return rm.eval(), load_tokenizer(path), meta


class RewardModelReward:
    """The `reward_model` reward of all-scenario RL (R1 v2 eq. 8): sigmoid(RM score) for `general` samples, 0.0 for
    the others (reasoning prompts get rule rewards). `completion` is what GRPO scores: completion_prefix(template) +
    generated text. `score_batch` scores many at once."""

    def __init__(self, rm: RewardModel, tok: Tokenizer, meta: dict[str, Any], template: str):
        if template != meta["template"]:
            raise ValueError(f"reward model was trained on prompts rendered with template {meta['template']!r}, "
                             f"but the policy uses {template!r}; train the RM with data.template={template}")
        self.rm, self.tok, self.meta, self.template = rm, tok, meta, template
        self.pad_id = special_ids(tok)[0]
        self.prefix = completion_prefix(template) if template != "none" else ""

    def score_batch(self, completions: Sequence[str], samples: Sequence[PromptSample]) -> list[float]:
        """All completions of a step at once (r1moe.rewards.compute_rewards calls this for a BatchReward). With
        torch.distributed initialised and several ranks it is collective: every rank holds the same completions
        (GRPO broadcasts them), scores its own share and receives the others' (score_shared)."""
        idx = [i for i, s in enumerate(samples) if s.kind == "general"]
        seqs = [encode_scored(self.tok, self.template, samples[i].prompt, completions[i].removeprefix(self.prefix),
                              self.meta["scope"], self.meta["seq_len"]) for i in idx]
        out = [0.0] * len(samples)
        for i, s in zip(idx, torch.sigmoid(score_shared(self.rm, seqs, self.pad_id)).tolist()):
            out[i] = s
        return out

    def __call__(self, completion: str, sample: PromptSample) -> float:
        return self.score_batch([completion], [sample])[0]


def score_shared(rm: RewardModel, seqs: Sequence[list[int]], pad_id: int, batch: int = EVAL_BATCH) -> torch.Tensor:
    """score_sequences spread over the ranks of torch.distributed, when it is initialised with several: rank r
    scores the sorted-by-length sequences r, r + W, r + 2W, ... (equal work, similar lengths per batch), then one
    all-reduce of the [N] scores gives every rank all of them. Collective: all ranks call it with the same `seqs`."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or not seqs:
        return score_sequences(rm, seqs, pad_id, batch)
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))[rank::world]
    out = torch.zeros(len(seqs), device=rm.score_head.weight.device)
    out[mine] = score_sequences(rm, [seqs[i] for i in mine], pad_id, batch).to(out.device)
    dist.all_reduce(out)  # each score comes from exactly one rank; the others add 0
    return out.cpu()


def load_reward_fn(path: str | Path, template: str) -> RewardModelReward:
    """`(completion, sample) -> float` over the reward model saved at `path` (device auto)."""
    return RewardModelReward(*load_reward_model(path), template=template)


# ---------------------------------------------------------------------------------------------- training
def encode_pairs(pairs: Sequence[PreferencePair], tok: Tokenizer, template: str, scope: Scope, seq_len: int
                 ) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(chosen ids, rejected ids) per pair, and how many pairs were dropped because both read the same."""
    out = []
    for p in pairs:
        c, r = (encode_scored(tok, template, p.prompt, reply, scope, seq_len) for reply in (p.chosen, p.rejected))
        if c != r:
            out.append((c, r))
    return out, len(pairs) - len(out)


def pair_batch(num_pairs: int, step: int, batch: int, seed: int) -> list[int]:
    """Pair indices of `step` (1-based): a seeded shuffle per epoch, position (step - 1) * batch, so resume is exact."""
    return shuffled_indices(num_pairs, (step - 1) * batch, batch, seed)


def evaluate_pairs(rm: RewardModel, pairs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, float]:
    """Pairwise accuracy (chosen strictly above rejected), Bradley-Terry loss and mean margin."""
    return PairwiseObjective().evaluate(rm, pairs, pad_id)


# ---------------------------------------------------------------------------------------------- objectives
class PairwiseObjective:
    """Helpful RM: examples are (chosen ids, rejected ids); Bradley-Terry loss, pairwise accuracy and margin."""

    kind, unit = "bradley_terry", "pairs"

    def sequences(self, part):
        return [c for c, _ in part] + [r for _, r in part]

    def loss(self, scores_N: torch.Tensor, part) -> tuple[torch.Tensor, list[bool], list[float]]:
        chosen, rejected = scores_N[:len(part)], scores_N[len(part):]
        return (compute_bradley_terry_loss(chosen, rejected), (chosen > rejected).tolist(),
                (chosen - rejected).detach().tolist())

    def metrics(self, scores_N: torch.Tensor, data) -> dict[str, float]:
        """Held-out metrics from the scores of self.sequences(data) (either backend scores them)."""
        chosen, rejected = scores_N[:len(data)], scores_N[len(data):]
        return {"accuracy": float((chosen > rejected).float().mean()),
                "loss": float(compute_bradley_terry_loss(chosen, rejected)),
                "margin": float((chosen - rejected).mean())}

    def evaluate(self, rm: RewardModel, data, pad_id: int) -> dict[str, float]:
        return self.metrics(score_sequences(rm, self.sequences(data), pad_id), data)


class PointwiseObjective:
    """Safety RM: examples are (ids, safe); binary cross-entropy of sigmoid(score) against the label, accuracy of
    score > 0, and the margin mean(score | safe) - mean(score | unsafe)."""

    kind, unit = "pointwise_bce", "samples"

    def sequences(self, part):
        return [ids for ids, _ in part]

    def loss(self, scores_N: torch.Tensor, part) -> tuple[torch.Tensor, list[bool], list[float]]:
        labels = torch.tensor([float(safe) for _, safe in part], device=scores_N.device)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(scores_N, labels)
        return loss, ((scores_N > 0) == labels.bool()).tolist(), (scores_N.detach() * (2 * labels - 1)).tolist()

    def evaluate(self, rm: RewardModel, data, pad_id: int) -> dict[str, float]:
        return self.metrics(score_sequences(rm, self.sequences(data), pad_id), data)

    def metrics(self, s: torch.Tensor, data) -> dict[str, float]:
        loss, correct, _ = self.loss(s, data)
        safe = torch.tensor([safe for _, safe in data])
        margin = (float(s[safe].mean() - s[~safe].mean()) if safe.any() and (~safe).any() else float("nan"))
        return {"accuracy": statistics.fmean(correct), "loss": float(loss), "margin": margin}


def encode_safety(samples: Sequence[SafetySample], tok: Tokenizer, template: str, seq_len: int
                  ) -> list[tuple[list[int], bool]]:
    return [(encode_scored(tok, template, s.prompt, s.response, "full", seq_len), s.safe) for s in samples]


def _load(cfg: JobConfig, scope: Scope):
    """Inputs checked before a run directory exists: init checkpoint, tokenizer, pairs (or safety labels)."""
    checks.validate(cfg)  # data.train, model.init, the parallel layout
    if cfg.parallel.backend == "megatron":
        from .megatron_backend import check_megatron_backend

        check_megatron_backend(cfg)  # a GPU, megatron-core and Transformer Engine
    if scope not in ("summary", "full"):
        raise ValueError(f"reward model scope {scope!r}: expected 'summary' or 'full'")
    common.init_checkpoint_dir(cfg.model)
    tok = common.load_stage_tokenizer(cfg)
    if cfg.rm.kind == "safety":
        train = encode_safety(read_safety(cfg.data.train), tok, cfg.data.template, cfg.data.seq_len)
        if len({safe for _, safe in train}) < 2:
            raise ValueError(f"data.train={cfg.data.train}: every sample has the same `safe` label; a pointwise "
                             f"safety model needs both safe and unsafe samples")
        held_out = encode_safety(read_safety(cfg.data.eval), tok, cfg.data.template, cfg.data.seq_len) \
            if cfg.data.eval else []
        return PointwiseObjective(), train, 0, (held_out, 0), tok
    train, dropped = encode_pairs(read_pairs(cfg.data.train), tok, cfg.data.template, scope, cfg.data.seq_len)
    if not train:
        raise ValueError(f"data.train={cfg.data.train}: all {dropped} pairs read the same for chosen and rejected "
                         f"under scope {scope!r}; nothing to learn")
    held_out = ([], 0)
    if cfg.data.eval:
        held_out = encode_pairs(read_pairs(cfg.data.eval), tok, cfg.data.template, scope, cfg.data.seq_len)
    return PairwiseObjective(), train, dropped, held_out, tok


def run(cfg: JobConfig, resume: bool = False, scope: Scope | None = None) -> dict:
    """Train the reward model of `cfg.rm.kind`. `scope` overrides what a helpful RM reads ("full": the whole reply);
    the safety RM always reads the whole response."""
    if scope is not None and cfg.rm.kind == "safety" and scope != "full":
        raise ValueError(f"rm.kind=safety reads the whole response; scope={scope!r} contradicts it")
    scope = scope or SCOPE_OF_KIND[cfg.rm.kind]
    objective, train, dropped, (held_out, eval_dropped), tok = _load(cfg, scope)
    B = cfg.train.batch_size
    steps = cfg.train.steps
    if cfg.train.epochs is not None:
        steps = max(1, math.ceil(cfg.train.epochs * len(train) / B))
    if cfg.parallel.backend == "megatron":
        from .megatron_rm import train_megatron_rm

        return train_megatron_rm(cfg, resume, scope, steps, objective, train, dropped, held_out, eval_dropped, tok)
    device = common.setup_torch(cfg.train)
    rm = RewardModel(common.build_policy(cfg, tok, device)).train()  # a bad model.init fails before the run dir
    run_dir = rundir.prepare_run_dir(cfg, resume)
    opt, sched = common.build_optimizer(rm, cfg.optim, steps)
    guard = NonFiniteGuard(cfg.train.max_nonfinite_steps, what="rm")
    start = 0
    if resume and (ckpt := rundir.latest_checkpoint(run_dir)) is not None:
        state = checkpointing.restore_checkpoint(ckpt, rm.backbone, opt, sched)
        rm.score_head.load_state_dict(state.extra["score_head"])
        guard.load_state_dict(state.extra.get("nonfinite", {}))
        start = state.step
    pad = special_ids(tok)[0]
    mb = cfg.train.micro_batch_size or B
    logger = MetricsLogger(run_dir, project=cfg.logging.project, run_name=cfg.name, wandb_mode=cfg.logging.wandb,
                           config=common.config_dict(cfg))
    evals: dict[int, dict] = {}
    last: dict[str, float] = {}

    def run_eval(step: int) -> None:
        if held_out:
            evals[step] = objective.evaluate(rm, held_out, pad)
            logger.log(step, {f"eval/rm_{k}": v for k, v in evals[step].items()})

    with logger, progress_bar("rm", steps, start) as advance:
        logger.log(start, {f"rm/{objective.unit}": len(train), "rm/pairs_dropped_identical": dropped,
                           f"eval/rm_{objective.unit}": len(held_out), "eval/rm_pairs_dropped_identical": eval_dropped})
        if start == 0:
            run_eval(0)
        for step in range(start + 1, steps + 1):
            t0 = time.perf_counter()
            idx = pair_batch(len(train), step, B, cfg.train.seed)
            losses, correct, margins, counts = [], [], [], None
            for i in range(0, B, mb):
                part = [train[j] for j in idx[i:i + mb]]
                out = rm(*build_rm_batch(objective.sequences(part), pad, device))
                loss, ok, margin = objective.loss(out.scores_N, part)
                ((loss + out.aux_loss) * len(part) / B).backward()
                losses.append(float(loss.detach()) * len(part) / B)
                correct += ok
                margins += margin
                if out.expert_counts is not None:
                    counts = out.expert_counts if counts is None else counts + out.expert_counts
            outcome = common.guarded_step(rm, opt, sched, cfg.optim.grad_clip, guard, step, loss=sum(losses))
            if not outcome.skipped:  # a skipped step moves nothing, the routing bias included
                common.apply_expert_bias_update(rm.backbone, counts, cfg.train.expert_bias_rate)
            last = {"rm/loss": sum(losses), "rm/accuracy": statistics.fmean(correct),
                    "rm/margin": statistics.fmean(margins), "train/grad_norm": outcome.grad_norm,
                    "train/lr": sched.get_last_lr()[0], "train/skipped": int(outcome.skipped),
                    "train/nonfinite_skipped": guard.num_skipped, "perf/step_s": time.perf_counter() - t0}
            if step % cfg.train.log_every == 0 or step == steps:
                logger.log(step, last)
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < steps:
                run_eval(step)
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < steps:
                check_finite_state_dict(rm.score_head.state_dict().items(), f"{run_dir}: checkpoint of step {step}")
                checkpointing.save_checkpoint(run_dir, step, rm.backbone, tok, opt, sched,
                                              {"score_head": rm.score_head.state_dict(),
                                               "nonfinite": guard.state_dict()}, cfg.checkpoint.keep)
            advance(f"rm loss {last['rm/loss']:.3f} acc {last['rm/accuracy']:.2f}")
        run_eval(steps)
    summary = {"stage": "rm", "rm_kind": cfg.rm.kind, "steps": steps, objective.unit: len(train), "pairs_dropped_identical": dropped,
               "final_loss": last.get("rm/loss"), "nonfinite_steps_skipped": guard.num_skipped,
               "eval_base": evals.get(0), "eval_final": evals.get(steps)}
    # checkpointing.finalize writes a plain HF directory; a reward model needs its head in final/ as well.
    check_finite_state_dict(rm.state_dict().items(), f"{run_dir}: final reward model")
    save_reward_model(rm, tok, run_dir / "final", reward_model_meta(cfg, objective, scope))
    rundir.mark_done(run_dir, summary)
    return summary


def reward_model_meta(cfg: JobConfig, objective, scope: Scope) -> dict[str, Any]:
    """reward_model.json of a trained RM (either backend): what scoring must reproduce."""
    return {"kind": objective.kind, "rm_kind": cfg.rm.kind, "template": cfg.data.template, "scope": scope,
            "seq_len": cfg.data.seq_len, "squash": "sigmoid", "init": cfg.model.init,
            "reference": "DeepSeek-R1 v2 §3.1"}


def main(argv: list[str] | None = None) -> int:
    return stage_main("rm", run, argv)


if __name__ == "__main__":
    sys.exit(main())

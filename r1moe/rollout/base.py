"""The rollout-engine contract: generate completions for token prompts, take new weights as HF-named tensors.

The built-in engine (r1moe/rollout/builtin.py) runs the reference model on CPU or CUDA; the SGLang engine
(r1moe/rollout/sglang_engine.py) implements the same protocol on GPUs (weights arrive through the same HF-named
iterator the megatron backend exports).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from r1moe.config import SamplingConfig

FinishReason = Literal["eos", "stop", "length"]


class NonFiniteError(RuntimeError):
    """Training produced NaN/inf (loss, gradients, weights, or the policy's logits in a rollout) and cannot continue;
    nothing non-finite was saved. (Raised by r1moe.train.guard and by the rollout engines.)"""


@dataclass
class SamplingParams(SamplingConfig):
    """One engine call's sampling (temperature, top_p: SamplingConfig)."""

    top_k: int = 0
    """0 = no top-k filtering."""
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    """Stop after any of these strings appears in the completion (the string is kept)."""
    seed: int | None = None


@dataclass
class Generation:
    prompt_ids: list[int]
    token_ids: list[int]
    """Completion tokens, the EOS token included when finish_reason == "eos"."""
    logprobs: list[float]
    """log pi_T(token) = log softmax(logits / T)[token] at the sampling temperature T (T = 0, greedy: T = 1), before
    top-p / top-k truncation: the distribution the trainers' importance ratio uses (train/policy.py)."""
    text: str
    finish_reason: FinishReason
    routed_experts: torch.Tensor | None = None
    """Routing replay (rollout.routing_replay): [len(prompt_ids) + len(token_ids) - 1, num_moe_layers, K], the
    experts the engine routed each fed token to (every token but the last generated one), uint8 (int16 past 256
    experts); None when the engine was not asked for them."""


def compact_routes(routes: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Expert ids in the smallest integer type that holds them (a 671B rollout carries ~L*K ids per token)."""
    return routes.to(torch.uint8 if num_experts <= 256 else torch.int16).cpu()


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        """One Generation per prompt, in order."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors (full, unsharded) into the engine's model."""
        ...

    def sleep(self) -> None:
        """Give GPU memory back to the trainer until the next generate/update_weights (colocated engines)."""
        ...

    def shutdown(self) -> None:
        """Stop the engine's processes; the engine is unusable afterwards."""
        ...


def split_stops(tokenizer, stops: list[str]) -> tuple[list[int], list[str]]:
    """Stop strings that are one token of the vocabulary (the R1 tags are added tokens) as token ids, the others as
    text for the engine to match on decoded output."""
    ids, text = [], []
    for s in stops:
        tid = tokenizer.token_to_id(s)
        if tid is not None:
            ids.append(tid)
        else:
            text.append(s)
    return ids, text


def ends_in_stop(tokenizer, tokens: list[int], stops: list[str], end: int | None = None) -> bool:
    """Whether the text of the last few tokens of tokens[:end] (a token is at least one character, +8 for merges)
    holds a stop string: checked after each new token, this finds the first token that completes one."""
    end = len(tokens) if end is None else end
    window = max(len(s) for s in stops) + 8
    tail = tokenizer.decode(tokens[max(0, end - window):end], skip_special_tokens=False)
    return any(s in tail for s in stops)


def check_prompts(prompts: list[list[int]]) -> None:
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: every prompt needs at least one token")

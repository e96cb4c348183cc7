"""The built-in rollout engine: batched sampling over the reference model with its KV cache, CPU or CUDA.

Prompts are left-padded into one batch, prefilled in one forward, then decoded one token per step for all rows;
rows that finished keep stepping (their tokens are discarded) so the batch stays rectangular. Sampling: temperature,
top-k, then top-p (nucleus) on the temperature-scaled distribution; the logprob returned is of the temperature-scaled
policy before top-k/top-p, log softmax(logits / T) (T = 0: T = 1), as SGLang returns it (rollout/base.py).
Stops at EOS, at a stop string, or at max_new_tokens.

Legend: B rows, V vocab, P padded prompt length.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from r1moe.model import CausalLM, load_hf_tensor

from .base import (
    Generation,
    NonFiniteError,
    SamplingParams,
    check_prompts,
    compact_routes,
    ends_in_stop,
    split_stops,
)


def sample_next(logits_BV: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Token ids [B] from logits under temperature / top-k / top-p."""
    if params.temperature == 0:
        return logits_BV.argmax(-1)
    logits = logits_BV.float() / params.temperature
    if params.top_k > 0:
        kth = logits.topk(min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= params.top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class BuiltinEngine:
    """RolloutEngine over a CausalLM. Pass the policy module itself to generate with the live weights (no copy),
    or a separate model and feed it `update_weights` from a trainer's HF-named export."""

    def __init__(self, model: CausalLM, tokenizer: Tokenizer, eos_ids: list[int], pad_id: int = 0,
                 micro_batch_size: int = 0, return_routed_experts: bool = False):
        if return_routed_experts and not model.cfg.is_moe:
            raise ValueError("return_routed_experts (rollout.routing_replay): the model has no MoE layers to route")
        self.return_routed_experts = return_routed_experts
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = list(eos_ids)
        self.pad_id = pad_id
        self.micro_batch_size = micro_batch_size

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in named_tensors:
            load_hf_tensor(self.model, name, tensor)

    def sleep(self) -> None:
        pass  # shares the device with the trainer by design: nothing to hand back

    def shutdown(self) -> None:
        pass

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        if not prompts:
            return []
        check_prompts(prompts)
        step = self.micro_batch_size or len(prompts)
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
        out: list[Generation] = []
        for i in range(0, len(prompts), step):
            out.extend(self._generate_batch(prompts[i:i + step], params, gen))
        return out

    @torch.no_grad()
    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams,
                        gen: torch.Generator | None) -> list[Generation]:
        model, device = self.model, self.device
        was_training = model.training
        model.eval()
        B, P = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((B, P), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, P), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, P - len(p):] = torch.tensor(p)
            mask[r, P - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        stop_ids, text_stops = split_stops(self.tokenizer, params.stop)
        eos = torch.tensor(self.eos_ids, device=device)

        cache = model.new_cache(B, P + params.max_new_tokens)
        routes = self.return_routed_experts
        out = model(ids, attention_mask=mask, cache=cache, return_routes=routes)
        logits = out.logits[:, -1]
        fed = [out.routed_experts] if routes else []  # [B, t, M, K] per forward: prompt, then one per step
        tokens: list[list[int]] = [[] for _ in range(B)]
        logps: list[list[float]] = [[] for _ in range(B)]
        finish: list[str | None] = [None] * B
        ones = torch.ones(B, 1, dtype=torch.long, device=device)
        for _ in range(params.max_new_tokens):
            if not torch.isfinite(logits).all():
                raise NonFiniteError("rollout: the policy's logits are NaN/inf (its weights are non-finite or "
                                     "overflow); stopping before sampling from them")
            nxt = sample_next(logits, params, gen)
            lp = F.log_softmax(logits.float() / (params.temperature or 1.0), -1).gather(-1, nxt[:, None]).squeeze(-1)
            nxt_l, lp_l = nxt.tolist(), lp.tolist()
            is_eos = torch.isin(nxt, eos).tolist()
            for r in range(B):
                if finish[r] is not None:
                    continue
                tokens[r].append(nxt_l[r])
                logps[r].append(lp_l[r])
                if is_eos[r]:
                    finish[r] = "eos"
                elif nxt_l[r] in stop_ids or text_stops and ends_in_stop(self.tokenizer, tokens[r], text_stops):
                    finish[r] = "stop"
            if all(f is not None for f in finish):
                break
            out = model(nxt[:, None], attention_mask=ones, cache=cache, return_routes=routes)
            logits = out.logits[:, -1]
            if routes:
                fed.append(out.routed_experts)
        model.train(was_training)
        all_routes = torch.cat(fed, dim=1) if routes else None  # [B, P + steps, M, K], prompts left-padded
        gens = []
        for r in range(B):
            text_ids = [t for t in tokens[r] if t not in self.eos_ids]
            seq_routes = None
            if routes:  # the row's prompt tokens and its generated tokens but the last (never fed for this row)
                span = all_routes[r, P - len(prompts[r]):P + len(tokens[r]) - 1]
                seq_routes = compact_routes(span, model.cfg.n_routed_experts)
            gens.append(Generation(prompt_ids=list(prompts[r]), token_ids=tokens[r], logprobs=logps[r],
                                   text=self.tokenizer.decode(text_ids, skip_special_tokens=False),
                                   finish_reason=finish[r] or "length", routed_experts=seq_routes))
        return gens

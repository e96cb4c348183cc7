"""The built-in rollout engine: batched sampling over the reference model with its KV cache, CPU or CUDA.

Prompts are left-padded into one batch and prefilled in one forward, each distinct prompt once (the K samples of
a question share their prompt's KV cache rows, copied), then decoded one token per step for all rows; rows that
finished are dropped from the batch whenever they make up a quarter of it (until then they keep stepping and their
tokens are discarded). Sampling: temperature,
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

NUCLEUS_CANDIDATES = 64
"""Top-p sampling first looks for the nucleus among this many most likely tokens (a top-k instead of a sort of the
whole vocabulary); a row whose candidates hold less than top_p of the probability is sorted in full."""


def sample_next(logits_BV: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Token ids [B] from logits under temperature / top-k / top-p."""
    if params.temperature == 0:
        return logits_BV.argmax(-1)
    logits = logits_BV.float() / params.temperature
    V = logits.shape[-1]
    k = min(params.top_k, V) if params.top_k > 0 else V
    if params.top_p >= 1.0 and k == V:
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
    # Candidates in descending order: the top-k tokens, or (top-p alone) the NUCLEUS_CANDIDATES most likely ones,
    # exact wherever their probability reaches top_p (the nucleus is then among them).
    cand = k if k < V else min(NUCLEUS_CANDIDATES, V)
    vals, idx = logits.topk(cand, dim=-1)
    norm = (vals if k < V else logits).logsumexp(-1, keepdim=True)  # the distribution after top-k
    probs = (vals - norm).exp()
    full = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    if params.top_p < 1.0:
        cum = probs.cumsum(-1)
        probs = probs.masked_fill(cum - probs >= params.top_p, 0.0)  # keep the smallest prefix reaching top_p
        if cand < k:
            full = cum[:, -1] < params.top_p
    out = idx.gather(-1, torch.multinomial(probs, 1, generator=generator)).squeeze(-1)
    if full.any():  # rows whose nucleus is wider than the candidates: sort the whole vocabulary
        rows = full.nonzero().squeeze(-1)
        sorted_logits, order = logits[rows].sort(dim=-1, descending=True)
        p = sorted_logits.softmax(-1)
        p = p.masked_fill(p.cumsum(-1) - p >= params.top_p, 0.0)
        out[rows] = order.gather(-1, torch.multinomial(p, 1, generator=generator)).squeeze(-1)
    return out


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
        B = len(prompts)
        # Identical prompts (the K samples of an eval question, a GRPO group) are prefilled once; their rows of the
        # KV cache and their last logits are then copied to every sample.
        first: dict[tuple[int, ...], int] = {}
        src = [first.setdefault(tuple(p), len(first)) for p in prompts]
        unique = [list(p) for p in first]
        U, P = len(unique), max(len(p) for p in unique)
        ids = torch.full((U, P), self.pad_id, dtype=torch.long)
        mask = torch.zeros((U, P), dtype=torch.long)
        for r, p in enumerate(unique):
            ids[r, P - len(p):] = torch.tensor(p)
            mask[r, P - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        stop_ids, text_stops = split_stops(self.tokenizer, params.stop)
        eos = torch.tensor(self.eos_ids, device=device)

        cache = model.new_cache(U, P + params.max_new_tokens)
        routes = self.return_routed_experts
        out = model(ids, attention_mask=mask, cache=cache, return_routes=routes)
        src_B = torch.tensor(src, device=device)
        logits = out.logits[:, -1].index_select(0, src_B)
        if U < B:
            cache = cache.select_rows(src_B)
        prompt_routes = out.routed_experts.index_select(0, src_B) if routes else None  # [B, P, M, K], left-padded
        step_routes = (prompt_routes.new_zeros((B, params.max_new_tokens, *prompt_routes.shape[2:])) if routes
                       else None)  # [B, steps, M, K]: what each generated token was routed to when fed
        tokens: list[list[int]] = [[] for _ in range(B)]
        logps: list[list[float]] = [[] for _ in range(B)]
        finish: list[str | None] = [None] * B
        rows = list(range(B))  # the prompt index of each row still in the batch
        for t in range(params.max_new_tokens):
            if not torch.isfinite(logits).all():
                raise NonFiniteError("rollout: the policy's logits are NaN/inf (its weights are non-finite or "
                                     "overflow); stopping before sampling from them")
            nxt = sample_next(logits, params, gen)
            lp = F.log_softmax(logits.float() / (params.temperature or 1.0), -1).gather(-1, nxt[:, None]).squeeze(-1)
            nxt_l, lp_l = nxt.tolist(), lp.tolist()
            is_eos = torch.isin(nxt, eos).tolist()
            for i, r in enumerate(rows):
                if finish[r] is not None:
                    continue
                tokens[r].append(nxt_l[i])
                logps[r].append(lp_l[i])
                if is_eos[i]:
                    finish[r] = "eos"
                elif nxt_l[i] in stop_ids or text_stops and ends_in_stop(self.tokenizer, tokens[r], text_stops):
                    finish[r] = "stop"
            live = [i for i, r in enumerate(rows) if finish[r] is None]
            if not live or t == params.max_new_tokens - 1:
                break
            # Finished rows are dropped from the batch once they are a quarter of it (each drop copies the cache:
            # at most a few copies per call); until then they keep stepping and their tokens are discarded.
            if 4 * (len(rows) - len(live)) >= len(rows):
                keep = torch.tensor(live, device=device)
                cache, nxt = cache.select_rows(keep), nxt.index_select(0, keep)
                rows = [rows[i] for i in live]
            out = model(nxt[:, None], attention_mask=torch.ones(len(rows), 1, dtype=torch.long, device=device),
                        cache=cache, return_routes=routes)
            logits = out.logits[:, -1]
            if routes:
                step_routes[rows, t] = out.routed_experts[:, 0]
        model.train(was_training)
        gens = []
        for r in range(B):
            text_ids = [t for t in tokens[r] if t not in self.eos_ids]
            seq_routes = None
            if routes:  # the row's prompt tokens and its generated tokens but the last (never fed for this row)
                span = torch.cat([prompt_routes[r, P - len(prompts[r]):], step_routes[r, :len(tokens[r]) - 1]])
                seq_routes = compact_routes(span, model.cfg.n_routed_experts)
            gens.append(Generation(prompt_ids=list(prompts[r]), token_ids=tokens[r], logprobs=logps[r],
                                   text=self.tokenizer.decode(text_ids, skip_special_tokens=False),
                                   finish_reason=finish[r] or "length", routed_experts=seq_routes))
        return gens

"""CPU benchmark: built-in rollout engine throughput and one GRPO step of the tiny R1-Zero configuration.

Measures, in one run on this machine:
  - rollout tokens/s of the built-in engine (KV cache, MLA absorbed decode) for Q*G sequences with the R1-Zero
    prompt (~96 tokens) and a fixed number of new tokens (EOS disabled so every row decodes the same length);
  - the same generation without the KV cache (full forward over the growing sequence each step): the ratio is
    what the cache buys;
  - one GRPO step (tiny recipe shape: Q=8, G=8, 64 new tokens, 2 mini-batches, beta>0) split into rollout,
    reference/old log-prob forwards, and policy update.
Writes benchmarks/results/cpu_rollout_grpo.json (device, torch version, threads, numbers). Not a test.

    python benchmarks/cpu_rollout_grpo.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from r1moe.algorithms import compute_advantages, compute_grpo_loss, compute_token_logprobs
from r1moe.data import make_dataset
from r1moe.data.tokenizer import build_tiny_tokenizer, default_corpus
from r1moe.model import build_model, get_preset
from r1moe.rollout import BuiltinEngine, SamplingParams
from r1moe.templates import render
from r1moe.train.policy import build_rl_batch


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], check=False, capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


@torch.no_grad()
def generate_without_cache(model, prompts: list[list[int]], new_tokens: int) -> None:
    """Greedy decoding that re-runs the full forward each step (what the cache avoids)."""
    P = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), P, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, P - len(p):] = torch.tensor(p)
        mask[r, P - len(p):] = 1
    for _ in range(new_tokens):
        nxt = model(ids, attention_mask=mask).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/cpu_rollout_grpo.json")
    a = ap.parse_args()
    torch.manual_seed(0)
    tok = build_tiny_tokenizer(default_corpus(), 512)
    model = build_model(get_preset("tiny-moe"), seed=0).train()
    ref = build_model(get_preset("tiny-moe"), seed=0).eval()
    Q, G, NEW = 8, 8, 64
    questions = make_dataset("arithmetic", Q, seed=0)
    prompts = [tok.encode(render("r1_zero", q.prompt), add_special_tokens=False).ids for q in questions for _ in range(G)]
    engine = BuiltinEngine(model, tok, eos_ids=[], pad_id=0)  # no EOS: every row decodes NEW tokens
    params = SamplingParams(temperature=1.0, max_new_tokens=NEW, seed=0)
    engine.generate(prompts[:4], SamplingParams(max_new_tokens=4))  # warm-up

    cached, uncached, steps = [], [], []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        gens = engine.generate(prompts, params)
        cached.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        generate_without_cache(model, prompts, NEW)
        uncached.append(time.perf_counter() - t0)

        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        t0 = time.perf_counter()
        gens = engine.generate(prompts, params)
        t1 = time.perf_counter()
        batch = build_rl_batch(gens, 0, torch.device("cpu"))
        adv = compute_advantages(torch.rand(len(gens)), G)
        with torch.no_grad():
            old = compute_token_logprobs(model(batch.input_ids_NT, attention_mask=batch.attention_mask_NT).logits,
                                         batch.targets_NT)
            ref_lp = compute_token_logprobs(ref(batch.input_ids_NT, attention_mask=batch.attention_mask_NT).logits,
                                            batch.targets_NT)
        t2 = time.perf_counter()
        half = len(gens) // 2
        for sl in (slice(0, half), slice(half, None)):
            mb = batch.rows(sl)
            logp = compute_token_logprobs(model(mb.input_ids_NT, attention_mask=mb.attention_mask_NT).logits,
                                          mb.targets_NT)
            loss, _ = compute_grpo_loss(logp, old[sl], adv[sl], mb.response_mask_NT, ref_logp_BT=ref_lp[sl],
                                        beta=0.001)
            loss.backward()
            opt.step()
            opt.zero_grad()
        t3 = time.perf_counter()
        steps.append({"rollout_s": t1 - t0, "logprob_forwards_s": t2 - t1, "update_s": t3 - t2, "total_s": t3 - t0})

    new_tokens = len(prompts) * NEW
    med = statistics.median
    result = {
        "benchmark": "cpu_rollout_grpo",
        "device": cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model": "tiny-moe (random init)",
        "shape": {"questions": Q, "group_size": G, "prompt_tokens": len(prompts[0]), "new_tokens": NEW},
        "repeats": a.repeats,
        "rollout_tokens_per_s_kv_cache": new_tokens / med(cached),
        "rollout_tokens_per_s_no_cache": new_tokens / med(uncached),
        "kv_cache_speedup": med(uncached) / med(cached),
        "grpo_step_s": {k: med(s[k] for s in steps) for k in steps[0]},
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""P1: one training step of r1moe's megatron backend vs a raw megatron-core loop, same model, same GPU, one run.

Shape (issue #4): 8 layers, hidden 2048, MLA (q_lora 768, kv_lora 512, qk 128+64, v 128, 16 heads), 32 routed
experts top-4, moe_ffn 1024, 1 shared expert (1024), seq 2048, micro-batch 8, bf16, 1 GPU; vocabulary 32768
(the issue names none). Both paths drive ONE GPTModel + distributed optimizer built by r1moe.parallel, so the
ratio isolates the step path:
  raw     get_forward_backward_func + GPTModel(labels=...) megatron's own vocab-parallel cross entropy
          (the loss_func of megatron's pretrain_gpt) + optimizer.step()
  r1moe   r1moe.parallel.train_step: output_processor -> full logits -> r1moe.algorithms.compute_sft_loss
Steps alternate in blocks (raw, r1moe, raw, ...) after warm-up; each path's median step time is reported.
MFU = model FLOPs / time / peak, model FLOPs = 3 x forward (2 x active matmul params per token, plus causal
attention 2 * heads * (d_qk + d_v) * T/2 per token per layer); peak 989 TFLOP/s (H100/H200 dense bf16
datasheet) and, for reference, the bf16 GEMM rate measured in the same run.

    python benchmarks/p1_train_step.py --out /tmp/p1.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from dataclasses import dataclass

import torch

from r1moe.model import ModelConfig

P1_CFG = ModelConfig(
    model_type="deepseek_v3", vocab_size=32768, hidden_size=2048, intermediate_size=8192, num_hidden_layers=8,
    num_attention_heads=16, num_key_value_heads=16, q_lora_rank=768, kv_lora_rank=512, qk_nope_head_dim=128,
    qk_rope_head_dim=64, v_head_dim=128, moe_intermediate_size=1024, n_shared_experts=1, n_routed_experts=32,
    num_experts_per_tok=4, n_group=1, topk_group=1, routed_scaling_factor=1.0, first_k_dense_replace=0,
    num_nextn_predict_layers=0, max_position_embeddings=4096, rope_scaling=None)
PEAK_BF16 = 989e12


@dataclass
class MB:
    input_ids: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor


def model_flops_per_token(c: ModelConfig, seq: int) -> float:
    h, nh = c.hidden_size, c.num_attention_heads
    attn = ((h * c.q_lora_rank + c.q_lora_rank * nh * c.qk_head_dim) if c.q_lora_rank else h * nh * c.qk_head_dim) \
        + h * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank * nh * (c.qk_nope_head_dim + c.v_head_dim) \
        + nh * c.v_head_dim * h
    per_layer = []
    for i in range(c.num_hidden_layers):
        if c.is_moe_layer(i):
            mlp = h * c.n_routed_experts + (c.num_experts_per_tok + c.n_shared_experts) * 3 * h * c.moe_intermediate_size
        else:
            mlp = 3 * h * c.intermediate_size
        per_layer.append(attn + mlp)
    matmul_params = sum(per_layer) + h * c.vocab_size
    scores = c.num_hidden_layers * 2 * nh * (c.qk_head_dim + c.v_head_dim) * seq / 2
    return 3 * (2 * matmul_params + scores)


def device_info() -> dict:
    info = {"torch_device_name": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count()}
    try:
        info["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=False).stdout.strip().splitlines()
    except Exception as e:  # noqa: BLE001
        info["nvidia_smi"] = f"unavailable: {e}"
    import megatron.core
    import transformer_engine

    info.update(torch=torch.__version__, megatron_core=megatron.core.__version__,
                transformer_engine=transformer_engine.__version__)
    return info


def measured_gemm_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * 10 / (time.perf_counter() - t) / 1e12


def make_batches(cfg: ModelConfig, num: int, mbs: int, seq: int, seed: int = 0) -> list[MB]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        tok = torch.randint(3, cfg.vocab_size, (mbs, seq + 1), generator=g).cuda()
        out.append(MB(tok[:, :-1].contiguous(), tok[:, 1:].contiguous(), torch.ones(mbs, seq, dtype=torch.bool,
                                                                                  device="cuda")))
    return out


def r1moe_step_fn(models, opt, batches, cfg):
    from r1moe.algorithms import compute_sft_loss
    from r1moe.parallel import train_step

    den = sum(int(b.mask.sum()) for b in batches)

    def loss_fn(logits, mb):
        return compute_sft_loss(logits, mb.targets, mb.mask, loss_denominator=den), {}

    return lambda: train_step(models, opt, batches, loss_fn, cfg.vocab_size).metrics["loss"]


def raw_step_fn(models, opt, batches):
    """The plain megatron-core loop (examples/run_simple_mcore_train_loop.py + pretrain_gpt's loss_func)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    B, T = batches[0].input_ids.shape
    pos = torch.arange(T, device="cuda").unsqueeze(0).expand(B, T)

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        per_token = model(mb.input_ids, pos, None, labels=mb.targets)

        def loss_func(output):
            mask = mb.mask.view(-1).float()
            loss = torch.sum(output.view(-1).float() * mask) / mask.sum()
            return loss, {"lm loss": loss.detach()}
        return per_token, loss_func

    def step():
        for m in models:
            m.zero_grad_buffer()
        opt.zero_grad()
        losses = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(batches),
                                             model=models, num_microbatches=len(batches), seq_length=T,
                                             micro_batch_size=B, forward_only=False)
        opt.step()
        return float(sum(x["lm loss"] for x in losses))
    return step


def time_steps(step, n: int) -> list[float]:
    out = []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def compare(named_steps: dict, warmup: int, rounds: int, per_round: int) -> dict[str, list[float]]:
    for step in named_steps.values():
        time_steps(step, warmup)
    times = {k: [] for k in named_steps}
    for _ in range(rounds):
        for k, step in named_steps.items():
            times[k] += time_steps(step, per_round)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--mbs", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--microbatches", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()

    from r1moe.parallel import MegatronOptions, ParallelConfig, build_mcore_model, build_optimizer, initialize_parallel

    initialize_parallel(ParallelConfig(), seed=0)
    cfg = P1_CFG
    models = build_mcore_model(cfg, ParallelConfig(), MegatronOptions())
    opt = build_optimizer(models, lr=1e-5)
    batches = make_batches(cfg, args.microbatches, args.mbs, args.seq)
    steps = {"raw_megatron": raw_step_fn(models, opt, batches), "r1moe": r1moe_step_fn(models, opt, batches, cfg)}
    first_losses = {k: s() for k, s in steps.items()}
    times = compare(steps, warmup=2, rounds=args.rounds, per_round=3)
    tokens = args.mbs * args.seq * args.microbatches
    flops = model_flops_per_token(cfg, args.seq) * tokens
    gemm = measured_gemm_tflops()
    res = {"benchmark": "P1 train step: r1moe megatron backend vs raw megatron-core", "device": device_info(),
           "shape": {"layers": 8, "hidden": 2048, "heads": 16, "q_lora": 768, "kv_lora": 512, "qk": "128+64",
                     "v": 128, "experts": 32, "topk": 4, "moe_ffn": 1024, "shared": 1024, "vocab": cfg.vocab_size,
                     "seq": args.seq, "micro_batch": args.mbs, "microbatches": args.microbatches, "dtype": "bf16"},
           "first_step_loss": first_losses, "model_tflop_per_step": flops / 1e12,
           "measured_bf16_gemm_tflops_8192": gemm, "peak_tflops_used_for_mfu": PEAK_BF16 / 1e12}
    for k, ts in times.items():
        med = statistics.median(ts)
        res[k] = {"median_step_s": med, "min_step_s": min(ts), "steps_timed": len(ts),
                  "tokens_per_s": tokens / med, "mfu": flops / med / PEAK_BF16}
    res["ratio_r1moe_over_raw_tokens_per_s"] = res["r1moe"]["tokens_per_s"] / res["raw_megatron"]["tokens_per_s"]
    res["goal"] = ">= 0.95"
    res["goal_met"] = res["ratio_r1moe_over_raw_tokens_per_s"] >= 0.95
    res["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps({k: res[k] for k in ("raw_megatron", "r1moe", "ratio_r1moe_over_raw_tokens_per_s")}, indent=1))


if __name__ == "__main__":
    main()

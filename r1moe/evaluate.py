"""Evaluation as the paper does it (R1 v1 §3, v2 D.1): K samples per question at T=0.6, top-p 0.95, never greedy;
pass@1 = mean accuracy over the K samples; unbiased pass@k; cons@K = majority vote over the extracted answers'
equivalence classes (the accuracy reward's equivalence, r1moe.rewards.same_answer; r1moe/metrics.py); plus
format rate, language consistency and mean response length.

    r1moe eval --checkpoint runs/tiny-r1-zero/grpo/final --data data/arith_eval.jsonl --samples 8 \
        --temperature 0.6 --top-p 0.95 [--template r1_zero] [--out results.json]
    r1moe eval ... --engine sglang --tp 8 --dp 1      # SGLang on this node's GPUs (data parallel with --dp)
    r1moe eval --checkpoint DIR --benchmark aime2024|math500|gpqa_diamond|livecodebench --data RELEASE_FILE
        # a public benchmark in its release format: its prompt, grader and the paper's K (r1moe/data/benchmarks.py)
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from tokenizers import Tokenizer

from r1moe.config import SamplingConfig
from r1moe.data import PromptSample
from r1moe.data.benchmarks import BENCHMARKS, LoadedBenchmark
from r1moe.metrics import SampleResult, summarize_eval
from r1moe.rewards import same_answer
from r1moe.rollout import RolloutEngine, SamplingParams


@dataclass
class EvalSettings(SamplingConfig):
    SECTION: ClassVar[str] = "eval"
    temperature: float = 0.6
    top_p: float = 0.95
    samples: int = 4
    max_new_tokens: int = 256
    template: str = "r1_zero"
    stop: tuple[str, ...] = ("</answer>",)
    seed: int = 0
    chunk: int = 64
    """Sequences generated per engine call (bounds memory; one progress tick each)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.samples < 1:
            raise ValueError(f"eval samples={self.samples} must be >= 1")
        if self.max_new_tokens < 1:
            raise ValueError(f"eval max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.chunk < 1:
            raise ValueError(f"eval chunk={self.chunk} must be >= 1")


def grade(completion: str, sample: PromptSample, template: str, num_tokens: int,
          benchmark: LoadedBenchmark | None = None) -> SampleResult:
    from r1moe.rewards import accuracy_reward, extract_answer, format_reward, language_consistency_reward
    from r1moe.templates import completion_prefix

    full = completion_prefix(template) + completion if template != "none" else completion
    correct, answer = (benchmark.grade(full, sample) if benchmark is not None
                       else (accuracy_reward(full, sample) >= 1.0, extract_answer(full)))
    return SampleResult(correct=correct, formatted=format_reward(full, sample) >= 1.0,
                        length_tokens=num_tokens, answer=answer,
                        language_consistency=language_consistency_reward(full, sample))


def evaluate(engine: RolloutEngine, tok: Tokenizer, samples: list[PromptSample], s: EvalSettings,
             show_progress: bool = True, benchmark: LoadedBenchmark | None = None,
             per_question: bool = False) -> dict[str, Any]:
    """`benchmark` (r1moe.data.benchmarks): its grader and answer equivalence replace the accuracy reward's.
    `per_question`: also return each question's scores under "per_question" ({"id": [...], "pass@1": [...],
    "cons@K": [...]}, r1moe.metrics.per_question_scores), for paired comparisons of checkpoints."""
    from r1moe.data.prompts import encode_prompt
    from r1moe.progress import progress_bar

    if not samples:
        raise ValueError("evaluation set is empty")
    prompts = [encode_prompt(tok, s.template, q.prompt) for q in samples for _ in range(s.samples)]
    owners = [q for q in samples for _ in range(s.samples)]
    params = SamplingParams(temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
                            stop=list(s.stop), seed=s.seed)
    graded: list[SampleResult] = []
    chunks = range(0, len(prompts), s.chunk)
    with progress_bar("eval", len(chunks), enabled=show_progress) as advance:
        for i in chunks:
            gens = engine.generate(prompts[i:i + s.chunk], params)
            pairs = list(zip(gens, owners[i:i + s.chunk]))

            def grade_one(gq):
                return grade(gq[0].text, gq[1], s.template, len(gq[0].token_ids), benchmark)
            threads = benchmark.grade_threads if benchmark is not None else 1
            if threads == 1:  # in this thread: math-verify's timeout (signal.alarm) needs the main thread
                graded += [grade_one(gq) for gq in pairs]
            else:  # sandboxed code grading waits on subprocesses: run them at once
                with ThreadPoolExecutor(threads) as pool:
                    graded += list(pool.map(grade_one, pairs))
            advance(f"eval {min(i + s.chunk, len(prompts))}/{len(prompts)} samples")
    graded_by_question = [graded[i:i + s.samples] for i in range(0, len(graded), s.samples)]
    same = benchmark.same_answer if benchmark is not None else same_answer
    summary = summarize_eval(graded_by_question, [functools.partial(same, sample=q) for q in samples], per_question)
    if per_question:
        summary["per_question"] = {"id": [q.id for q in samples], **summary["per_question"]}
    return summary


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path, s: EvalSettings, max_questions: int = 0,
                        device: str = "auto", engine: str = "builtin", sglang=None, benchmark: str | None = None,
                        contest_dates: tuple[str, str] | None = None, per_question: bool = False,
                        show_progress: bool = True) -> dict[str, Any]:
    """Evaluate a saved checkpoint through the built-in engine (one device) or SGLang (`sglang`: a
    config.SGLangSection; tp x dp GPUs of this node). `benchmark` names a release format of `data`
    (r1moe.data.benchmarks.BENCHMARKS); None = our prompts JSONL. `per_question`: as `evaluate`."""
    from r1moe.data import read_prompts
    from r1moe.data.benchmarks import load_benchmark
    from r1moe.rollout.loader import load_checkpoint_engine

    checkpoint = Path(checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint}: not a checkpoint directory (no config.json)")
    loaded = load_benchmark(benchmark, data, s.seed, contest_dates) if benchmark is not None else None
    samples = loaded.samples if loaded is not None else read_prompts(data)
    if max_questions:
        samples = samples[:max_questions]
    from r1moe.data.tokenizer import load_tokenizer
    from r1moe.model import ModelConfig

    context = ModelConfig.from_json(checkpoint / "config.json").max_position_embeddings
    check_prompts_fit(load_tokenizer(checkpoint), samples, s, context, data)  # before any weight is loaded
    rollout, tok = load_checkpoint_engine(checkpoint, engine, sglang, device, seed=s.seed)
    torch.manual_seed(s.seed)
    try:
        return evaluate(rollout, tok, samples, s, show_progress=show_progress, benchmark=loaded,
                        per_question=per_question)
    finally:
        rollout.shutdown()


def check_prompts_fit(tok: Tokenizer, samples: list[PromptSample], s: EvalSettings, context: int,
                      data: str | Path) -> None:
    """ValueError naming the question when its prompt + max_new_tokens exceeds the model's context (generation
    would run past the positions the model has, after allocating a cache that size)."""
    from r1moe.data.prompts import encode_prompt

    for i, q in enumerate(samples, 1):
        n = len(encode_prompt(tok, s.template, q.prompt))
        if n + s.max_new_tokens > context:
            name = f"id {q.id!r}" if q.id else f"{q.prompt[:40]!r}"
            raise ValueError(f"{data}: question {i} ({name}) has a {n}-token prompt; with max_new_tokens="
                             f"{s.max_new_tokens} that exceeds the model's context of {context} tokens "
                             f"(max_position_embeddings); shorten the prompt or lower --max-new-tokens")


def _at_least(lo: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v
    return parse


def _float_in(lo: float, hi: float, lo_open: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (math.isfinite(v) and (lo < v if lo_open else lo <= v) and v <= hi):
            raise argparse.ArgumentTypeError(f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {text}")
        return v
    return parse


def _date_range(text: str) -> tuple[str, str]:
    import datetime

    lo, sep, hi = text.partition(":")
    try:
        if not sep:
            raise ValueError
        a, b = datetime.date.fromisoformat(lo), datetime.date.fromisoformat(hi)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FROM:TO as ISO dates (2024-08-01:2025-01-31), got {text!r}") \
            from None
    if a > b:
        raise argparse.ArgumentTypeError(f"FROM {lo} is after TO {hi}")
    return lo, hi


def _check_out(p: argparse.ArgumentParser, out: str | None) -> None:
    """--out is checked before any work: an existing directory or an unwritable place is refused."""
    if out is None:
        return
    path = Path(out)
    if path.is_dir():
        p.error(f"--out {out}: is a directory; name the JSON file to write")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:  # a nameless temp file, gone when closed: a real probe (permission bits do not stop root, a read-only fs does)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        p.error(f"--out {out}: cannot write there ({parent} is not a writable directory: {e.strerror or e})")


def main(argv: list[str] | None = None) -> int:
    from r1moe.cli import run_cli

    return run_cli("r1moe eval", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(prog="r1moe eval", description="pass@1 / pass@k / cons@K of a checkpoint.")
    p.add_argument("--checkpoint", required=True, help="HF checkpoint directory (with tokenizer.json)")
    p.add_argument("--data", required=True, help="prompts JSONL (prompt, answer, ...), or a --benchmark release file")
    p.add_argument("--benchmark", choices=list(BENCHMARKS), default=None,
                   help="--data is this benchmark's release file (r1moe/data/benchmarks.py); sets its prompt, grader "
                        "and the paper's K")
    p.add_argument("--contest-dates", type=_date_range, default=None, metavar="FROM:TO",
                   help="livecodebench: only problems with FROM <= contest_date <= TO (ISO dates; R1: "
                        "2024-08-01:2025-01-31)")
    p.add_argument("--samples", type=_at_least(1), default=None,
                   help="K samples per question; default: the benchmark's paper K (64 AIME/GPQA, 16 MATH, 8 LCB), "
                        "else 4")
    p.add_argument("--temperature", type=_float_in(0, math.inf, lo_open=False), default=0.6, help=">= 0")
    p.add_argument("--top-p", type=_float_in(0, 1, lo_open=True), default=0.95, help="in (0, 1]")
    p.add_argument("--max-new-tokens", type=_at_least(1), default=256)
    p.add_argument("--template", default="r1_zero", choices=["r1_zero", "chat", "none"])
    p.add_argument("--max-questions", type=_at_least(0), default=0, help="0 = all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--engine", default="builtin", choices=["builtin", "sglang"],
                   help="builtin: one device; sglang: SGLang over --tp x --dp GPUs of this node")
    p.add_argument("--tp", type=int, default=None, help="SGLang tensor-parallel size (--engine sglang)")
    p.add_argument("--dp", type=int, default=None, help="SGLang data-parallel replicas (--engine sglang)")
    p.add_argument("--out", help="write the metrics JSON here too")
    a = p.parse_args(argv)
    _check_out(p, a.out)
    if a.contest_dates is not None and a.benchmark != "livecodebench":
        p.error("--contest-dates applies only with --benchmark livecodebench")
    if a.samples is None:
        a.samples = BENCHMARKS[a.benchmark].samples if a.benchmark else 4
    sglang = None
    if a.engine == "sglang":
        from r1moe.config import SGLangSection

        sglang = SGLangSection(tp=a.tp or 1, dp=a.dp or 1, colocate=False)
    elif a.tp is not None or a.dp is not None:
        p.error("--tp/--dp apply only with --engine sglang")
    s = EvalSettings(samples=a.samples, temperature=a.temperature, top_p=a.top_p, max_new_tokens=a.max_new_tokens,
                     template=a.template, seed=a.seed)
    result = {"checkpoint": str(a.checkpoint), "data": str(a.data), "benchmark": a.benchmark, "samples": a.samples,
              "temperature": a.temperature, "top_p": a.top_p,
              **evaluate_checkpoint(a.checkpoint, a.data, s, a.max_questions, a.device, a.engine, sglang,
                                    a.benchmark, a.contest_dates)}
    print(json.dumps(result, indent=2))
    if a.out:
        from r1moe.atomic import write_json_atomic

        try:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(Path(a.out), result)
        except OSError as e:
            raise ValueError(f"--out {a.out}: cannot write it ({e.strerror or e})") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())

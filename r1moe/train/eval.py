"""The eval stage: every checkpoint of an `EvalSpec` (r1moe.stages) evaluated on one prompt set with
r1moe.evaluate (pass@1 over K samples, cons@K, format and language rates), written to `results.json`.

    r1moe eval RECIPE [key=value ...] --out DIR     # RECIPE: an EvalSpec as YAML (checkpoints, data, samples, ...)

In a pipeline: `{name: eval, kind: eval, eval: {checkpoints: {stage1: runs/.../final}, data: ..., samples: 8}}`.
(`r1moe eval --checkpoint DIR --data FILE ...` evaluates one checkpoint from flags: r1moe/evaluate.py.)
"""

from __future__ import annotations

import sys
from pathlib import Path

from r1moe.atomic import write_json_atomic
from r1moe.cli import spec_main
from r1moe.stages import EvalSpec, date_pair


def run_eval(spec: EvalSpec, out: Path) -> dict:
    """Evaluate each labelled checkpoint (eval.workers at once); write out/results.json (with each question's
    scores, for the report's paired comparisons); return {"results": its path}."""
    import torch

    if not spec.checkpoints:
        raise ValueError("eval.checkpoints is empty: name at least one checkpoint (label: HF directory)")
    labels = list(spec.checkpoints)
    if spec.workers == 1:
        results = {label: _evaluate_one(spec, label) for label in labels}
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        threads = max(1, torch.get_num_threads() // spec.workers)
        # spawn: a fresh interpreter per worker (a forked torch runtime with live threads is not safe to reuse)
        with ProcessPoolExecutor(min(spec.workers, len(labels)), mp_context=multiprocessing.get_context("spawn"),
                                 initializer=torch.set_num_threads, initargs=(threads,)) as pool:
            results = dict(zip(labels, pool.map(_evaluate_one, [spec] * len(labels), labels)))
    write_json_atomic(out / "results.json", results)
    return {"results": str(out / "results.json")}


def _evaluate_one(spec: EvalSpec, label: str) -> dict:
    from r1moe.evaluate import EvalSettings, evaluate_checkpoint

    settings = EvalSettings(samples=spec.samples, temperature=spec.temperature, top_p=spec.top_p,
                            max_new_tokens=spec.max_new_tokens, chunk=spec.chunk,
                            template=spec.templates.get(label, spec.template))
    result = evaluate_checkpoint(spec.checkpoints[label], spec.data, settings, engine=spec.engine, sglang=spec.sglang,
                                 benchmark=spec.benchmark, contest_dates=date_pair("eval", spec.contest_dates),
                                 per_question=True, show_progress=spec.workers == 1)
    print(f"  eval {label}: pass@1={result['pass@1']:.3f}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    return spec_main("eval", EvalSpec, run_eval, argv)


if __name__ == "__main__":
    sys.exit(main())

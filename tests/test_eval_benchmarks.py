"""`evaluate` with a benchmark's grader, and the `r1moe eval --benchmark` command line: replies scripted by a small
real engine class, graded by the real graders (math-verify, the letter extraction, the sandbox)."""

import json
from pathlib import Path

import pytest

from r1moe import cli
from r1moe.data.benchmarks import load_benchmark
from r1moe.data.tokenizer import build_tiny_tokenizer
from r1moe.evaluate import EvalSettings, evaluate
from r1moe.rollout import SamplingParams
from r1moe.rollout.base import Generation

FIXTURES = Path(__file__).parent / "data" / "benchmarks"


class ScriptedEngine:
    """Returns the scripted replies in order (evaluate asks question by question, K samples each)."""

    def __init__(self, replies: list[str]):
        self.replies = list(replies)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        out, self.replies = self.replies[:len(prompts)], self.replies[len(prompts):]
        return [Generation(prompt_ids=p, token_ids=[1] * 3, logprobs=[0.0] * 3, text=t, finish_reason="stop")
                for p, t in zip(prompts, out)]

    def shutdown(self) -> None:
        pass


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(["Answer the question A B C D 0123456789 <think> </think> <answer> </answer>"], 300)


def test_gpqa_pass1_and_cons(tok):
    bench = load_benchmark("gpqa_diamond", FIXTURES / "gpqa_diamond.csv")
    golds = [q.answer for q in bench.samples]
    wrong = [next(x for x in "ABCD" if x != g) for g in golds]
    # question 1: 2 of 3 right; question 2: 1 of 3 right (the vote goes to the wrong letter); question 3: none
    replies = [f"<think>t</think><answer>{golds[0]}</answer>", f"Answer: {golds[0]}", f"Answer: {wrong[0]}",
               f"Answer: {golds[1]}", f"Answer: {wrong[1]}", f"The answer is ({wrong[1]})",
               "no letter", "<think>cut off", f"Answer: {wrong[2]}"]
    s = EvalSettings(samples=3, template="r1_zero")
    r = evaluate(ScriptedEngine(replies), tok, bench.samples, s, show_progress=False, benchmark=bench)
    assert r["pass@1"] == pytest.approx((2 / 3 + 1 / 3 + 0) / 3)
    assert r["cons@3"] == pytest.approx(1 / 3)
    assert "per_question" not in r  # only when asked (the eval stage asks, for the report's paired comparisons)
    per_q = evaluate(ScriptedEngine(replies), tok, bench.samples, s, show_progress=False, benchmark=bench,
                     per_question=True)["per_question"]
    assert per_q["id"] == [q.id for q in bench.samples]
    assert per_q["pass@1"] == pytest.approx([2 / 3, 1 / 3, 0]) and per_q["cons@3"] == [1.0, 0.0, 0.0]


def test_math500_grading_uses_math_equivalence(tok):
    bench = load_benchmark("math500", FIXTURES / "math500.jsonl")  # golds: \frac{3}{4}, 5
    replies = ["\\boxed{0.75}", "\\boxed{\\frac{6}{8}}", "\\boxed{5.0}", "\\boxed{4}"]
    r = evaluate(ScriptedEngine(replies), tok, bench.samples, EvalSettings(samples=2, template="none"),
                 show_progress=False, benchmark=bench)
    assert r["pass@1"] == pytest.approx(0.75)


@pytest.mark.parametrize("argv,message", [
    (["--benchmark", "aime2025"], "invalid choice: 'aime2025'"),
    (["--benchmark", "math500", "--contest-dates", "2024-08-01:2025-01-31"], "--contest-dates applies only"),
    (["--benchmark", "livecodebench", "--contest-dates", "2025-01-31:2024-08-01"], "is after TO"),
    (["--benchmark", "livecodebench", "--contest-dates", "2024-08"], "expected FROM:TO as ISO dates"),
])
def test_eval_cli_benchmark_usage_errors(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # argparse's usage error: status 2
        cli.main(["eval", "--checkpoint", str(tmp_path), "--data", str(FIXTURES / "math500.jsonl"), *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_eval_recipe_runs_each_benchmark_with_the_paper_k():
    from r1moe.data.benchmarks import BENCHMARKS
    from r1moe.pipeline import load_pipeline

    p = load_pipeline(Path(__file__).parents[1] / "recipes" / "deepseek-v3" / "eval.yaml")
    evals = {s.eval.benchmark: s.eval for s in p.stages if s.kind == "eval"}
    assert set(evals) == set(BENCHMARKS)
    for name, e in evals.items():
        assert e.samples == BENCHMARKS[name].samples and (e.temperature, e.top_p) == (0.6, 0.95)
        assert e.max_new_tokens == 32768
    assert evals["livecodebench"].contest_dates == ["2024-08-01", "2025-01-31"]


@pytest.mark.parametrize("spec,message", [
    ({"benchmark": "aime2025"}, "eval: unknown benchmark 'aime2025'"),
    ({"benchmark": "math500", "contest_dates": ["2024-08-01", "2025-01-31"]}, "apply to livecodebench only"),
    ({"benchmark": "livecodebench", "contest_dates": ["2024-08-01"]}, "must be \\[FROM, TO\\]"),
    ({"benchmark": "livecodebench", "contest_dates": ["2024-13-01", "2025-01-31"]}, "must be ISO dates"),
])
def test_pipeline_eval_stage_benchmark_errors_at_load(tmp_path, spec, message):
    from r1moe.pipeline import load_pipeline

    recipe = tmp_path / "p.yaml"
    recipe.write_text(json.dumps({"stages": [{"name": "e", "kind": "eval",
                                              "eval": {"checkpoints": {"a": "x"}, "data": "d", **spec}}]}))
    with pytest.raises(ValueError, match=f"p.yaml: stage 'e': .*{message}"):
        load_pipeline(recipe)


def test_livecodebench_graded_in_the_sandbox_in_parallel(tok):
    bench = load_benchmark("livecodebench", FIXTURES / "livecodebench.jsonl", contest_dates=("2024-08-01", "2025-01-31"))
    assert [q.id for q in bench.samples] == ["synth_abc001_a", "9001"]
    bench.grade_threads = 3
    stdin_ok = "</think>```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    leet_ok = "</think>```python\nclass Solution:\n    def maxOfList(self, nums):\n        return max(nums)\n```"
    replies = [stdin_ok, stdin_ok.replace("a + b", "a * b"), "</think>no code",
               leet_ok, leet_ok.replace("max(nums)", "nums[0]"), leet_ok]
    r = evaluate(ScriptedEngine(replies), tok, bench.samples, EvalSettings(samples=3, template="none", chunk=6),
                 show_progress=False, benchmark=bench)
    assert r["pass@1"] == pytest.approx((1 / 3 + 2 / 3) / 2)

"""`r1moe eval --benchmark` end to end on the tiny checkpoint: a release file in, the paper's K, metrics JSON out."""

import json
from pathlib import Path

from r1moe import cli

FIXTURES = Path(__file__).parents[1] / "data" / "benchmarks"


def test_eval_cli_runs_a_benchmark_file_with_the_paper_k(tmp_path, tiny_base):
    out = tmp_path / "gpqa.json"
    rc = cli.main(["eval", "--checkpoint", str(tiny_base), "--benchmark", "gpqa_diamond", "--data",
                   str(FIXTURES / "gpqa_diamond.csv"), "--max-new-tokens", "4", "--max-questions", "1",
                   "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "gpqa_diamond" and result["samples"] == 64 and result["num_samples"] == 64

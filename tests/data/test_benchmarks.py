"""Benchmark loaders on hand-written records in each release's format (tests/data/benchmarks/; synthetic content,
the releases' real field names): prompts, gold answers, the GPQA shuffle, LiveCodeBench's test-case encodings."""

import base64
import json
import pickle
import zlib
from collections import Counter
from pathlib import Path

import pytest

from r1moe.data.benchmarks import (
    BENCHMARKS,
    MATH_INSTRUCTION,
    decode_test_cases,
    load_aime2024,
    load_benchmark,
    load_gpqa_diamond,
    load_livecodebench,
    load_math500,
)

FIXTURES = Path(__file__).parent / "benchmarks"


def test_paper_k_per_benchmark():
    # R1 v2 D.1: 64 AIME and GPQA, 16 MATH, 8 LiveCodeBench
    assert {n: b.samples for n, b in BENCHMARKS.items()} == {"aime2024": 64, "math500": 16, "gpqa_diamond": 64,
                                                             "livecodebench": 8}


@pytest.mark.parametrize("name,ids,answers", [
    ("aime2024.jsonl", ["60", "61"], ["7", "6"]),
    ("aime2024_maxwell.jsonl", ["2024-I-1", "2024-I-2"], ["32", "7"]),  # capitalised fields, integer answers
])
def test_aime_both_release_spellings(name, ids, answers):
    samples = load_aime2024(FIXTURES / name)
    assert [s.id for s in samples] == ids and [s.answer for s in samples] == answers
    assert all(s.kind == "math" and s.prompt.endswith("\n" + MATH_INSTRUCTION) for s in samples)
    assert samples[0].prompt.startswith("Synthetic problem: ")


def test_math500():
    samples = load_math500(FIXTURES / "math500.jsonl")
    assert [(s.id, s.answer) for s in samples] == [("test/prealgebra/0001.json", "\\frac{3}{4}"),
                                                   ("test/algebra/0002.json", "5")]
    assert samples[1].prompt == "Synthetic: solve $2x = 10$.\n" + MATH_INSTRUCTION


def test_gpqa_shuffle_is_seeded_and_the_gold_follows_the_correct_answer(tmp_path):
    a = load_gpqa_diamond(FIXTURES / "gpqa_diamond.csv", seed=0)
    assert a == load_gpqa_diamond(FIXTURES / "gpqa_diamond.csv", seed=0)
    correct = {"recSynthetic0001": "Nitrogen", "recSynthetic0002": "Newton", "recSynthetic0003": "Mitochondrion"}
    for s in a:
        assert s.kind == "general" and s.answer in "ABCD"
        assert f"\n{s.answer}) {correct[s.id]}\n" in s.prompt + "\n"
        assert "'Answer: $LETTER'" in s.prompt and s.prompt.count(") ") >= 4
    # Another seed moves the letters; over many seeds the gold letter is uniform.
    golds = Counter(load_gpqa_diamond(FIXTURES / "gpqa_diamond.csv", seed=k)[0].answer for k in range(400))
    assert set(golds) == set("ABCD") and min(golds.values()) > 60
    # The same rows as JSONL (a `datasets` export) load the same way.
    import csv
    with (FIXTURES / "gpqa_diamond.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    (tmp_path / "gpqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_gpqa_diamond(tmp_path / "gpqa.jsonl", seed=0) == a


def test_livecodebench_tests_prompts_and_date_window():
    samples, problems = load_livecodebench(FIXTURES / "livecodebench.jsonl")
    assert [s.id for s in samples] == ["synth_abc001_a", "9001", "synth_cf_1A"]
    stdin = problems["synth_abc001_a"]
    assert stdin.func_name is None
    assert [(c.input, c.output) for c in stdin.cases] == [("2 3\n", "5\n"), ("10 -4\n", "6\n"),
                                                          ("1000000000 1000000000\n", "2000000000\n")]
    assert problems["9001"].func_name == "maxOfList" and len(problems["9001"].cases) == 2
    assert "Read the inputs from stdin" in samples[0].prompt
    assert "class Solution:\n    def maxOfList" in samples[1].prompt
    window, _ = load_livecodebench(FIXTURES / "livecodebench.jsonl", ("2024-08-01", "2025-01-31"))
    assert [s.id for s in window] == ["synth_abc001_a", "9001"]  # the 2023 problem is outside


def test_private_cases_release_encoding_round_trips():
    cases = [{"input": "1\n", "output": "2\n", "testtype": "stdin"}]
    release = base64.b64encode(zlib.compress(pickle.dumps(json.dumps(cases)))).decode()
    assert decode_test_cases(release, "x") == cases
    assert decode_test_cases(json.dumps(cases), "x") == cases


class _Boom:
    def __reduce__(self):
        return (print, ("pickle ran code",))


def test_a_pickle_that_is_not_a_plain_string_is_refused_not_run(capsys):
    evil = base64.b64encode(zlib.compress(pickle.dumps(_Boom()))).decode()
    with pytest.raises(ValueError, match="global builtins.print refused"):
        decode_test_cases(evil, "f.jsonl:3: private_test_cases")
    assert "pickle ran code" not in capsys.readouterr().out
    not_str = base64.b64encode(zlib.compress(pickle.dumps([1, 2]))).decode()
    with pytest.raises(ValueError, match="holds a list, not a JSON string"):
        decode_test_cases(not_str, "x")


@pytest.mark.parametrize("record,message", [
    ({"problem": "p"}, "missing field 'answer' / 'Answer'"),
    ({"problem": "p", "answer": True}, "answer: expected str or int"),
    ({"problem": 3, "answer": "1"}, "problem: expected str"),
])
def test_bad_aime_record_names_file_line_and_field(tmp_path, record, message):
    path = tmp_path / "aime.jsonl"
    path.write_text(json.dumps({"problem": "ok", "answer": "1"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=f"aime.jsonl:2: {message}"):
        load_aime2024(path)


def test_bad_livecodebench_records(tmp_path):
    good = json.loads((FIXTURES / "livecodebench.jsonl").read_text().splitlines()[1])
    path = tmp_path / "lcb.jsonl"
    for change, message in [({"metadata": "{}"}, "need a `func_name`"),
                            ({"private_test_cases": "not base64 !"}, "neither JSON nor the release"),
                            ({"public_test_cases": "[{\"input\": 1}]"}, "test case 1: expected")]:
        path.write_text(json.dumps({**good, **change}) + "\n")
        with pytest.raises(ValueError, match=f"lcb.jsonl:1: .*{message}"):
            load_livecodebench(path)


def test_load_benchmark_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark 'aime2025'; known: aime2024"):
        load_benchmark("aime2025", FIXTURES / "aime2024.jsonl")
    with pytest.raises(ValueError, match="contest dates apply to livecodebench only"):
        load_benchmark("math500", FIXTURES / "math500.jsonl", contest_dates=("2024-01-01", "2024-12-31"))
    with pytest.raises(FileNotFoundError, match="benchmark file not found"):
        load_benchmark("math500", tmp_path / "none.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no record"):
        load_benchmark("math500", tmp_path / "empty.jsonl")

"""JSONL records: every invalid line is an error naming file:line and the field; writes are atomic."""

import json
import os

import pytest

from r1moe.data import PreferencePair, PromptSample, SFTSample, read_pairs, read_prompts, read_sft, write_jsonl

GOOD_PROMPT = '{"prompt": "Compute 1 + 1", "answer": "2"}'

# (reader, bad second line, fragments the error must contain besides "file:2")
BAD_LINES = [
    (read_prompts, '{"prompt": "a", "answer": ', ["malformed JSON"]),
    (read_prompts, '{"prompt": "a"}', ["answer", "missing"]),
    (read_prompts, '{"prompt": "a", "answer": 5}', ["answer", "string"]),
    (read_prompts, '{"prompt": ["a"], "answer": "5"}', ["prompt", "string"]),
    (read_prompts, '{"prompt": "a", "answer": "5", "kind": "poem"}', ["kind", "poem", "math"]),
    (read_prompts, '{"prompt": "a", "answer": "5", "colour": "red"}', ["unknown field", "colour"]),
    (read_prompts, '{"prompt": "a", "answer": "5", "tests": 3}', ["tests"]),
    (read_prompts, '[1, 2]', ["JSON object"]),
    (read_sft, '{"prompt": "a"}', ["response", "missing"]),
    (read_sft, '{"prompt": "a", "response": "b", "meta": "x"}', ["meta", "object"]),
    (read_pairs, '{"prompt": "a", "chosen": "b", "rejected": null}', ["rejected"]),
    (read_pairs, '{"prompt": "a", "chosen": "b"}', ["rejected", "missing"]),
]

GOOD_FIRST = {read_prompts: GOOD_PROMPT, read_sft: '{"prompt": "a", "response": "b"}',
              read_pairs: '{"prompt": "a", "chosen": "b", "rejected": "c"}'}


@pytest.mark.parametrize("reader,line,fragments", BAD_LINES)
def test_bad_line_names_file_line_and_field(tmp_path, reader, line, fragments):
    path = tmp_path / "data.jsonl"
    path.write_text(GOOD_FIRST[reader] + "\n" + line + "\n")
    with pytest.raises(ValueError) as err:
        reader(path)
    message = str(err.value)
    assert f"{path}:2:" in message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_is_an_error_naming_it(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match="empty dataset") as err:
        read_prompts(path)
    assert str(path) in str(err.value)


def test_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_prompts(tmp_path / "nope.jsonl")


def test_round_trip_omits_none_fields(tmp_path):
    path = tmp_path / "p.jsonl"
    records = [PromptSample(prompt="Compute 1 + 1", answer="2", id="a", task="arithmetic"),
               {"prompt": "print", "answer": "", "kind": "code", "tests": "assert True", "id": None}]
    assert write_jsonl(path, records) == 2
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert "tests" not in lines[0] and "id" not in lines[1]
    back = read_prompts(path)
    assert back[0] == records[0]
    assert back[1] == PromptSample(prompt="print", answer="", kind="code", tests="assert True")


def test_round_trip_sft_and_pairs(tmp_path):
    sft = [SFTSample(prompt="p", response="r", meta={"template": "chat"}), SFTSample(prompt="p2", response="r2")]
    pairs = [PreferencePair(prompt="p", chosen="c", rejected="r", id="x")]
    write_jsonl(tmp_path / "s.jsonl", sft)
    write_jsonl(tmp_path / "q.jsonl", pairs)
    assert read_sft(tmp_path / "s.jsonl") == sft
    assert read_pairs(tmp_path / "q.jsonl") == pairs
    assert "meta" not in (tmp_path / "s.jsonl").read_text().splitlines()[1]


def test_unicode_is_kept(tmp_path):
    path = tmp_path / "u.jsonl"
    write_jsonl(path, [PromptSample(prompt="<｜User｜>计算 1 + 1", answer="2", language="zh")])
    assert "计算" in path.read_text(encoding="utf-8")
    assert read_prompts(path)[0].prompt == "<｜User｜>计算 1 + 1"


def test_atomic_write_leaves_no_temp_file(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [PromptSample(prompt="a", answer="1")])
    assert os.listdir(tmp_path) == ["out.jsonl"]
    # A failure mid-way keeps the old file whole and removes the temp file.
    with pytest.raises(TypeError):
        write_jsonl(path, [PromptSample(prompt="b", answer="2"), object()])
    assert os.listdir(tmp_path) == ["out.jsonl"]
    assert read_prompts(path) == [PromptSample(prompt="a", answer="1")]

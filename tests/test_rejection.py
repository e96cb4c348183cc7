"""Rejection sampling (R1 §2.3.3): the filters table-driven, dedup and ratio mixing as pure functions, and the stage
end to end on a real tiny checkpoint that memorised replies (greedy decoding makes it deterministic)."""

import dataclasses
import json

import pytest
import torch

from r1moe.algorithms import compute_sft_loss
from r1moe.config import SGLangSection
from r1moe.data import PromptSample, SFTSample, make_cold_start, make_dataset, make_general, read_sft, write_jsonl
from r1moe.data.prompts import encode, render_prompt
from r1moe.data.tokenizer import build_tiny_tokenizer, default_corpus
from r1moe.model import build_model, get_preset, save_pretrained
from r1moe.stages import RejectionSpec
from r1moe.train.rejection import (
    FILTERS,
    classify,
    count_code_blocks,
    deduplicate,
    longest_paragraph,
    max_repeats,
    mix_records,
    run_rejection_sampling,
)

MATH = PromptSample(prompt="Compute 2 + 3", answer="5", kind="math", task="arithmetic")
GOOD = "<think>\nWe need to compute 2 + 3.\nSo the answer is 5.\n</think>\n<answer>5</answer>"
CHINESE_COT = "<think>\n我们需要计算二加三。\nSo the answer is 5.\n</think>\n<answer>5</answer>"
LOOP = "<think>\nLet me check.\nLet me check.\nLet me check.\nLet me check.\n</think>\n<answer>5</answer>"
LOOP3 = "<think>\nLet me check.\nLet me check.\nLet me check.\nSo it is 5.\n</think>\n<answer>5</answer>"
SENTENCES = "<think>\nIt is 5. It is 5. It is 5. It is 5.\n</think>\n<answer>5</answer>"
WALL = " ".join(f"we add number {i} to the running total" for i in range(40))  # one paragraph of 280 words
LONG_PARAGRAPH = f"<think>\n{WALL} and so on.\n</think>\n<answer>5</answer>"  # 283 words
SPLIT_PARAGRAPHS = f"<think>\n{WALL}\n\n{WALL}\n</think>\n<answer>5</answer>"  # two of 280
CODE = "<think>\nWe need 2 + 3.\n```python\nprint(2 + 3)\n```\nSo the answer is 5.\n</think>\n<answer>5</answer>"
TILDE_CODE = CODE.replace("```python", "~~~").replace("```", "~~~")
CODE_TASK = PromptSample(prompt="Write f() returning 2 + 3", answer="", kind="code", tests="assert f() == 5")
CODE_IN_ANSWER = "<think>\nf returns the sum.\n</think>\n<answer>\n```python\ndef f():\n    return 2 + 3\n```\n</answer>"
INLINE_TICKS = "<think>\nWe compute `2 + 3` inline.\nSo the answer is 5.\n</think>\n<answer>5</answer>"


@pytest.mark.parametrize("template, text, num_tokens, finish, spec_kw, expected", [
    ("r1_zero", GOOD, 30, "stop", {}, None),
    ("chat", GOOD.removeprefix("<think>\n"), 30, "stop", {}, None),  # the chat prompt already opened <think>
    ("chat", GOOD, 30, "stop", {}, "malformed"),  # a second <think> after the forced one
    ("r1_zero", GOOD.replace("<answer>5", "<answer>6"), 30, "stop", {}, "incorrect"),
    ("r1_zero", "<answer>5</answer>", 5, "stop", {}, "malformed"),
    ("r1_zero", GOOD.replace("</think>\n", ""), 30, "stop", {}, "malformed"),
    ("r1_zero", CHINESE_COT, 30, "stop", {}, "language_mixing"),
    ("r1_zero", CHINESE_COT, 30, "stop", {"language": "zh", "min_language_consistency": 0.8}, "language_mixing"),
    ("r1_zero", CHINESE_COT, 30, "stop", {"min_language_consistency": 0.0}, None),
    ("r1_zero", GOOD, 128, "length", {}, "overlong"),
    ("r1_zero", GOOD, 101, "stop", {"max_tokens": 100}, "overlong"),
    ("r1_zero", GOOD, 100, "stop", {"max_tokens": 100}, None),
    ("r1_zero", LOOP, 30, "stop", {}, "repetition"),
    ("r1_zero", LOOP3, 30, "stop", {}, None),  # 3 occurrences, max_repeat 3: kept
    ("r1_zero", LOOP3, 30, "stop", {"max_repeat": 2}, "repetition"),
    ("r1_zero", SENTENCES, 30, "stop", {}, "repetition"),  # sentences within one line
    # several filters fire: the first of FILTERS counts
    ("r1_zero", "<answer>6</answer>", 128, "length", {}, "incorrect"),
    ("r1_zero", LOOP.replace("</think>\n", ""), 128, "length", {}, "malformed"),
    ("r1_zero", CHINESE_COT.replace("So the", "So the\nSo the\nSo the\nSo the"), 128, "length", {},
     "language_mixing"),
    ("r1_zero", LOOP, 128, "length", {}, "overlong"),
    # long paragraphs (default max_paragraph_words 300) and code blocks in the chain of thought
    ("r1_zero", LONG_PARAGRAPH, 30, "stop", {}, None),
    ("r1_zero", LONG_PARAGRAPH, 30, "stop", {"max_paragraph_words": 282}, "long_paragraph"),
    ("r1_zero", LONG_PARAGRAPH, 30, "stop", {"max_paragraph_words": 283}, None),
    ("r1_zero", SPLIT_PARAGRAPHS, 30, "stop", {"max_paragraph_words": 280}, None),  # blank line: two paragraphs
    ("r1_zero", SPLIT_PARAGRAPHS, 30, "stop", {"max_paragraph_words": 279}, "long_paragraph"),
    ("r1_zero", CODE, 30, "stop", {}, "code_block"),
    ("r1_zero", TILDE_CODE, 30, "stop", {}, "code_block"),
    ("r1_zero", CODE, 30, "stop", {"max_code_blocks": 1}, None),
    ("r1_zero", INLINE_TICKS, 30, "stop", {}, None),  # inline code is no block
    ("chat", CODE.removeprefix("<think>\n"), 30, "stop", {}, "code_block"),
    # order: long_paragraph, code_block after language_mixing, before overlong
    ("r1_zero", CODE.replace("We need", "我们需要计算"), 30, "stop", {}, "language_mixing"),
    ("r1_zero", CODE.replace("We need", WALL), 30, "stop", {"max_paragraph_words": 100}, "long_paragraph"),
    ("r1_zero", CODE, 128, "length", {}, "code_block"),
])
def test_classify(template, text, num_tokens, finish, spec_kw, expected):
    spec = RejectionSpec(checkpoint="ckpt", prompts="p.jsonl", template=template, max_new_tokens=128, **spec_kw)
    assert classify(text, num_tokens, finish, MATH, spec) == expected


def test_code_answer_is_not_a_code_block_in_the_chain_of_thought():
    spec = RejectionSpec(checkpoint="ckpt", prompts="p.jsonl", max_new_tokens=128)
    assert classify(CODE_IN_ANSWER, 30, "stop", CODE_TASK, spec) is None
    drafted = CODE_IN_ANSWER.replace("f returns the sum.", "Draft:\n```python\ndef f(): pass\n```")
    assert classify(drafted, 30, "stop", CODE_TASK, spec) == "code_block"


def test_filters_order_is_documented():
    import r1moe.train.rejection

    assert FILTERS == ("incorrect", "malformed", "language_mixing", "long_paragraph", "code_block", "overlong",
                       "repetition")
    doc = r1moe.train.rejection.__doc__
    assert [name for name in FILTERS if f"    {name} " in doc] == list(FILTERS)


@pytest.mark.parametrize("text, words", [
    ("", 0),
    ("one two three", 3),
    ("one two\nthree\n\nfour", 3),  # a single newline does not end a paragraph
    ("a b\n  \n c d e", 3),  # a whitespace-only line does
    ("我们需要 compute", 5),  # CJK: one word per ideograph
    ("7 + 5 = 12", 0),
])
def test_longest_paragraph(text, words):
    assert longest_paragraph(text) == words


@pytest.mark.parametrize("text, blocks", [
    ("no code", 0), ("```\nx\n```", 1), ("```py\nx\n```\n~~~\ny\n~~~", 2), ("```\nunclosed", 1),
    ("inline ``` fence mid-line", 0), ("  ```\nindented\n  ```", 1),
])
def test_count_code_blocks(text, blocks):
    assert count_code_blocks(text) == blocks


def test_max_repeats_ignores_tags_blank_and_symbol_lines():
    assert max_repeats("<think>\n\n\n}\n}\n}\n}\nA line.\n</think>") == 1
    assert max_repeats("a.\nb. a.\na") == 2  # "a." twice as sentences; "a" differs from "a."


def _sft(prompt, response, kind="reasoning"):
    return SFTSample(prompt=prompt, response=response, meta={"kind": kind})


def test_deduplicate_same_prompt_and_response_only():
    records = [_sft("p", "r"), _sft("p", "r"), _sft("p", "r2"), _sft("q", "r"), _sft("p", "r")]
    out, dropped = deduplicate(records)
    assert [(r.prompt, r.response) for r in out] == [("p", "r"), ("p", "r2"), ("q", "r")]
    assert dropped == 2


@pytest.mark.parametrize("num_reasoning, num_general, ratio, expect_general, expect_ratio", [
    (6, 10, 0.75, 2, 0.75),
    (6, 1, 0.75, 1, 6 / 7),      # fewer general records than the ratio asks for: all of them
    (6, 10, 1.0, 0, 1.0),
    (3, 10, 0.5, 3, 0.5),
    (3, 0, 0.5, 0, 1.0),
    (600, 1000, 0.75, 200, 0.75),  # the paper's ~600k : ~200k
])
def test_mix_records_ratio(num_reasoning, num_general, ratio, expect_general, expect_ratio):
    reasoning = [_sft(f"r{i}", "x") for i in range(num_reasoning)]
    general = [_sft(f"g{i}", "y", "general") for i in range(num_general)]
    mixed, stats = mix_records(reasoning, general, ratio, seed=3)
    kinds = [r.meta["kind"] for r in mixed]
    assert kinds.count("reasoning") == num_reasoning and kinds.count("general") == expect_general
    assert stats["achieved_ratio"] == pytest.approx(expect_ratio)
    assert stats["general"] == expect_general and stats["total"] == len(mixed)
    again, _ = mix_records(reasoning, general, ratio, seed=3)
    assert [r.prompt for r in again] == [r.prompt for r in mixed]


def test_mix_records_rejects_bad_ratio():
    with pytest.raises(ValueError, match="reasoning_ratio"):
        mix_records([_sft("p", "r")], [], 0.0)


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module", autouse=True)
def _single_thread(one_thread):
    """Every test of this module runs on one intra-op thread (tests/conftest.py: one_thread)."""


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(default_corpus(num_per_task=50), vocab_size=512)


def _tiny_cfg():
    return get_preset("tiny-moe").replace(num_hidden_layers=2, num_nextn_predict_layers=0)


@pytest.fixture(scope="module")
def memorised(tmp_path_factory, tok):
    """A tiny MoE checkpoint that replies to prompt A with a clean worked solution and to prompt B with a correct
    answer whose reasoning mixes languages. C is A's prompt with a wrong gold answer, so the memorised reply to it is
    graded incorrect whatever the model makes of unseen prompts."""
    torch.manual_seed(0)
    a, b = make_dataset("arithmetic", 2, seed=0)
    c = dataclasses.replace(a, answer=a.answer + "1", id=f"{a.id}-wrong-gold")
    assert len({a.answer, b.answer, c.answer}) == 3
    reply_a = make_cold_start([a], "chat")[0].response
    reply_b = make_cold_start([b], "chat")[0].response.replace("We need to compute", "我们需要计算")
    model = build_model(_tiny_cfg(), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    seqs = []
    for s, reply in ((a, reply_a), (b, reply_b)):
        p = encode(tok, render_prompt("chat", s.prompt))
        seqs.append((p, encode(tok, reply) + [2]))
    T = max(len(p) + len(r) for p, r in seqs)
    ids = torch.zeros((2, T), dtype=torch.long)
    mask = torch.zeros((2, T), dtype=torch.bool)
    for n, (p, r) in enumerate(seqs):
        ids[n, :len(p) + len(r)] = torch.tensor(p + r)
        mask[n, len(p):len(p) + len(r)] = True
    for _ in range(80):
        loss = compute_sft_loss(model(ids[:, :-1]).logits, ids[:, 1:], mask[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert float(loss.detach()) < 0.05, "the fixture model did not memorise its replies"
    root = tmp_path_factory.mktemp("rejection")
    save_pretrained(model, root / "ckpt", tokenizer=tok)
    write_jsonl(root / "prompts.jsonl", [a, b, c, *make_general(1, seed=0)])  # general prompts are skipped
    return root, (a, b, c), reply_a


def test_end_to_end_filters_dedup_mix(memorised, tmp_path):
    root, (a, _, _), reply_a = memorised
    general = [SFTSample(prompt=f"Say hi {i}", response=f"hi {i}", kind="general", meta={"template": "chat"})
               for i in range(5)]
    write_jsonl(tmp_path / "general.jsonl", general)
    spec = RejectionSpec(checkpoint=str(root / "ckpt"), prompts=str(root / "prompts.jsonl"), samples_per_prompt=2,
                         temperature=0.0, max_new_tokens=96, template="chat", general=str(tmp_path / "general.jsonl"),
                         reasoning_ratio=0.5)
    stats = run_rejection_sampling(spec, tmp_path / "out")
    assert stats["prompts"] == 3 and stats["general_prompts_skipped"] == 1 and stats["samples"] == 6
    assert stats["rejected"] == {"incorrect": 2, "malformed": 0, "language_mixing": 2, "long_paragraph": 0,
                                 "code_block": 0, "overlong": 0, "repetition": 0}
    assert stats["passed_filters"] == 2 and stats["duplicates"] == 1 and stats["kept"] == 1
    assert stats["general"] == 1 and stats["total"] == 2 and stats["achieved_ratio"] == 0.5
    assert json.loads((tmp_path / "out" / "stats.json").read_text()) == stats
    records = read_sft(tmp_path / "out" / "sft.jsonl")
    reasoning = [r for r in records if r.meta["kind"] == "reasoning"]
    assert len(records) == 2 and len(reasoning) == 1
    r = reasoning[0]
    assert (r.prompt, r.response) == (a.prompt, reply_a)
    assert r.meta["checkpoint"] == str(root / "ckpt") and r.meta["sample_index"] == 0
    assert r.meta["template"] == "chat" and r.meta["reward"]["accuracy"] == 1.0
    assert [g.meta["kind"] for g in records if g is not r] == ["general"]


def test_nothing_survives_is_an_error_naming_checkpoint(tmp_path, tok):
    save_pretrained(build_model(_tiny_cfg(), seed=1), tmp_path / "random", tokenizer=tok)
    write_jsonl(tmp_path / "prompts.jsonl", make_dataset("arithmetic", 2, seed=1))
    spec = RejectionSpec(checkpoint=str(tmp_path / "random"), prompts=str(tmp_path / "prompts.jsonl"),
                         samples_per_prompt=2, max_new_tokens=8, template="chat")
    with pytest.raises(ValueError, match=r"random.*no sample survived.*'incorrect': 4"):
        run_rejection_sampling(spec, tmp_path / "out")
    assert not (tmp_path / "out" / "sft.jsonl").exists()


def test_missing_or_incomplete_checkpoint(tmp_path):
    write_jsonl(tmp_path / "prompts.jsonl", make_dataset("arithmetic", 1, seed=1))
    (tmp_path / "half").mkdir()
    for ckpt in (tmp_path / "nowhere", tmp_path / "half"):
        spec = RejectionSpec(checkpoint=str(ckpt), prompts=str(tmp_path / "prompts.jsonl"))
        with pytest.raises(FileNotFoundError, match=str(ckpt)):
            run_rejection_sampling(spec, tmp_path / "out")


def test_bad_spec_and_general_template_mismatch(memorised, tmp_path):
    root, _, _ = memorised
    base = {"checkpoint": str(root / "ckpt"), "prompts": str(root / "prompts.jsonl"), "template": "chat"}
    with pytest.raises(ValueError, match="reasoning_ratio"):
        run_rejection_sampling(RejectionSpec(**base, reasoning_ratio=1.5), tmp_path)
    with pytest.raises(ValueError, match="language"):
        run_rejection_sampling(RejectionSpec(**base, language="xx"), tmp_path)
    with pytest.raises(ValueError, match="max_paragraph_words=0"):
        run_rejection_sampling(RejectionSpec(**base, max_paragraph_words=0), tmp_path)
    with pytest.raises(ValueError, match="max_code_blocks=-1"):
        run_rejection_sampling(RejectionSpec(**base, max_code_blocks=-1), tmp_path)
    with pytest.raises(ValueError, match="rejection.sglang is set with rejection.engine=builtin"):
        run_rejection_sampling(RejectionSpec(**base, sglang=SGLangSection(dp=2)), tmp_path)
    write_jsonl(tmp_path / "only_general.jsonl", make_general(2, seed=0))
    with pytest.raises(ValueError, match="no reasoning prompts"):
        run_rejection_sampling(RejectionSpec(**{**base, "prompts": str(tmp_path / "only_general.jsonl")}), tmp_path)
    write_jsonl(tmp_path / "general.jsonl", [SFTSample(prompt="p", response="r", meta={"template": "r1_zero"})])
    with pytest.raises(ValueError, match="meta.template='r1_zero'"):
        run_rejection_sampling(RejectionSpec(**base, general=str(tmp_path / "general.jsonl")), tmp_path)


def test_rejection_and_eval_are_commands_like_the_other_stages(memorised, tmp_path, capsys):
    """`r1moe rejection RECIPE --out DIR` and `r1moe eval RECIPE --out DIR` run the functions the pipeline runs,
    mark DIR complete, refuse a complete DIR and name a bad key."""
    from r1moe import cli

    root, _, _ = memorised
    recipe = tmp_path / "rejection.yaml"
    recipe.write_text(f"checkpoint: {root / 'ckpt'}\nprompts: {root / 'prompts.jsonl'}\ntemplate: chat\n"
                      f"temperature: 0.0\nmax_new_tokens: 96\n")
    out = tmp_path / "rs"
    assert cli.main(["rejection", str(recipe), "samples_per_prompt=2", "--out", str(out)]) == 0
    done = json.loads((out / "DONE.json").read_text())
    assert done["stage"] == "rejection" and done["samples"] == 6 and done["kept"] == 1
    assert len(read_sft(out / "sft.jsonl")) == 1
    assert cli.main(["rejection", str(recipe), "--out", str(out)]) == 2
    assert "already holds a complete rejection run" in capsys.readouterr().err
    assert cli.main(["rejection", str(recipe), "no_such_key=1", "--out", str(tmp_path / "x")]) == 2
    assert "no_such_key" in capsys.readouterr().err and not (tmp_path / "x").exists()

    recipe = tmp_path / "eval.yaml"
    recipe.write_text(f"checkpoints: {{memorised: {root / 'ckpt'}}}\ndata: {root / 'prompts.jsonl'}\nsamples: 1\n"
                      f"max_new_tokens: 8\ntemplate: chat\n")
    assert cli.main(["eval", str(recipe), "--out", str(tmp_path / "ev")]) == 0
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert set(results) == {"memorised"} and 0 <= results["memorised"]["pass@1"] <= 1
    assert json.loads((tmp_path / "ev" / "DONE.json").read_text())["results"] == str(tmp_path / "ev" / "results.json")


def _sharding_spec(root, **kw):
    kw.setdefault("temperature", 0.0)  # greedy: the memorised replies, the same on any CPU
    return RejectionSpec(checkpoint=str(root / "ckpt"), prompts=str(root / "prompts.jsonl"), samples_per_prompt=48,
                         max_new_tokens=96, template="chat", **kw)


def test_shards_and_workers_give_the_one_shot_result(memorised, tmp_path):
    """3 prompts x 48 samples = 144 samples: in one shard, or in 3 shards of 64 made by two workers in turn (the
    first returns incomplete and writes no sft.jsonl), the records and the summed counts are the same."""
    root, _, _ = memorised
    one = run_rejection_sampling(_sharding_spec(root, shard_samples=192), tmp_path / "one")
    first = run_rejection_sampling(_sharding_spec(root, shard_samples=64, worker=0, num_workers=2), tmp_path / "two")
    assert first == {"complete": False, "shards": 3, "shards_waiting": 1}
    assert not (tmp_path / "two" / "sft.jsonl").exists()
    assert sorted(p.name for p in (tmp_path / "two" / "shards").glob("shard_*.json")) == ["shard_00000.json",
                                                                                         "shard_00002.json"]
    second = run_rejection_sampling(_sharding_spec(root, shard_samples=64, worker=1, num_workers=2), tmp_path / "two")
    assert second["shards"] == 3 and one["shards"] == 1
    for key in ("samples", "rejected", "passed_filters", "duplicates", "kept"):
        assert second[key] == one[key], key
    assert (tmp_path / "two" / "sft.jsonl").read_text() == (tmp_path / "one" / "sft.jsonl").read_text()


def test_a_stopped_run_resumes_from_its_finished_shards(memorised, tmp_path):
    root, _, _ = memorised
    spec = _sharding_spec(root, shard_samples=64)
    full = run_rejection_sampling(spec, tmp_path / "a")
    # a run that stopped after its first shard: keep shard 0 only, then run again
    out = tmp_path / "b"
    run_rejection_sampling(spec, out)
    for k in (1, 2):
        (out / "shards" / f"shard_{k:05d}.json").unlink()
    before = (out / "shards" / "shard_00000.jsonl").stat().st_mtime_ns
    resumed = run_rejection_sampling(spec, out)
    assert (out / "shards" / "shard_00000.jsonl").stat().st_mtime_ns == before  # not made again
    assert {k: resumed[k] for k in ("samples", "rejected", "kept")} == {k: full[k] for k in ("samples", "rejected",
                                                                                              "kept")}


def test_shards_of_another_spec_are_refused(memorised, tmp_path):
    root, _, _ = memorised
    run_rejection_sampling(_sharding_spec(root, shard_samples=64, num_workers=2), tmp_path / "out")
    with pytest.raises(ValueError, match=r"another rejection spec \(temperature: 0.0 -> 0.7\)"):
        run_rejection_sampling(_sharding_spec(root, shard_samples=64, num_workers=2, worker=1,
                                              temperature=0.7), tmp_path / "out")
    with pytest.raises(ValueError, match="shard_samples=100 must be a positive multiple of chunk=64"):
        run_rejection_sampling(_sharding_spec(root, shard_samples=100), tmp_path / "x")
    with pytest.raises(ValueError, match="worker=2 must be in 0..num_workers-1"):
        run_rejection_sampling(_sharding_spec(root, worker=2, num_workers=2), tmp_path / "x")

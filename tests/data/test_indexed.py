"""megatron-core's indexed-dataset format both ways, tools/preprocess_data.py, and the packed / blended / sharded
loader.

megatron-core itself is not a test dependency: 0.19.2 needs Python >= 3.12 and its package __init__ imports the GPU
stack (triton). tests/data/indexed/megatron_written*.{bin,idx} were written by megatron-core 0.19.2's own
`IndexedDatasetBuilder` (tests/data/indexed/make_megatron_fixture.py, which also had megatron's `IndexedDataset` read
a prefix this tool wrote). Ours reads those files, and ours writes the same bytes for the same documents: megatron
reads what we write."""

import json
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from r1moe.data.indexed import IndexedDataset, IndexedMeta, IndexedWriter, token_dtype
from r1moe.data.loader import IndexedRows, blend_indices, plan_rows
from r1moe.data.tokenizer import build_tiny_tokenizer, save_tokenizer
from r1moe.train.packing import iterate_batches, pack_examples
from r1moe.train.pretrain import build_examples

ROOT = Path(__file__).resolve().parents[2]


def _load_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("preprocess_data", ROOT / "tools" / "preprocess_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


preprocess_main = _load_tool().main

FIXTURES = Path(__file__).parent / "indexed"
MEGATRON_DOCS = [[[1, 17, 300, 2]], [[1, 5, 6], [7, 8, 2]], [[1, 65000, 2]]]  # make_megatron_fixture.py's
MEGATRON_INT32_DOCS = [[[1, 70000, 2]], [[3, 4]]]


@pytest.mark.parametrize("name,docs,dtype", [("megatron_written", MEGATRON_DOCS, np.uint16),
                                             ("megatron_written_int32", MEGATRON_INT32_DOCS, np.int32)])
def test_we_read_megatron_files_and_write_the_same_bytes(tmp_path, name, docs, dtype):
    ds = IndexedDataset(FIXTURES / name)
    assert ds.dtype == np.dtype(dtype) and ds.meta is None
    assert [[s.tolist() for s in ds.document_sequences(i)] for i in range(ds.num_documents)] == docs
    assert ds.document_lengths().tolist() == [sum(map(len, d)) for d in docs]
    with IndexedWriter(tmp_path / "ours", dtype) as w:
        for d in docs:
            w.add_document(d)
    for ext in ("bin", "idx"):
        assert (tmp_path / f"ours.{ext}").read_bytes() == (FIXTURES / f"{name}.{ext}").read_bytes()


def test_index_layout_by_hand(tmp_path):
    with IndexedWriter(tmp_path / "p", np.uint16) as w:
        w.add_document([[7, 8, 9]])
    idx = (tmp_path / "p.idx").read_bytes()
    # magic, version 1, dtype code 8 (uint16), 1 sequence, 2 document indices, length 3, pointer 0, docs [0, 1]
    assert idx == (b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, 1, 2) + struct.pack("<i", 3)
                   + struct.pack("<q", 0) + struct.pack("<qq", 0, 1))
    assert (tmp_path / "p.bin").read_bytes() == struct.pack("<HHH", 7, 8, 9)
    assert token_dtype(65499) == np.uint16 and token_dtype(65500) == np.int32  # megatron's optimal_dtype


@pytest.mark.parametrize("damage,message", [
    (lambda p: p.with_suffix(".idx").write_bytes(b"NOTANIDX" + bytes(40)), "bad magic"),
    (lambda p: p.with_suffix(".idx").write_bytes(p.with_suffix(".idx").read_bytes()[:-8]), "truncated"),
    (lambda p: p.with_suffix(".bin").write_bytes(p.with_suffix(".bin").read_bytes()[:-2]), "the index describes"),
    (lambda p: p.with_suffix(".bin").unlink(), "not found"),
])
def test_malformed_files_are_named(tmp_path, damage, message):
    prefix = tmp_path / "d"
    with IndexedWriter(prefix, np.uint16) as w:
        w.add_document([[1, 2, 3]])
        w.add_document([[4, 5]])
    damage(prefix)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        IndexedDataset(prefix)


def test_a_failed_write_leaves_no_prefix(tmp_path):
    with pytest.raises(ValueError, match="does not fit the index dtype uint16"), \
            IndexedWriter(tmp_path / "x", np.uint16) as w:
        w.add_document([[1, 70000]])
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- tools/preprocess_data.py

TEXTS = [f"the number {i} is {'even' if i % 2 == 0 else 'odd'} and {'small' if i < 50 else 'large'} " * (1 + i % 7)
         for i in range(60)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    save_tokenizer(build_tiny_tokenizer(TEXTS + ["question answer <think> </think>"], 300), d)
    return d


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _stage_tok(tok_dir):
    from r1moe.data.tokenizer import add_chat_markers, load_tokenizer
    return add_chat_markers(load_tokenizer(tok_dir))


def test_preprocess_pretrain_matches_the_jsonl_path(tmp_path, tok_dir, capsys):
    src = _jsonl(tmp_path / "c.jsonl", [{"text": t, "id": i} for i, t in enumerate(TEXTS)])
    assert preprocess_main(["--kind", "pretrain", "--input", str(src), "--tokenizer", str(tok_dir),
                            "--output-prefix", str(tmp_path / "out" / "c"), "--batch-size", "7"]) == 0
    stats = json.loads(capsys.readouterr().out)
    ds = IndexedDataset(tmp_path / "out" / "c")
    assert ds.meta.loss == "all" and ds.num_documents == len(TEXTS) == stats["documents"]
    assert ds.num_tokens == stats["tokens"]
    expected = build_examples([("", t) for t in TEXTS], _stage_tok(tok_dir), loss_on_prefix=True)
    for i, ex in enumerate(expected):
        ids, mask = ds.example(i)
        assert ids == ex.ids and mask[1:] == ex.loss_mask[1:]  # position 0 (BOS) is never a target


def test_preprocess_pretrain_reads_prompt_response_records_as_the_stage_does(tmp_path, tok_dir):
    """A corpus of worked solutions ({"prompt", "response"}, as `r1moe data make corpus` writes): one document per
    record, the prompt rendered with --template, every token a target (read_corpus + build_examples)."""
    from r1moe.train.pretrain import read_corpus

    recs = [{"prompt": f"question {i}", "response": TEXTS[i]} for i in range(10)] + [{"text": TEXTS[10]}]
    src = _jsonl(tmp_path / "c.jsonl", recs)
    assert preprocess_main(["--kind", "pretrain", "--input", str(src), "--tokenizer", str(tok_dir),
                            "--output-prefix", str(tmp_path / "c")]) == 2  # prompts need the stage's template
    assert preprocess_main(["--kind", "pretrain", "--template", "r1_zero", "--input", str(src), "--tokenizer",
                            str(tok_dir), "--output-prefix", str(tmp_path / "c")]) == 0
    ds = IndexedDataset(tmp_path / "c")
    assert ds.meta.loss == "all" and ds.meta.template == "r1_zero"
    expected = build_examples(read_corpus(src, "r1_zero"), _stage_tok(tok_dir), loss_on_prefix=True)
    for i, ex in enumerate(expected):
        ids, mask = ds.example(i)
        assert ids == ex.ids and mask[1:] == ex.loss_mask[1:]


def test_preprocess_sft_masks_the_prompt(tmp_path, tok_dir):
    recs = [{"prompt": f"question {i}", "response": TEXTS[i]} for i in range(20)]
    src = _jsonl(tmp_path / "s.jsonl", recs)
    assert preprocess_main(["--kind", "sft", "--template", "r1_zero", "--input", str(src), "--tokenizer",
                            str(tok_dir), "--output-prefix", str(tmp_path / "s")]) == 0
    ds = IndexedDataset(tmp_path / "s")
    assert ds.meta.loss == "last_sequence" and ds.meta.template == "r1_zero"
    from r1moe.templates import render
    expected = build_examples([(render("r1_zero", r["prompt"]), r["response"]) for r in recs], _stage_tok(tok_dir),
                              loss_on_prefix=False)
    assert [ds.example(i) for i in range(len(recs))] == [(e.ids, e.loss_mask) for e in expected]


@pytest.mark.parametrize("lines,extra,message", [
    (['{"text": "ok"}', '{"txt": "no"}'], [], "c.jsonl:2: expected a JSON object with a string field 'text' or"),
    (['{"text": "ok"}', '{"prompt": "q", "response": "a"}'], [], "c.jsonl:2: a prompt + response record"),
    (['{"text": "ok"}', '{"text": '], [], "c.jsonl:2: malformed JSON"),
    ([""], [], "no record"),
    (['{"text": "ok"}'], ["--template", "chat"], "--template chat has no effect"),
])
def test_preprocess_bad_input_exits_2_naming_the_line(tmp_path, tok_dir, capsys, lines, extra, message):
    src = tmp_path / "c.jsonl"
    src.write_text("\n".join(lines) + "\n")
    rc = preprocess_main(["--kind", "pretrain", "--input", str(src), "--tokenizer", str(tok_dir),
                          "--output-prefix", str(tmp_path / "out"), *extra])
    assert rc == 2 and message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]  # no prefix, no temp file


def test_preprocess_as_a_script(tmp_path, tok_dir):
    import subprocess
    import sys

    src = _jsonl(tmp_path / "s.jsonl", [{"prompt": "q", "response": "a"}, {"prompt": "q"}])
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--kind", "sft", "--template",
                        "chat", "--input", str(src), "--tokenizer", str(tok_dir), "--output-prefix",
                        str(tmp_path / "o")], capture_output=True, text=True, cwd=tmp_path, check=False)
    assert r.returncode == 2 and "s.jsonl:2: missing required field 'response'" in r.stderr


# ---------------------------------------------------------------- loader


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tok_dir):
    d = tmp_path_factory.mktemp("corpus")
    src = _jsonl(d / "c.jsonl", [{"text": t} for t in TEXTS])
    assert preprocess_main(["--kind", "pretrain", "--input", str(src), "--tokenizer", str(tok_dir),
                            "--output-prefix", str(d / "c")]) == 0
    return d / "c"


def test_plan_rows_mirrors_pack_examples():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, size=200).tolist() + [1, 1, 90]
    from r1moe.train.packing import Example
    rows = pack_examples([Example(list(range(n)), [True] * n) for n in lengths], 32, 0)
    assert len(plan_rows(lengths, 32)) - 1 == len(rows)


def test_rows_are_the_jsonl_paths_rows(corpus, tok_dir):
    seq_len = 48
    src = IndexedRows([(corpus, 1.0)], seq_len, pad_id=0)
    expected = pack_examples(build_examples([("", t) for t in TEXTS], _stage_tok(tok_dir), True), seq_len, 0)
    assert src.num_rows == len(expected)
    got = [src.row(k) for k in range(src.num_rows)]
    assert sorted(map(str, got)) == sorted(map(str, expected))


def test_ranks_split_each_global_batch_and_resume_in_place(corpus):
    src = IndexedRows([(corpus, 1.0)], 48, pad_id=0)
    whole = src.batches(8, seed=3)
    ranks = [src.batches(8, seed=3, rank=r, world=4) for r in range(4)]
    steps = 2 * src.steps_per_epoch(8) + 1  # crosses two epoch boundaries
    seen_epoch0 = []
    for step in range(steps):
        b = next(whole)
        parts = [next(it) for it in ranks]
        assert all(p.input_ids_RT.shape[0] == 2 for p in parts)
        assert np.array_equal(np.concatenate([p.input_ids_RT.numpy() for p in parts]), b.input_ids_RT.numpy())
        assert np.array_equal(np.concatenate([p.targets_RT.numpy() for p in parts]), b.targets_RT.numpy())
        if step < src.steps_per_epoch(8):
            seen_epoch0 += [str(r) for r in b.input_ids_RT.tolist()]
    assert len(set(seen_epoch0)) == len(seen_epoch0)  # no row twice within an epoch
    resumed = next(src.batches(8, seed=3, start_step=steps - 1, rank=1, world=4))
    assert np.array_equal(resumed.input_ids_RT.numpy(), parts[1].input_ids_RT.numpy())


def test_batch_shapes_match_iterate_batches(corpus, tok_dir):
    src = IndexedRows([(corpus, 1.0)], 48, pad_id=0)
    ref = next(iterate_batches(pack_examples(build_examples([("", t) for t in TEXTS], _stage_tok(tok_dir), True),
                                             48, 0), 8, 0))
    ours = next(src.batches(8, seed=0))
    for name in ("input_ids_RT", "targets_RT", "segment_ids_RT"):
        assert getattr(ours, name).shape == getattr(ref, name).shape
        assert getattr(ours, name).dtype == getattr(ref, name).dtype


def test_blend_follows_megatrons_rule():
    # weights 0.7 / 0.3: at each row the dataset with the largest w * max(k, 1) - taken
    assert blend_indices([0.7, 0.3], 10).tolist() == [0, 1, 0, 0, 1, 0, 0, 1, 0, 0]
    counts = Counter(blend_indices([3, 1, 1], 1000).tolist())
    assert [counts[d] for d in range(3)] == [600, 200, 200]


def test_blended_rows_take_each_share_and_walk_through_small_datasets(tmp_path, corpus):
    small = tmp_path / "small"
    with IndexedWriter(small, np.uint16, IndexedMeta("all", 300, 2, 1)) as w:
        for i in range(10):
            w.add_document([[1] + [10 + i] * 60 + [2]])  # one document per row at seq_len 48
    src = IndexedRows([(corpus, 1.0), (small, 1.0)], 48, pad_id=0)
    n_big = src.rows_per_dataset[0]
    assert src.num_rows == n_big + 10 and src.taken.tolist() == [(n_big + 10) // 2 + (n_big + 10) % 2,
                                                                (n_big + 10) // 2]
    # the small dataset's share exceeds its 10 rows: every row given before any repeats
    small_rows = [src.row(k, 0, 0)[0][1] for k in range(src.num_rows) if src.dataset_of[k] == 1]
    assert sorted(set(small_rows[:10])) == [10 + i for i in range(10)]


def test_bad_loader_arguments(corpus):
    src = IndexedRows([(corpus, 1.0)], 48, pad_id=0)
    with pytest.raises(ValueError, match="not divisible by the 3 data-parallel ranks"):
        next(src.batches(8, 0, world=3))
    with pytest.raises(ValueError, match="weights must be > 0"):
        IndexedRows([(corpus, 0.0)], 48, pad_id=0)

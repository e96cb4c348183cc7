"""pretrain / sft on `data.format: indexed` (tools/preprocess_data.py output, memory-mapped): the same training as
the JSONL path, blending, and the config / file mismatches that must stop a run naming the key or the file."""

import importlib.util
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides
from r1moe.config import load_config
from r1moe.data import make_cold_start, make_dataset, write_jsonl
from r1moe.model import from_pretrained
from r1moe.train import pretrain, sft
from r1moe.train.rundir import is_complete

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("preprocess_data", ROOT / "tools" / "preprocess_data.py")
preprocess = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(preprocess)


@pytest.fixture(scope="module")
def sft_files(tmp_path_factory, tiny_base):
    d = tmp_path_factory.mktemp("sft_indexed")
    write_jsonl(d / "sft.jsonl", make_cold_start(make_dataset("arithmetic", 12, seed=3)))
    assert preprocess.main(["--kind", "sft", "--template", "r1_zero", "--input", str(d / "sft.jsonl"),
                            "--tokenizer", str(tiny_base), "--output-prefix", str(d / "sft")]) == 0
    return d


def _sft_cfg(run, tiny_base, **extra):
    over = {"stage": "sft", "model.init": tiny_base, "train.epochs": 1, "train.batch_size": 64,
            "data.seq_len": 256, "optim.lr": 1e-3, "data.template": "r1_zero"}
    over.update(extra)
    return load_config(None, tiny_overrides(run, **over))


def test_sft_indexed_trains_like_jsonl(tmp_path, tiny_base, sft_files):
    # One step over every row (batch larger than the data): both paths see the same rows, so the same loss and update.
    a = sft.run(_sft_cfg(tmp_path / "jsonl", tiny_base, **{"data.train": sft_files / "sft.jsonl"}))
    b = sft.run(_sft_cfg(tmp_path / "idx", tiny_base, **{"data.train": sft_files / "sft", "data.format": "indexed"}))
    assert a["steps"] == b["steps"] == 1 and a["rows"] == b["rows"]
    assert b["final_loss"] == pytest.approx(a["final_loss"], rel=1e-5)
    ma, mb = from_pretrained(tmp_path / "jsonl" / "final"), from_pretrained(tmp_path / "idx" / "final")
    for (n, pa), pb in zip(ma.state_dict().items(), mb.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6, msg=n)


def test_pretrain_on_a_blend(tmp_path, tiny_data, tiny_base):
    for name, seed in (("a", 0), ("b", 1)):
        write_jsonl(tmp_path / f"{name}.jsonl", [{"text": f"{i} + {seed} = {i + seed}"} for i in range(40)])
        assert preprocess.main(["--kind", "pretrain", "--input", str(tmp_path / f"{name}.jsonl"), "--tokenizer",
                                str(tiny_base), "--output-prefix", str(tmp_path / name)]) == 0
    cfg = load_config("recipes/tiny/r1_zero/pretrain.yaml", tiny_overrides(tmp_path / "run", **{
        "stage": "pretrain", "data.format": "indexed", "data.train": "null", "data.tokenizer": tiny_base,
        "train.steps": 2, "train.batch_size": 2, "data.seq_len": 64, "optim.warmup_steps": 0}) + [
        f"data.blend={{{tmp_path / 'a'}: 3.0, {tmp_path / 'b'}: 1.0}}"])
    summary = pretrain.run(cfg)
    assert is_complete(cfg.run_dir) and summary["steps"] == 2 and summary["rows"] > 0


@pytest.mark.parametrize("over,message", [
    ({"data.blend": "{x: 1.0}"}, "data.blend is set but data.format=jsonl"),
    ({"data.format": "indexed", "stage": "grpo"}, "only pretrain and sft read indexed datasets; grpo"),
    ({"data.format": "indexed", "data.train": "p", "data.blend": "{x: 1.0}"}, "both set"),
    ({"data.format": "indexed", "data.train": "null", "data.blend": "{x: 0.0}"}, "data.blend.x=0.0 must be > 0"),
])
def test_config_errors(tmp_path, over, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, tiny_overrides(tmp_path, **{"stage": "sft", **over}))


@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_indexed_data_is_accepted_on_megatron(tmp_path, stage):
    cfg = load_config(None, tiny_overrides(tmp_path, **{"stage": stage, "data.format": "indexed",
                                                        "parallel.backend": "megatron", "data.train": "corpus"}))
    assert cfg.data.format == "indexed" and cfg.parallel.backend == "megatron"


def test_file_and_stage_mismatches(tmp_path, tiny_base, sft_files):
    with pytest.raises(ValueError, match="made with --kind sft; the pretrain stage needs --kind pretrain"):
        pretrain.run(load_config(None, tiny_overrides(tmp_path / "p", **{
            "stage": "pretrain", "data.format": "indexed", "data.train": sft_files / "sft",
            "data.tokenizer": tiny_base})))
    with pytest.raises(ValueError, match="prompts rendered with template 'r1_zero'; data.template is 'chat'"):
        sft.run(_sft_cfg(tmp_path / "s", tiny_base, **{"data.train": sft_files / "sft", "data.format": "indexed",
                                                        "data.template": "chat"}))
    # a corpus of prompt + response records rendered with one template, pretrained under another
    assert preprocess.main(["--kind", "pretrain", "--template", "r1_zero", "--input", str(sft_files / "sft.jsonl"),
                            "--tokenizer", str(tiny_base), "--output-prefix", str(tmp_path / "corpus")]) == 0
    with pytest.raises(ValueError, match="corpus.meta.json: prompts rendered with template 'r1_zero'; data.template is "
                                         "'chat'"):
        pretrain.run(load_config(None, tiny_overrides(tmp_path / "c", **{
            "stage": "pretrain", "data.format": "indexed", "data.train": tmp_path / "corpus",
            "data.tokenizer": tiny_base, "data.template": "chat"})))
    megatron = ROOT / "tests" / "data" / "indexed" / "megatron_written"
    with pytest.raises(ValueError, match="a pretraining file .* sft needs one made by tools/preprocess_data.py"):
        sft.run(_sft_cfg(tmp_path / "m", tiny_base, **{"data.train": megatron, "data.format": "indexed"}))
    with pytest.raises(ValueError, match="pretrain needs a tokenizer"):
        pretrain.run(load_config(None, tiny_overrides(tmp_path / "t", **{
            "stage": "pretrain", "data.format": "indexed", "data.train": megatron})))
    # megatron's files carry no tokenizer record: an id the model does not have stops the run at its row
    with pytest.raises(ValueError, match="megatron_written: document 2 holds token id 65000; the tokenizer has"):
        pretrain.run(load_config("recipes/tiny/r1_zero/pretrain.yaml", tiny_overrides(tmp_path / "u", **{
            "stage": "pretrain", "data.format": "indexed", "data.train": megatron, "data.tokenizer": tiny_base,
            "train.steps": 2, "train.batch_size": 1, "data.seq_len": 8})))  # 2 rows: both read in 2 steps
    assert not any((tmp_path / n).exists() for n in "psmtc")
    assert not (tmp_path / "u" / "final").exists()  # refused before any run directory

"""`parallel.backend: megatron` fails early and clearly where it cannot run: no GPU, no megatron-core / Transformer
Engine, a CPU device, context parallelism. The error names parallel.backend (or the field), comes before any
run directory exists, and the CLI turns it into exit status 2 with that one line."""

import importlib.util

import pytest
import torch

from conftest import tiny_overrides
from r1moe import cli
from r1moe.config import load_config
from r1moe.data import make_cold_start, make_dataset, write_jsonl
from r1moe.train import grpo, pretrain, sft

GPU_STACK = torch.cuda.is_available() and importlib.util.find_spec("megatron") is not None


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from r1moe.data.tokenizer import build_tiny_tokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    build_tiny_tokenizer(["1 + 2 = 3", "<think> </think> <answer> </answer>"], vocab_size=400).save(str(path))
    return path


def _stage_args(stage, tmp_path, tiny_data, tokenizer, *extra):
    """Random init with a given tokenizer: no checkpoint needed to reach the backend check."""
    over = {"data.train": tiny_data / "train.jsonl", "data.tokenizer": tokenizer, "train.steps": 1}
    if stage == "pretrain":
        over["data.train"] = tiny_data / "corpus.jsonl"
    elif stage == "sft":
        write_jsonl(tmp_path / "sft.jsonl", make_cold_start(make_dataset("arithmetic", 4, seed=3)))
        over["data.train"] = tmp_path / "sft.jsonl"
    return [*tiny_overrides(tmp_path / "run", **over), "parallel.backend=megatron", f"stage={stage}", *extra]


@pytest.mark.parametrize("stage", ["pretrain", "sft", "grpo"])
def test_missing_gpu_stack_is_a_clear_error_before_the_run_dir(stage, tmp_path, tiny_data, tokenizer, capsys):
    if GPU_STACK:
        pytest.skip("CUDA and megatron-core are present here: nothing is missing")
    run = {"pretrain": pretrain.run, "sft": sft.run, "grpo": grpo.run}[stage]
    cfg = load_config(None, _stage_args(stage, tmp_path, tiny_data, tokenizer))
    with pytest.raises(ValueError, match="parallel.backend=megatron needs") as err:
        run(cfg)
    if not torch.cuda.is_available():
        assert "CUDA" in str(err.value)
    if importlib.util.find_spec("megatron") is None:
        assert "megatron-core" in str(err.value)
    assert "parallel.backend=reference" in str(err.value)  # says what to do instead
    assert not (tmp_path / "run").exists()
    # the CLI: one line, exit status 2
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: backend-error\n")
    assert cli.main([stage, str(recipe), *_stage_args(stage, tmp_path, tiny_data, tokenizer)]) == 2
    assert "parallel.backend=megatron needs" in capsys.readouterr().err


@pytest.mark.parametrize(("extra", "field"), [("train.device=cpu", "train.device='cpu'"),
                                              ("parallel.cp=2", "parallel.cp=2")])
def test_settings_the_megatron_trainers_refuse(extra, field, tmp_path, tiny_data, tokenizer):
    cfg = load_config(None, _stage_args("grpo", tmp_path, tiny_data, tokenizer, extra))
    with pytest.raises(ValueError, match="parallel.backend=megatron|parallel.cp") as err:
        grpo.run(cfg)
    assert field in str(err.value)
    assert not (tmp_path / "run").exists()

"""Shared tiny fixtures for stage tests: a task dataset, a pretraining corpus and a pretrained tiny checkpoint."""

import pytest

from r1moe.data import make_dataset, write_jsonl
from r1moe.data.corpus import make_corpus


def tiny_overrides(run_dir, **extra):
    base = {"logging.run_dir": str(run_dir), "logging.wandb": "disabled", "logging.plots": "false",
            "train.log_every": "1"}
    base.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    write_jsonl(d / "train.jsonl", make_dataset("arithmetic", 64, seed=0))
    write_jsonl(d / "eval.jsonl", make_dataset("arithmetic", 6, seed=1))
    write_jsonl(d / "corpus.jsonl", make_corpus("arithmetic", 200, seeds=[2]))
    return d


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, tiny_data):
    """A tiny-moe base checkpoint (a few pretraining steps): an HF directory with tokenizer.json."""
    from r1moe.config import load_config
    from r1moe.train import pretrain

    run = tmp_path_factory.mktemp("pretrain")
    cfg = load_config("recipes/tiny/r1_zero/pretrain.yaml", tiny_overrides(
        run, **{"data.train": tiny_data / "corpus.jsonl", "train.steps": 3, "train.batch_size": 2,
                "data.seq_len": 256, "optim.warmup_steps": 0, "train.mtp_weight": 0.3, "stage": "pretrain"}))
    pretrain.run(cfg)
    return run / "final"

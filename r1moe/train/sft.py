"""Supervised fine-tuning: loss on response tokens only, packed sequences. Used for the cold start (R1 stage 1),
SFT on rejection-sampled data (stage 3; paper: 2 epochs from the *base* model) and distillation into dense
students (§2.4: SFT only, no RL).

Data (data.train): JSONL with `prompt` and `response` per line; the prompt is rendered with data.template. With
`data.format: indexed`: a .bin/.idx prefix from `tools/preprocess_data.py --kind sft` (or `data.blend`).

    r1moe sft recipes/tiny/r1/stage1_cold_start.yaml [key=value ...] [--resume]
"""

from __future__ import annotations

import sys

from r1moe.cli import stage_main
from r1moe.config import JobConfig
from r1moe.data.prompts import render_prompt

from . import checks, common
from .lm import train_lm
from .pretrain import build_examples


def run(cfg: JobConfig, resume: bool = False) -> dict:
    from r1moe.data import read_sft

    checks.validate(cfg)  # data.train, a tokenizer source
    if cfg.data.format == "indexed":
        from r1moe.data.loader import build_indexed_rows

        tok = common.load_stage_tokenizer(cfg)
        return train_lm(cfg, build_indexed_rows(cfg.data, tok, cfg.stage), tok, resume)
    records = read_sft(cfg.data.train)
    tok = common.load_stage_tokenizer(cfg)
    docs = [(render_prompt(cfg.data.template, r.prompt), r.response) for r in records]
    return train_lm(cfg, build_examples(docs, tok, loss_on_prefix=False), tok, resume)


def main(argv: list[str] | None = None) -> int:
    return stage_main("sft", run, argv)


if __name__ == "__main__":
    sys.exit(main())

"""Pretraining: next-token prediction on a text or JSONL corpus with the reference model (+ MTP, + the
aux-loss-free expert-bias update of DeepSeek-V3 §2.1.2). Tiny runs build their tokenizer from the corpus.

Indexed data (`data.format: indexed`, r1moe/data/loader.py): a .bin/.idx prefix (tools/preprocess_data.py or
megatron's) or several in `data.blend`, memory-mapped; the tokenizer must be given (data.tokenizer or model.init).

Corpus formats (data.train): `.txt` (documents separated by blank lines) or `.jsonl` with {"text": ...} or
{"prompt": ..., "response": ...} per line (the prompt rendered with data.template; loss on every token).

    r1moe pretrain recipes/tiny/r1_zero/pretrain.yaml [key=value ...] [--resume]
    python -m r1moe.train.pretrain recipes/tiny/r1_zero/pretrain.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

from tokenizers import Tokenizer

from r1moe.cli import stage_main
from r1moe.config import JobConfig
from r1moe.data.prompts import bos_prefix, encode, render_prompt
from r1moe.data.schema import iter_json_lines, iter_lines
from r1moe.data.tokenizer import special_ids

from . import checks, common
from .lm import train_lm
from .packing import Example


def read_corpus(path: str | Path, template: str) -> list[tuple[str, str]]:
    """(prefix, text) pairs: prefix is the rendered prompt ('' for plain text). Errors name file:line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.train={path}: file not found")
    docs: list[tuple[str, str]] = []
    if path.suffix == ".jsonl":
        for where, rec in iter_json_lines(path):  # ValueError naming file:line (bad bytes, bad JSON)
            if isinstance(rec, dict) and isinstance(rec.get("text"), str):
                docs.append(("", rec["text"]))
            elif isinstance(rec, dict) and isinstance(rec.get("prompt"), str) and isinstance(rec.get("response"), str):
                docs.append((render_prompt(template, rec["prompt"]), rec["response"]))
            else:
                raise ValueError(f"{where}: expected a string field 'text' or 'prompt' + 'response'")  # noqa: TRY004
    else:
        text = "".join(line for _, line in iter_lines(path)).replace("\r\n", "\n")
        docs = [("", d.strip()) for d in text.split("\n\n") if d.strip()]
    if not docs:
        raise ValueError(f"{path}: empty dataset")
    return docs


def build_examples(docs: list[tuple[str, str]], tok: Tokenizer, loss_on_prefix: bool) -> list[Example]:
    eos = special_ids(tok)[2]
    start = bos_prefix(tok)
    out = []
    for prefix, text in docs:
        p = encode(tok, prefix) if prefix else []
        r = encode(tok, text)
        ids = start + p + r + [eos]
        mask = [False] * len(start) + [loss_on_prefix] * len(p) + [True] * (len(r) + 1)
        out.append(Example(ids, mask))
    return out


def tiny_tokenizer_for(docs: list[tuple[str, str]], vocab_size: int) -> Tokenizer:
    from r1moe.data.tokenizer import build_tiny_tokenizer
    from r1moe.templates import TEMPLATES

    texts = [t for d in docs for t in d if t] + [str(t) for t in TEMPLATES.values()]
    return build_tiny_tokenizer(texts, vocab_size=vocab_size)


def run(cfg: JobConfig, resume: bool = False) -> dict:
    checks.validate(cfg)
    if cfg.data.format == "indexed":
        from r1moe.data.loader import build_indexed_rows

        tok = common.load_stage_tokenizer(cfg)
        return train_lm(cfg, build_indexed_rows(cfg.data, tok, cfg.stage), tok, resume)
    docs = read_corpus(cfg.data.train, cfg.data.template)
    tok = common.load_stage_tokenizer(cfg) or tiny_tokenizer_for(docs, cfg.data.tokenizer_vocab_size)
    return train_lm(cfg, build_examples(docs, tok, loss_on_prefix=True), tok, resume)


def main(argv: list[str] | None = None) -> int:
    return stage_main("pretrain", run, argv)


if __name__ == "__main__":
    sys.exit(main())

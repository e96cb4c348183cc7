"""JSONL -> tokenized PREFIX.bin / PREFIX.idx in megatron-core's indexed-dataset format (r1moe/data/indexed.py), for
`data.format: indexed` (pretrain, sft) and for megatron's own GPTDataset.

    python tools/preprocess_data.py --kind pretrain --input corpus.jsonl --tokenizer ckpt/ --output-prefix data/corpus
    python tools/preprocess_data.py --kind sft --input sft_a.jsonl --input sft_b.jsonl --tokenizer ckpt/ \\
        --template chat --output-prefix data/sft

Inputs: `--kind pretrain`: the corpus records `r1moe pretrain` reads, {"text": ...} (other fields ignored, as
megatron's --json-keys does) or {"prompt", "response"} (the prompt rendered with --template, one document);
`--kind sft`: the SFT records `r1moe sft` reads (prompt, response, ...; r1moe/data/schema.py, every line checked).
A bad line is an error naming file:line, exit status 2, and no output prefix is written.

Tokens are exactly what the JSONL path of the stage trains on (r1moe/train/pretrain.py `build_examples`):
pretrain `[bos] text [eos]` (or `[bos] render(template, prompt) response [eos]`) as one sequence per document;
sft `[bos] render(template, prompt)` and `response [eos]` as two sequences, the loss on the second
(PREFIX.meta.json says so). The tokenizer is loaded as the stage loads data.tokenizer (with the R1 chat markers), so the ids match the model's. Tokenization runs batched in the
tokenizers library's thread pool (RAYON_NUM_THREADS sets its size).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from r1moe.data.indexed import IndexedMeta, IndexedWriter, token_dtype


def _records(paths: list[Path], kind: str, template: str | None) -> Iterator[tuple[str | None, str]]:
    """(prompt, body text) per input line; the prompt is raw (None for a pretraining text)."""
    from r1moe.data.schema import SFTSample, _from_dict, iter_json_lines

    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"--input {path}: not found")
        for where, obj in iter_json_lines(path):
            if kind == "sft":
                rec = _from_dict(SFTSample, obj, where)
                yield rec.prompt, rec.response
            elif isinstance(obj, dict) and isinstance(obj.get("text"), str):
                yield None, obj["text"]
            elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and isinstance(obj.get("response"), str):
                if template is None:
                    raise ValueError(f"{where}: a prompt + response record: --kind pretrain needs --template (the "
                                     f"pretrain stage's data.template) to render its prompt")
                yield obj["prompt"], obj["response"]
            else:
                raise ValueError(f"{where}: expected a JSON object with a string field 'text' or 'prompt' + "
                                 f"'response'")


def preprocess(inputs: list[Path], output_prefix: Path, tokenizer: Path, kind: str, template: str | None,
               batch_size: int = 1000) -> dict:
    """Write the prefix; returns counts (documents, tokens, seconds)."""
    from r1moe.data.prompts import render_prompt
    from r1moe.data.tokenizer import add_chat_markers, load_tokenizer, special_ids

    tok = add_chat_markers(load_tokenizer(tokenizer))
    ids = special_ids(tok)
    bos = [] if ids.bos is None else [ids.bos]
    vocab = max(tok.get_vocab().values()) + 1
    meta = IndexedMeta(loss="last_sequence" if kind == "sft" else "all", vocab_size=vocab, eos_id=ids.eos,
                       bos_id=ids.bos, template=template)
    t0 = time.perf_counter()
    num_docs = num_tokens = num_prompts = 0
    with IndexedWriter(output_prefix, token_dtype(vocab), meta) as writer:
        batch: list[tuple[str | None, str]] = []

        def flush() -> None:
            nonlocal num_docs, num_tokens, num_prompts
            num_prompts += sum(p is not None for p, _ in batch)
            bodies = tok.encode_batch([b for _, b in batch], add_special_tokens=False)
            prompts = tok.encode_batch(["" if p is None else render_prompt(template, p) for p, _ in batch],
                                       add_special_tokens=False)
            for p, b in zip(prompts, bodies):
                seqs = [bos + p.ids, b.ids + [ids.eos]] if kind == "sft" else [bos + p.ids + b.ids + [ids.eos]]
                writer.add_document(seqs)
                num_tokens += len(bos) + len(p.ids) + len(b.ids) + 1
            num_docs += len(batch)
            batch.clear()

        for rec in _records(inputs, kind, template):
            batch.append(rec)
            if len(batch) >= batch_size:
                flush()
        if batch:
            flush()
        if num_docs == 0:
            raise ValueError(f"{', '.join(map(str, inputs))}: no record (empty input)")
        if kind == "pretrain" and template is not None and num_prompts == 0:
            raise ValueError(f"--template {template} has no effect: {', '.join(map(str, inputs))} hold only text "
                             f"records (no prompt + response)")
    return {"documents": num_docs, "tokens": num_tokens, "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/preprocess_data.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", action="append", required=True, type=Path, help="JSONL file (repeatable)")
    p.add_argument("--output-prefix", required=True, type=Path, help="writes PREFIX.bin, PREFIX.idx, PREFIX.meta.json")
    p.add_argument("--tokenizer", required=True, type=Path, help="tokenizer.json or a checkpoint directory")
    p.add_argument("--kind", required=True, choices=["pretrain", "sft"])
    p.add_argument("--template", choices=["r1_zero", "chat", "none"], default=None,
                   help="the stage's data.template, rendering the prompts (sft; pretrain: of prompt + response "
                        "records); recorded in PREFIX.meta.json and checked by the stage")
    p.add_argument("--batch-size", type=int, default=1000, help="lines tokenized per batch")
    a = p.parse_args(argv)
    if a.kind == "sft" and a.template is None:
        p.error("--kind sft needs --template (the data.template the SFT stage will use)")
    if a.batch_size < 1:
        p.error(f"--batch-size {a.batch_size}: must be >= 1")
    try:
        stats = preprocess(a.input, a.output_prefix, a.tokenizer, a.kind, a.template, a.batch_size)
    except (ValueError, FileNotFoundError) as e:
        print(f"tools/preprocess_data.py: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"output_prefix": str(a.output_prefix), **stats}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

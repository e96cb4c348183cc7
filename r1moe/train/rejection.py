"""Rejection sampling + SFT data (DeepSeek-R1 stage 3: v1 §2.3.3, v2 B.3.3): sample N replies per reasoning prompt from
the stage-2 (reasoning RL) checkpoint, keep the correct and readable ones, deduplicate, mix with non-reasoning SFT
data (paper: ~600k reasoning + ~200k non-reasoning, v2 Table 5), and write the SFT set with provenance.

    r1moe rejection RECIPE [key=value ...] --out DIR    # RECIPE: a RejectionSpec (r1moe.stages) as YAML

or as a pipeline stage (`kind: rejection`, section `rejection:` = the same RejectionSpec):

    - {name: rejection, kind: rejection, rejection: {checkpoint: runs/tiny-r1/stage2/final,
       prompts: runs/tiny-r1/data/train.jsonl, general: runs/tiny-r1/data/general_sft.jsonl, samples_per_prompt: 4}}

Only reasoning prompts are sampled (kind math/code; general ones in `prompts` are skipped and counted). Filters,
applied in this fixed order; a sample is counted under the first that fires (`FILTERS`):
    incorrect        accuracy reward < 1 (rules: task verifier, math-verify, code sandbox; v2 B.3.3)
    malformed        format reward 0: not exactly <think>...</think><answer>...</answer>
    language_mixing  language consistency (v2 eq. 7) in `spec.language` < `min_language_consistency`
    long_paragraph   a chain-of-thought paragraph (between blank lines) of more than `max_paragraph_words` words
    code_block       more than `max_code_blocks` fenced code blocks in the chain of thought (default 0: any)
    overlong         finished by length, or more than `max_tokens` tokens (0 = max_new_tokens)
    repetition       a line or a sentence occurring more than `max_repeat` times
The first three readability filters are the paper's ("filtered out chain-of-thought with mixed languages, long
paragraphs, and code blocks", v1 §2.3.3); overlong and repetition are ours. Correctness comes first, so `incorrect` +
the six readability counts + `passed_filters` = all samples, and the samples the readability filters drop were all
correct.

At the paper's size (~600k kept of several samples per prompt) the samples are made in shards of
`shard_samples`: each finished shard is kept in `out_dir/shards/` (records + filter counts, atomic), so a run that
stops resumes where it was, and `num_workers` processes (one per node, say, each with its own engine) share the
shards through a common `out_dir` (`worker=i num_workers=n`); the process that finds every shard done merges them
(deduplication and the mix run over all shards; the counts are summed). Shards made with another spec are refused.

Outputs in `out_dir`: `sft.jsonl` (SFTSample records; the response is the generated text, which follows
`render(template, prompt)` verbatim; `meta` = provenance) and `stats.json` (the returned dict), both atomic. Nothing
surviving the filters is a ValueError naming the checkpoint and the counts, and no sft.jsonl is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

from r1moe.atomic import write_json_atomic
from r1moe.cli import spec_main
from r1moe.config import SGLangSection
from r1moe.data import PromptSample, SFTSample, read_prompts, read_sft, write_jsonl
from r1moe.data.prompts import encode_prompt
from r1moe.progress import progress_bar
from r1moe.rewards import accuracy_reward, chain_of_thought, format_reward, language_consistency_reward
from r1moe.rewards.rule import LANGUAGE_SCRIPTS, WORD
from r1moe.rollout import SamplingParams
from r1moe.rollout.loader import load_checkpoint_engine
from r1moe.stages import RejectionSpec
from r1moe.templates import REASONING_TAGS, TEMPLATES, completion_prefix

FILTERS = ("incorrect", "malformed", "language_mixing", "long_paragraph", "code_block", "overlong", "repetition")

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_HAS_WORD = re.compile(r"\w")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_FENCE = re.compile(r"^[ \t]*(```|~~~)", re.MULTILINE)


# ---------------------------------------------------------------------------------------------- filters
def full_completion(template: str, text: str) -> str:
    """What the rule rewards score: the prefix the template forced (chat: "<think>\\n") + the generated text."""
    return (completion_prefix(template) if template != "none" else "") + text


def max_repeats(text: str) -> int:
    """Occurrences of the most frequent line, or sentence, of `text` (tags removed, whitespace normalised). Units
    with no letter or digit (blank lines, a lone "}") are not counted."""
    for tag in REASONING_TAGS:
        text = text.replace(tag, "\n")
    lines = [" ".join(line.split()) for line in text.splitlines()]
    sentences = [s for line in lines for s in _SENTENCE_END.split(line)]
    best = 0
    for units in (lines, sentences):
        counts = Counter(u for u in units if _HAS_WORD.search(u))
        best = max(best, max(counts.values(), default=0))
    return best


def longest_paragraph(text: str) -> int:
    """Words (as the language reward counts them: a run of letters, or one CJK ideograph) in the longest paragraph
    of `text`; paragraphs are separated by blank lines."""
    return max((len(WORD.findall(p)) for p in _PARAGRAPH_BREAK.split(text)), default=0)


def count_code_blocks(text: str) -> int:
    """Fenced code blocks in `text` (``` or ~~~ at the start of a line opens one; an unclosed one counts)."""
    return -(-len(_FENCE.findall(text)) // 2)


def classify(completion_text: str, num_tokens: int, finish_reason: str, sample: PromptSample,
             spec: RejectionSpec) -> str | None:
    """None to keep the sample, else the first filter of `FILTERS` that rejects it. `completion_text` is the
    generated text (without the prefix the template forced; it is added here before scoring)."""
    full = full_completion(spec.template, completion_text)
    if accuracy_reward(full, sample) < 1.0:
        return "incorrect"
    if format_reward(full, sample) < 1.0:
        return "malformed"
    if language_consistency_reward(full, dataclasses.replace(sample, language=spec.language)) \
            < spec.min_language_consistency:
        return "language_mixing"
    cot = chain_of_thought(full)
    if longest_paragraph(cot) > spec.max_paragraph_words:
        return "long_paragraph"
    if count_code_blocks(cot) > spec.max_code_blocks:
        return "code_block"
    if finish_reason == "length" or num_tokens > (spec.max_tokens or spec.max_new_tokens):
        return "overlong"
    if max_repeats(full) > spec.max_repeat:
        return "repetition"
    return None


# ---------------------------------------------------------------------------------------------- dedup and mixing
def deduplicate(records: list[SFTSample]) -> tuple[list[SFTSample], int]:
    """First record of each (prompt, response), in order; and how many were dropped."""
    seen: set[tuple[str, str]] = set()
    out = []
    for r in records:
        if (r.prompt, r.response) not in seen:
            seen.add((r.prompt, r.response))
            out.append(r)
    return out, len(records) - len(out)


def mix_records(reasoning: list[SFTSample], general: list[SFTSample], reasoning_ratio: float, seed: int = 0
                ) -> tuple[list[SFTSample], dict[str, float]]:
    """All reasoning records + a seeded sample of general ones so that reasoning / total = `reasoning_ratio` (or as
    many general records as exist), shuffled. Returns (records, counts with the achieved ratio)."""
    if not 0 < reasoning_ratio <= 1:
        raise ValueError(f"reasoning_ratio={reasoning_ratio} must be in (0, 1]")
    target = round(len(reasoning) * (1 - reasoning_ratio) / reasoning_ratio)
    rng = random.Random(seed)
    picked = rng.sample(general, min(target, len(general)))
    mixed = reasoning + picked
    rng.shuffle(mixed)
    achieved = len(reasoning) / len(mixed) if mixed else 0.0
    return mixed, {"reasoning": len(reasoning), "general": len(picked), "general_target": target,
                   "general_available": len(general), "total": len(mixed), "achieved_ratio": achieved}


def read_general(path: str, template: str) -> list[SFTSample]:
    """Non-reasoning SFT records, tagged `meta.kind = "general"`; a record written for another template is an error
    (its response would not follow the prompt the SFT stage renders)."""
    out = []
    for n, r in enumerate(read_sft(path), 1):
        if r.meta.get("template", template) != template:
            raise ValueError(f"{path}: record {n} ({r.id or r.prompt[:40]!r}) has meta.template="
                             f"{r.meta['template']!r}, but rejection sampling uses template {template!r}")
        out.append(dataclasses.replace(r, meta={**r.meta, "template": template, "kind": "general",
                                                "source": r.meta.get("source", str(path))}))
    return out


# ---------------------------------------------------------------------------------------------- the stage
def check_spec(spec: RejectionSpec) -> None:
    """The spec's own checks (ValueError naming the key); reads no file, so a recipe can be checked before its
    inputs exist."""
    if not spec.checkpoint or not spec.prompts:
        raise ValueError("rejection: `checkpoint` and `prompts` are required")
    if spec.template not in (*TEMPLATES, "none"):
        raise ValueError(f"rejection.template={spec.template!r}: expected one of {[*sorted(TEMPLATES), 'none']}")
    if spec.language not in LANGUAGE_SCRIPTS:
        raise ValueError(f"rejection.language={spec.language!r}: expected one of {sorted(LANGUAGE_SCRIPTS)}")
    if spec.engine == "builtin" and spec.sglang != SGLangSection():
        raise ValueError("rejection.sglang is set with rejection.engine=builtin: it only applies with engine=sglang")
    for name in ("samples_per_prompt", "max_new_tokens", "max_repeat", "max_paragraph_words"):
        if getattr(spec, name) < 1:
            raise ValueError(f"rejection.{name}={getattr(spec, name)} must be >= 1")
    if spec.max_code_blocks < 0:
        raise ValueError(f"rejection.max_code_blocks={spec.max_code_blocks} must be >= 0")
    if not 0 < spec.reasoning_ratio <= 1:
        raise ValueError(f"rejection.reasoning_ratio={spec.reasoning_ratio} must be in (0, 1]")
    if not 0 <= spec.min_language_consistency <= 1 or spec.max_tokens < 0:
        raise ValueError(f"rejection: min_language_consistency={spec.min_language_consistency} must be in [0, 1] "
                         f"and max_tokens={spec.max_tokens} >= 0")
    if spec.chunk < 1:
        raise ValueError(f"rejection.chunk={spec.chunk} must be >= 1")
    if spec.shard_samples < spec.chunk or spec.shard_samples % spec.chunk:
        raise ValueError(f"rejection.shard_samples={spec.shard_samples} must be a positive multiple of chunk="
                         f"{spec.chunk}")
    if spec.num_workers < 1 or not 0 <= spec.worker < spec.num_workers:
        raise ValueError(f"rejection.worker={spec.worker} must be in 0..num_workers-1 (num_workers="
                         f"{spec.num_workers})")


GENERATION_KEYS = ("checkpoint", "prompts", "samples_per_prompt", "max_new_tokens", "template", "temperature", "top_p",
                   "max_tokens", "max_repeat", "language", "min_language_consistency", "max_paragraph_words",
                   "max_code_blocks", "stop", "seed", "chunk", "shard_samples")
"""The spec keys a shard's records depend on: finished shards are reused only when these are unchanged."""


def _shard_fingerprint(spec: RejectionSpec) -> dict:
    digest = hashlib.sha256(Path(spec.prompts).read_bytes()).hexdigest()
    return {**{k: getattr(spec, k) for k in GENERATION_KEYS}, "prompts_sha256": digest}


def _check_shard_dir(shards: Path, fingerprint: dict) -> None:
    """shards/spec.json records what the shards were made with; a different spec is refused, key by key."""


    path = shards / "spec.json"
    if path.is_file():
        old = json.loads(path.read_text())
        changed = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in fingerprint.items() if old.get(k) != v]
        if changed:
            raise ValueError(f"{shards}: finished shards were made with another rejection spec ({'; '.join(changed)});"
                             f" delete {shards} or use another output directory")
    else:
        shards.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, fingerprint)


def _sample_shard(engine, tok, spec: RejectionSpec, prompts: list[PromptSample], owners, first: int, last: int,
                  advance) -> tuple[list[SFTSample], dict[str, int]]:
    """Samples first..last-1 of the run (chunk seeds by global chunk index: the same records however the run is
    sharded or resumed)."""
    rejected = dict.fromkeys(FILTERS, 0)
    kept: list[SFTSample] = []
    for start in range(first, last, spec.chunk):
        part = owners[start:min(start + spec.chunk, last)]
        ids = [encode_prompt(tok, spec.template, prompts[i].prompt) for i, _ in part]
        params = SamplingParams(temperature=spec.temperature, top_p=spec.top_p, max_new_tokens=spec.max_new_tokens,
                                stop=list(spec.stop), seed=spec.seed + start // spec.chunk)
        for (i, j), g in zip(part, engine.generate(ids, params)):
            s = prompts[i]
            reason = classify(g.text, len(g.token_ids), g.finish_reason, s, spec)
            if reason is not None:
                rejected[reason] += 1
                continue
            language = language_consistency_reward(full_completion(spec.template, g.text),
                                                   dataclasses.replace(s, language=spec.language))
            kept.append(SFTSample(
                prompt=s.prompt, response=g.text, id=f"{s.id or i}-rs{j}", kind=s.kind, language=s.language,
                meta={"template": spec.template, "kind": "reasoning", "source": "rejection_sampling",
                      "checkpoint": spec.checkpoint, "prompt_index": i, "sample_index": j, "task": s.task,
                      "num_tokens": len(g.token_ids),
                      "reward": {"accuracy": 1.0, "format": 1.0, "language": language}}))
        advance(f"rejection sampling: kept {len(kept)} of samples {first}..{min(start + spec.chunk, last)}")
    return kept, rejected


def run_rejection_sampling(spec: RejectionSpec, out_dir: Path) -> dict:
    """Sample (shard by shard, resumable; this worker's shards), filter, and once every shard is done deduplicate,
    mix, write out_dir/sft.jsonl and out_dir/stats.json; return the stats. A worker that finishes before the others
    returns {"complete": False, ...} and writes no sft.jsonl."""


    check_spec(spec)
    if not (Path(spec.checkpoint) / "config.json").is_file():
        raise FileNotFoundError(f"rejection.checkpoint={spec.checkpoint}: no config.json there (missing or "
                                f"incomplete checkpoint; did the reasoning-RL stage finish?)")
    prompts = read_prompts(spec.prompts)
    # Reasoning prompts only (v1 §2.3.3); non-reasoning data come from `spec.general`, not from this policy.
    skipped = sum(s.kind == "general" for s in prompts)
    prompts = [s for s in prompts if s.kind != "general"]
    if not prompts:
        raise ValueError(f"rejection.prompts={spec.prompts}: no reasoning prompts (all {skipped} are kind general)")
    general = read_general(spec.general, spec.template) if spec.general else []
    out_dir = Path(out_dir)
    shards = out_dir / "shards"
    _check_shard_dir(shards, _shard_fingerprint(spec))
    N = spec.samples_per_prompt
    owners = [(i, j) for i in range(len(prompts)) for j in range(N)]
    num_shards = -(-len(owners) // spec.shard_samples)
    mine = [k for k in range(num_shards) if k % spec.num_workers == spec.worker
            and not (shards / f"shard_{k:05d}.json").is_file()]
    engine = tok = None
    with progress_bar("rejection sampling", len(mine) * -(-spec.shard_samples // spec.chunk)) as advance:
        for k in mine:
            if engine is None:
                engine, tok = load_checkpoint_engine(spec.checkpoint, spec.engine, spec.sglang, seed=spec.seed)
            first, last = k * spec.shard_samples, min((k + 1) * spec.shard_samples, len(owners))
            kept, rejected = _sample_shard(engine, tok, spec, prompts, owners, first, last, advance)
            write_jsonl(shards / f"shard_{k:05d}.jsonl", kept)
            # the counts file is written last: it marks the shard done
            write_json_atomic(shards / f"shard_{k:05d}.json", {"samples": last - first, "rejected": rejected,
                                                               "passed_filters": len(kept)})
    if engine is not None:
        engine.shutdown()
    waiting = [k for k in range(num_shards) if not (shards / f"shard_{k:05d}.json").is_file()]
    if waiting:
        print(f"rejection: worker {spec.worker}/{spec.num_workers} done; {len(waiting)} of {num_shards} shards are "
              f"still to be made by other workers: run any worker again to merge once they are", flush=True)
        return {"complete": False, "shards": num_shards, "shards_waiting": len(waiting)}
    rejected, kept, samples = dict.fromkeys(FILTERS, 0), [], 0
    for k in range(num_shards):
        counts = json.loads((shards / f"shard_{k:05d}.json").read_text())
        samples += counts["samples"]
        for name, n in counts["rejected"].items():
            rejected[name] += n
        if counts["passed_filters"]:
            kept += read_sft(shards / f"shard_{k:05d}.jsonl")
    if not kept:
        raise ValueError(f"rejection sampling from {spec.checkpoint}: no sample survived the filters "
                         f"({samples} samples; rejected {rejected})")
    reasoning, duplicates = deduplicate(kept)
    general, general_duplicates = deduplicate(general)
    mixed, mix = mix_records(reasoning, general, spec.reasoning_ratio, seed=spec.seed)
    stats = {"checkpoint": spec.checkpoint, "prompts": len(prompts), "general_prompts_skipped": skipped,
             "samples": samples, "shards": num_shards, "rejected": rejected,
             "passed_filters": len(kept), "duplicates": duplicates, "kept": len(reasoning),
             "general_duplicates": general_duplicates, **mix, "reasoning_ratio": spec.reasoning_ratio,
             "sft": str(out_dir / "sft.jsonl")}
    write_jsonl(out_dir / "sft.jsonl", mixed)
    write_json_atomic(out_dir / "stats.json", stats)
    return stats


def main(argv: list[str] | None = None) -> int:
    return spec_main("rejection", RejectionSpec, run_rejection_sampling, argv)


if __name__ == "__main__":
    sys.exit(main())

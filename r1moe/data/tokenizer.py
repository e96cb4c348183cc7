"""Tiny byte-level BPE tokenizer, saved as `tokenizer.json` so a checkpoint dir is a self-contained HF directory.

Design (GPT-2-style byte-level BPE trained with HF `tokenizers`):
- ids 0, 1, 2 are the special `<pad>`, `<bos>`, `<eos>`; there is no post-processor: callers prepend `<bos>` and
  append `<eos>` themselves (`special_ids`), the same way for the tiny and a real tokenizer.
- all 256 bytes are in the base alphabet, so `decode(encode(s)) == s` for every string, not only for our data;
- digits are split one per token (`Digits(individual_digits=True)` before the byte-level split), so the model sees
  `1 2 3` and arithmetic stays learnable;
- `<think>`, `</think>`, `<answer>`, `</answer>` and the chat markers `<｜User｜>`, `<｜Assistant｜>` are single added
  tokens, not special: `decode` keeps them in the text (the reward functions need them);
- the template texts are always added to the training corpus (`TEMPLATE_WEIGHT` times), so their words merge and the
  R1-Zero prompt is about 100 tokens rather than ~480 bytes.

The vocabulary is at most `vocab_size`: 3 special + 256 bytes + merges + 6 added tokens.

Real tokenizers (distillation students, R1 §2.4): `load_tokenizer` takes the special tokens a checkpoint's
tokenizer_config.json names, `add_chat_markers` makes the chat markers single special tokens (Qwen2.5 and
Llama-3 split them), and `build_tokenizer_config` writes the R1 chat template into every saved
tokenizer_config.json, so `apply_chat_template` in transformers reproduces the training prompt.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from r1moe.atomic import write_text_atomic
from r1moe.templates import CHAT_TAGS, REASONING_TAGS, TEMPLATES, THINK_PREFIX, render

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, BOS, EOS)
ADDED_TOKENS = REASONING_TAGS + CHAT_TAGS
TEMPLATE_WEIGHT = 200
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])


def default_corpus(num_per_task: int = 300, seed: int = 0) -> list[str]:
    """Texts that look like the tiny pipeline's data: rendered prompts, worked solutions in the reply format."""
    from r1moe.data.cold_start import make_cold_start
    from r1moe.data.general import make_general
    from r1moe.data.tasks import TASKS, make_dataset

    samples = [s for name in TASKS for s in make_dataset(name, num_per_task, seed)]
    samples += make_general(num_per_task, seed)
    texts = []
    for i, name in enumerate(sorted(TEMPLATES)):
        texts += [render(name, x.prompt) + x.response for x in make_cold_start(samples[i::len(TEMPLATES)], name)]
    return texts


def build_tiny_tokenizer(corpus_texts: Iterable[str], vocab_size: int = 512) -> Tokenizer:
    """Train the tiny byte-level BPE on `corpus_texts` plus the templates (see module docstring)."""
    num_fixed = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet()) + len(ADDED_TOKENS)
    if vocab_size < num_fixed:
        raise ValueError(f"vocab_size must be >= {num_fixed} (specials + 256 bytes + added tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(ADDED_TOKENS),
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def texts() -> Iterable[str]:
        # The added tokens are cut out before training: BPE merges should go to words, not to tag fragments.
        templates = [t.replace("{prompt}", "") for t in TEMPLATES.values()]
        for text in [*corpus_texts, *templates * TEMPLATE_WEIGHT]:
            for tag in ADDED_TOKENS:
                text = text.replace(tag, " ")
            yield text

    tok.train_from_iterator(texts(), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False, single_word=False) for t in ADDED_TOKENS])
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != [0, 1, 2]:
        raise RuntimeError(f"special tokens got ids {ids}, expected [0, 1, 2]")
    if tok.get_vocab_size() > vocab_size:
        raise RuntimeError(f"vocabulary has {tok.get_vocab_size()} tokens, more than vocab_size={vocab_size}")
    return tok


CHAT_TEMPLATE_JINJA = (
    # DeepSeek-R1's shape: BOS (when the tokenizer has one), a system prompt as plain text, user turns after
    # <｜User｜>, assistant turns after <｜Assistant｜> closed by EOS, and "<think>\n" to start a reply: with
    # add_generation_prompt it renders exactly what training and rollouts feed the model (encode_prompt, "chat").
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}" + CHAT_TAGS[0] + "{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}" + CHAT_TAGS[1] + "{{ m['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + CHAT_TAGS[1] + THINK_PREFIX + "{% endif %}"
)


def build_tokenizer_config(tok: Tokenizer, ids: SpecialIds | None = None) -> dict:
    """`tokenizer_config.json` for `tok`: its special tokens (`ids`, default `special_ids(tok)`) and, when it holds
    the R1 chat markers as tokens, the chat template, so `AutoTokenizer.from_pretrained(dir).apply_chat_template`
    works on a saved checkpoint."""
    ids = special_ids(tok) if ids is None else ids
    config: dict = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for key, token_id in (("bos_token", ids.bos), ("eos_token", ids.eos), ("pad_token", ids.pad)):
        if token_id is not None:
            config[key] = tok.id_to_token(token_id)
    config.update({"add_bos_token": False, "add_eos_token": False, "model_max_length": 1 << 20,
                   "clean_up_tokenization_spaces": False})
    if all(tok.token_to_id(t) is not None for t in CHAT_TAGS):
        config["chat_template"] = CHAT_TEMPLATE_JINJA
    return config


def save_tokenizer(tok: Tokenizer, directory: str | os.PathLike) -> Path:
    """Write `tokenizer.json` and a `tokenizer_config.json` (so `AutoTokenizer.from_pretrained(dir)` works)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_text_atomic(directory / TOKENIZER_FILE, tok.to_str(pretty=True))
    config = build_tokenizer_config(tok)
    write_text_atomic(directory / CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return directory / TOKENIZER_FILE


RESERVED = re.compile(r"<\|reserved_special_token_\d+\|>")
"""Llama-3's unused special tokens: slots for new markers that need no new embedding rows."""


def add_chat_markers(tok: Tokenizer) -> Tokenizer:
    """A tokenizer holding the R1 chat markers (<｜User｜>, <｜Assistant｜>) as single special tokens, so the chat
    template tokenizes as DeepSeek's distilled models do. `tok` itself when it already does (the tiny tokenizer, a
    DeepSeek one); else a copy in which the first unused reserved special tokens (Llama-3's
    `<|reserved_special_token_N|>`) become the markers (no new ids); else a copy with the markers added after its
    vocabulary (Qwen2.5's embeddings have spare rows for them; a model without them grows, see
    r1moe.train.common.apply_vocab_size). The special token roles read from the checkpoint carry over."""
    missing = [m for m in CHAT_TAGS if tok.token_to_id(m) is None]
    if not missing:
        return tok
    data = json.loads(tok.to_str())
    ids = special_ids(tok)
    reserved = [a for a in data["added_tokens"] if RESERVED.fullmatch(a["content"]) and a["id"] not in ids]
    if len(reserved) >= len(missing):
        for entry, marker in zip(reserved, missing):
            entry["content"] = marker
        new = Tokenizer.from_str(json.dumps(data))
    else:
        new = Tokenizer.from_str(tok.to_str())
        new.add_special_tokens([AddedToken(m, special=True, normalized=False) for m in missing])
    setattr(new, _ROLES, ids)
    return new


def _resolve(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / TOKENIZER_FILE if path.is_dir() else path


def load_tokenizer(dir_or_file: str | os.PathLike) -> Tokenizer:
    """Load `tokenizer.json` from a checkpoint directory or a file path. When a `tokenizer_config.json` sits next
    to it, the special tokens it names (EOS, pad, BOS) are the ones `special_ids(tok)` returns from then on: a
    checkpoint's own choice, e.g. Llama-3.3-Instruct's EOS `<|eot_id|>`, not a guess from well-known strings."""
    path = _resolve(dir_or_file)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no tokenizer file (expected a {TOKENIZER_FILE} or a directory holding one)")
    tok = Tokenizer.from_file(str(path))
    if (path.parent / CONFIG_FILE).is_file():
        setattr(tok, _ROLES, special_ids(tok, path.parent))
    return tok


class SpecialIds(NamedTuple):
    pad: int
    bos: int | None
    eos: int


_FALLBACK = {
    "bos": (BOS, "<｜begin▁of▁sentence｜>", "<s>", "<|begin_of_text|>", "<|startoftext|>"),
    "eos": (EOS, "<｜end▁of▁sentence｜>", "</s>", "<|endoftext|>", "<|end_of_text|>", "<|im_end|>"),
    "pad": (PAD, "<｜▁pad▁｜>", "<|finetune_right_pad_id|>"),
}


def _config_token(config: dict, key: str) -> str | None:
    value = config.get(key)
    return value.get("content") if isinstance(value, dict) else value


_ROLES = "r1moe_special_ids"
"""Attribute under which load_tokenizer keeps the roles a checkpoint's tokenizer_config.json names."""


def special_ids(tok: Tokenizer, config_dir: str | os.PathLike | None = None) -> SpecialIds:
    """(pad, bos, eos) ids. Tiny tokenizer: `<pad>`, `<bos>`, `<eos>`. A real HF tokenizer: the tokens named in
    `tokenizer_config.json` of `config_dir` (the dir or tokenizer.json path it was loaded from) when given, or of
    the checkpoint `load_tokenizer` read it from, else well-known strings. bos may be None (some models have
    none; `"bos_token": null` in the config says so); a missing pad falls back to eos."""
    if config_dir is None and isinstance(recorded := tok.__dict__.get(_ROLES), SpecialIds):
        return recorded
    config: dict = {}
    if config_dir is not None:
        cfg_path = Path(config_dir)
        cfg_path = (cfg_path if cfg_path.is_dir() else cfg_path.parent) / CONFIG_FILE
        if cfg_path.is_file():
            config = json.loads(cfg_path.read_text(encoding="utf-8"))

    def find(role: str) -> int | None:
        if role == "bos" and "bos_token" in config and config["bos_token"] is None:
            return None  # the checkpoint says it has no BOS (Qwen2.5), whatever its vocabulary holds
        for name in (_config_token(config, f"{role}_token"), *_FALLBACK[role]):
            if name is not None and tok.token_to_id(name) is not None:
                return tok.token_to_id(name)
        return None

    eos = find("eos")
    if eos is None:
        raise ValueError(f"no eos token found (tried tokenizer_config.json eos_token and {_FALLBACK['eos']})")
    pad = find("pad")
    return SpecialIds(pad=eos if pad is None else pad, bos=find("bos"), eos=eos)

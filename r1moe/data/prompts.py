"""Prompt encoding: how every stage turns (template, prompt) into the token ids a sequence starts with, so
rollouts, evaluation, rejection sampling and the reward model condition the model on what it was trained on."""

from __future__ import annotations

from tokenizers import Tokenizer

from r1moe.data.tokenizer import special_ids


def encode(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def bos_prefix(tok: Tokenizer) -> list[int]:
    """[bos], or [] for tokenizers without one (Qwen2): what every training and generation sequence starts with."""
    bos = special_ids(tok)[1]
    return [] if bos is None else [bos]


def encode_prompt(tok: Tokenizer, template: str, prompt: str) -> list[int]:
    """BOS + the rendered prompt: exactly how training sequences start (pretrain/SFT prepend BOS), so rollouts,
    evaluation, rejection sampling and the reward model condition the model on what it was trained on."""
    return bos_prefix(tok) + encode(tok, render_prompt(template, prompt))


def render_prompt(template: str, prompt: str) -> str:
    if template == "none":
        return prompt
    from r1moe.templates import render

    return render(template, prompt)

"""Templates: R1-Zero verbatim (DeepSeek-R1 Table 1), the R1 chat strings, render/unknown names."""

import pytest

from r1moe.templates import (
    R1_ZERO_TEMPLATE,
    TEMPLATES,
    completion_prefix,
    format_completion,
    render,
    render_chat,
    render_r1_zero,
    reply_after,
)

TABLE_1 = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
    "assistant first thinks about the reasoning process in the mind and then provides the user with the answer. The "
    "reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, "
    "i.e., <think> reasoning process here </think> <answer> answer here </answer>. User: {prompt}. Assistant:"
)


def test_r1_zero_is_table_1_verbatim():
    assert R1_ZERO_TEMPLATE == TABLE_1
    assert render_r1_zero("Compute 1 + 1").endswith("User: Compute 1 + 1. Assistant:")


def test_chat_uses_r1_tokenizer_strings():
    assert render_chat("hi", think_prefix=False) == "<\uff5cUser\uff5c>hi<\uff5cAssistant\uff5c>"
    assert render_chat("hi") == "<\uff5cUser\uff5c>hi<\uff5cAssistant\uff5c><think>\n"
    assert render("chat", "hi") == render_chat("hi")


def test_braces_in_prompt_survive():
    assert "\\boxed{}" in render("r1_zero", "put it in \\boxed{}")
    assert "{x}" in render("chat", "{x}")


def test_unknown_template_lists_names():
    with pytest.raises(ValueError, match="chat, r1_zero"):
        render("llama", "hi")
    assert set(TEMPLATES) == {"r1_zero", "chat"}


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_reply_after_strips_forced_prefix(name):
    full = format_completion("1 + 1 = 2.", "2")
    assert completion_prefix(name) + reply_after(name, full) == full
    assert render(name, "q").endswith(completion_prefix(name))

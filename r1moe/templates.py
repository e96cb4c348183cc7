"""Prompt templates: the R1-Zero template (DeepSeek-R1 v2 Table 1, verbatim) and the DeepSeek-R1 chat template.

`render(name, prompt)` is what rollout, SFT and eval call. A template is plain text with one `{prompt}` slot,
filled with `str.replace` (never `str.format`: prompts contain braces, e.g. `\\boxed{}`).

The chat template uses the real DeepSeek-R1 tokenizer strings (fullwidth bar U+FF5C, U+2581 `▁`). Following the R1
README "Usage Recommendations", `render_chat(prompt)` forces the reply to start with "<think>\\n"; the completion then
lacks the opening tag, so a caller that scores it prepends `completion_prefix(name)` first (the format reward wants
the whole `<think>...</think><answer>...</answer>` text).

No BOS string is put in a rendered prompt: the token id is prepended by the caller (see `r1moe.data.tokenizer
.special_ids`), so one template serves the tiny tokenizer (`<bos>`) and a real R1 tokenizer alike.
"""

from __future__ import annotations

from collections.abc import Callable

# DeepSeek-R1 v2 Table 1 / v1 Table 1, verbatim; `{prompt}` is the question.
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
    "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
    "User: {prompt}. Assistant:"
)

# DeepSeek-R1 tokenizer strings (tokenizer_config.json of deepseek-ai/DeepSeek-R1).
USER_TAG = "<｜User｜>"
ASSISTANT_TAG = "<｜Assistant｜>"
R1_BOS = "<｜begin▁of▁sentence｜>"
R1_EOS = "<｜end▁of▁sentence｜>"
CHAT_TEMPLATE = USER_TAG + "{prompt}" + ASSISTANT_TAG
THINK_PREFIX = "<think>\n"

# Reasoning/answer tags: single tokens in the tiny tokenizer, checked by the format reward.
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
REASONING_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
CHAT_TAGS = (USER_TAG, ASSISTANT_TAG)


def _fill(template: str, prompt: str) -> str:
    return template.replace("{prompt}", prompt)


def render_r1_zero(prompt: str) -> str:
    """The R1-Zero prompt; the completion follows "Assistant:"."""
    return _fill(R1_ZERO_TEMPLATE, prompt)


def render_chat(prompt: str, think_prefix: bool = True) -> str:
    """`<｜User｜>{prompt}<｜Assistant｜>`, plus "<think>\\n" when the reply is forced to open with it."""
    return _fill(CHAT_TEMPLATE, prompt) + (THINK_PREFIX if think_prefix else "")


TEMPLATES: dict[str, str] = {"r1_zero": R1_ZERO_TEMPLATE, "chat": CHAT_TEMPLATE}
_RENDERERS: dict[str, Callable[[str], str]] = {"r1_zero": render_r1_zero, "chat": render_chat}
# Text the template forces at the start of the reply (already in the rendered prompt, absent from the completion).
_COMPLETION_PREFIX: dict[str, str] = {"r1_zero": "", "chat": THINK_PREFIX}


def format_completion(reasoning: str, answer: str) -> str:
    """The reply shape the format reward accepts: `<think>\\n...\\n</think>\\n<answer>...</answer>`."""
    return f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"


def _check(name: str) -> None:
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; known templates: {', '.join(sorted(TEMPLATES))}")


def render(name: str, prompt: str) -> str:
    """Render `prompt` with the template called `name` ("r1_zero" or "chat")."""
    _check(name)
    return _RENDERERS[name](prompt)


def completion_prefix(name: str) -> str:
    """What `render(name, ...)` already put at the start of the reply; prepend it to a completion before scoring."""
    _check(name)
    return _COMPLETION_PREFIX[name]


def reply_after(name: str, completion: str) -> str:
    """The part of a full completion that follows `render(name, ...)`: drops the prefix the template forced."""
    prefix = completion_prefix(name)
    if not completion.startswith(prefix):
        raise ValueError(f"template {name!r} forces the reply to start with {prefix!r}; got {completion[:20]!r}")
    return completion[len(prefix):]

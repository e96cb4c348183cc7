"""Rule-based rewards of DeepSeek-R1: accuracy, format, language consistency; one registry, one batch function.

Every reward is a pure function `(completion, sample) -> float` registered in `REWARD_FUNCS` (open-r1's
`REWARD_FUNCS_REGISTRY` style). `completion` is the generated text after the rendered prompt; with a template that
forces a prefix (chat: "<think>\\n") prepend `r1moe.templates.completion_prefix(name)` first.

- accuracy (R1 v2 §2.1 / eq. 4 "rule-based accuracy reward"): procedural task -> that task's verifier; other math ->
  math-verify on the answer; code -> 1 iff every statement of `sample.tests` passes against the code, judged
  outside the code's process (`sandbox.run_tests`); general -> exact match after
  whitespace normalisation (open-ended general prompts get the reward model in a later stage, passed as `extra`).
- format: exactly `<think>...</think>` then `<answer>...</answer>`, only whitespace around (empty content allowed).
- language (v2 §3.2.1 eq. 7): Num(words in the target language) / Num(words) in the chain of thought.

`compute_rewards` scores a batch with weights, keeping each component for logging. Costs: math-verify takes a few
milliseconds per call (sympy), a code sample two sandboxed Python start-ups in parallel (`sandbox.py`).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from r1moe.data.schema import PromptSample
from r1moe.data.tasks import TASKS
from r1moe.rewards.sandbox import SandboxLimits, run_tests
from r1moe.templates import ANSWER_CLOSE, ANSWER_OPEN, REASONING_TAGS, THINK_CLOSE, THINK_OPEN

RewardFunc = Callable[[str, PromptSample], float]

# ---------------------------------------------------------------- answer extraction

_ANSWER = re.compile(re.escape(ANSWER_OPEN) + r"(.*?)" + re.escape(ANSWER_CLOSE), re.DOTALL)
_CODE = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL)
MAX_ANSWER_CHARS = 2000


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (balanced braces); None if there is none or it is cut off."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = start + len("\\boxed")
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j].strip()
    return None


def extract_answer(completion: str) -> str | None:
    """Content of the last `<answer>...</answer>` (stripped), else of the last `\\boxed{...}`, else None.

    Shared by the rewards and evaluation (cons@k majority votes over it)."""
    found = _ANSWER.findall(completion)
    if found:
        return found[-1].strip()
    return last_boxed(completion)


def extract_code(completion: str) -> str | None:
    """The last fenced ```python block of the answer (or of the whole completion), else the answer text."""
    answer = extract_answer(completion)
    for text in (answer, completion):
        if text:
            blocks = _CODE.findall(text)
            if blocks:
                return blocks[-1]
    return answer or None


# ---------------------------------------------------------------- accuracy


def _math_verify_equal(pred: str, gold: str) -> bool:
    from math_verify import parse, verify

    # math-verify times out with signal.alarm, which only works in the main thread; elsewhere it runs unbounded,
    # which the MAX_ANSWER_CHARS cap keeps cheap.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None

    def parse_any(text: str) -> list:
        for candidate in (text, f"${text}$"):
            parsed = parse(candidate, parsing_timeout=timeout)
            if parsed:
                return parsed
        return []

    gold_parsed = parse_any(gold)
    if not gold_parsed:
        return _normalise(pred) == _normalise(gold)
    pred_parsed = parse_any(pred)
    return bool(pred_parsed) and verify(gold_parsed, pred_parsed, timeout_seconds=timeout)


def _normalise(text: str) -> str:
    text = " ".join(text.split())
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    return text.rstrip(".").strip()


CODE_LIMITS = SandboxLimits()


def accuracy_reward(completion: str, sample: PromptSample) -> float:
    """1.0 if the completion's final answer is right for `sample`, else 0.0 (dispatch in the module docstring)."""
    if sample.kind == "code":
        if sample.tests is None:
            raise ValueError(f"code sample {sample.id!r} has no tests to run")
        code = extract_code(completion)
        if code is None:
            return 0.0
        # Not the exit status of code + tests as one program (sys.exit(0) would win): the judge runs the tests.
        try:
            return float(run_tests(code, sample.tests, CODE_LIMITS).ok)
        except ValueError as e:
            raise ValueError(f"code sample {sample.id!r}: {e}") from None
    answer = extract_answer(completion)
    if sample.kind == "general" and answer is None:
        # Non-reasoning replies may skip the tags: judge what follows the reasoning.
        answer = completion.rsplit(THINK_CLOSE, 1)[-1]
    if answer is None or len(answer) > MAX_ANSWER_CHARS:
        return 0.0
    if sample.task in TASKS:
        return float(TASKS[sample.task].verify(answer, sample))
    if sample.kind == "math":
        return float(_math_verify_equal(answer, sample.answer))
    return float(_normalise(answer) == _normalise(sample.answer))


# ---------------------------------------------------------------- format

_FREE = r"(?:(?!</?think>|</?answer>).)*"
_FORMAT = re.compile(rf"\A\s*<think>{_FREE}</think>\s*<answer>{_FREE}</answer>\s*\Z", re.DOTALL)


def format_reward(completion: str, sample: PromptSample) -> float:
    """1.0 iff the completion is one `<think>...</think>` then one `<answer>...</answer>` (whitespace around only)."""
    return float(_FORMAT.match(completion) is not None)


# ---------------------------------------------------------------- language consistency

_CJK_RANGES = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef"
# A CJK ideograph is one word; any other run of letters is one word. Digits, "_" and symbols are no words.
_WORD = re.compile(rf"[{_CJK_RANGES}]|[^\W\d_{_CJK_RANGES}]+")
_CJK = re.compile(rf"[{_CJK_RANGES}]")
LANGUAGE_SCRIPTS = {"en": "latin", "fr": "latin", "de": "latin", "es": "latin", "it": "latin", "pt": "latin",
                    "nl": "latin", "zh": "cjk"}


def _script(word: str) -> str:
    if _CJK.fullmatch(word):
        return "cjk"
    # Basic Latin, Latin-1 Supplement, Latin Extended-A/B (accented letters of Latin-script languages).
    return "latin" if all(ord(c) < 0x250 for c in word) else "other"


def chain_of_thought(completion: str) -> str:
    """The `<think>` content (all blocks; an unclosed one runs to the end); the whole completion if none."""
    if THINK_OPEN in completion:
        parts = completion.split(THINK_OPEN)[1:]
        text = " ".join(p.split(THINK_CLOSE, 1)[0] for p in parts)
    elif THINK_CLOSE in completion:
        text = completion.split(THINK_CLOSE, 1)[0]  # the template opened the block (chat "<think>\n" prefix)
    else:
        text = completion
    for tag in REASONING_TAGS:
        text = text.replace(tag, " ")
    return text


def language_consistency_reward(completion: str, sample: PromptSample) -> float:
    """Share of the chain of thought's words in `sample.language` (R1 v2 eq. 7); 1.0 when it has no words."""
    if sample.language not in LANGUAGE_SCRIPTS:
        raise ValueError(f"language_consistency_reward: unsupported language {sample.language!r}; "
                         f"supported: {', '.join(sorted(LANGUAGE_SCRIPTS))}")
    words = _WORD.findall(chain_of_thought(completion))
    if not words:
        return 1.0
    target = LANGUAGE_SCRIPTS[sample.language]
    return sum(_script(w) == target for w in words) / len(words)


# ---------------------------------------------------------------- registry and batch scoring

REWARD_FUNCS: dict[str, RewardFunc] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "language": language_consistency_reward,
}


@dataclass
class RewardBatch:
    total: list[float]
    """Weighted sum per completion."""
    components: dict[str, list[float]]
    """Unweighted value of each reward named in the weights, per completion (logged separately)."""


def compute_rewards(
    completions: Sequence[str],
    samples: Sequence[PromptSample],
    weights: dict[str, float],
    extra: dict[str, RewardFunc] | None = None,
) -> RewardBatch:
    """Score `completions[i]` against `samples[i]` with every reward in `weights`; `extra` adds callables (e.g. a
    neural reward model) for this call only."""
    if len(completions) != len(samples):
        raise ValueError(f"compute_rewards: {len(completions)} completions but {len(samples)} samples")
    extra = extra or {}
    shadowed = sorted(set(extra) & set(REWARD_FUNCS))
    if shadowed:
        raise ValueError(f"extra reward {shadowed[0]!r} has the name of a built-in reward; rename it")
    funcs = {**REWARD_FUNCS, **extra}
    for name in weights:
        if name not in funcs:
            raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(funcs))}")
    components = {name: [float(funcs[name](c, s)) for c, s in zip(completions, samples)] for name in weights}
    total = [sum(weights[name] * components[name][i] for name in weights) for i in range(len(completions))]
    return RewardBatch(total=total, components=components)

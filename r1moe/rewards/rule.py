"""Rule-based rewards of DeepSeek-R1: accuracy, format, language consistency; one registry, one batch function.

Every reward is a pure function `(completion, sample) -> float` registered in `REWARD_FUNCS` (open-r1's
`REWARD_FUNCS_REGISTRY` style). `completion` is the generated text after the rendered prompt; with a template that
forces a prefix (chat: "<think>\\n") prepend `r1moe.templates.completion_prefix(name)` first.

- accuracy (R1 v2 §2.1 / eq. 4 "rule-based accuracy reward"): procedural task -> that task's verifier; other math ->
  math-verify on the answer; code -> 1 iff every statement of `sample.tests` passes against the code, judged
  outside the code's process (`sandbox.run_tests`); general -> exact match after
  whitespace normalisation (open-ended general prompts get the reward model in a later stage, passed as `extra`).
- format: exactly `<think>...</think>` then `<answer>...</answer>`, only whitespace around (empty content allowed).
- length (not R1's; a shaping term): the completion's length in thousands of characters.
- language (v2 §3.2.1 eq. 7): Num(words in the target language) / Num(words) in the chain of thought. A word's
  language: CJK ideographs by script (exact); Latin-script words by wordfreq's word frequencies in 27 Latin-script
  languages (a French chain of thought under target "en" scores ~0, not 1); words of no known language (variables,
  LaTeX commands, names) are not counted (`word_language_vote`).

`compute_rewards` scores a batch with weights, keeping each component for logging. Costs: math-verify takes a few
milliseconds per call (sympy), a code sample two sandboxed Python start-ups in parallel (`sandbox.py`).
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from r1moe.data.schema import PromptSample
from r1moe.data.tasks import TASKS
from r1moe.rewards.sandbox import SandboxLimits, run_tests
from r1moe.templates import ANSWER_CLOSE, ANSWER_OPEN, REASONING_TAGS, THINK_CLOSE, THINK_OPEN

RewardFunc = Callable[[str, PromptSample], float]


@runtime_checkable
class BatchReward(Protocol):
    """A reward that is cheaper scored many at once (a neural reward model: one forward per batch of completions):
    compute_rewards calls `score_batch` once with all completions instead of the reward once per completion."""

    def score_batch(self, completions: Sequence[str], samples: Sequence[PromptSample]) -> list[float]: ...

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


# Delimiters math-verify's LaTeX extraction anchors on; an answer without any is wrapped in \\boxed{} (its README:
# "wrap bare answers in $...$ or \\boxed{}"), so it is read as one expression, never as its leading number.
_DELIMITED = re.compile(r"\\boxed|\\fbox|\$|\\\(|\\\[")


def _braces_balanced(text: str) -> bool:
    depth = 0
    for brace in re.findall(r"(?<!\\)[{}]", text):  # \\{ and \\} are set braces, not groups
        depth += 1 if brace == "{" else -1
        if depth < 0:
            return False
    return depth == 0


def _math_verify_timeout() -> int | None:
    # math-verify times out with signal.alarm, which only works in the main thread; elsewhere it runs unbounded,
    # which the MAX_ANSWER_CHARS cap keeps cheap.
    return 5 if threading.current_thread() is threading.main_thread() else None


@functools.lru_cache(maxsize=8192)
def parse_math_answer(text: str) -> tuple:
    """math-verify's reading of a final answer (the content of <answer> or of the last \\boxed{}): a tuple of sympy
    objects (empty: unreadable). Used on both sides, gold and prediction, so the two are read alike.

    - With its own delimiters (`$...$`, `\\(...\\)`, `\\boxed{}`) the text is parsed as written: prose around
      them is ignored ("the answer is $5$"), several of them are one set ("$5$ or $6$" is {5, 6}).
    - Otherwise the whole text is one expression, wrapped in `\\boxed{}`: `5\\sqrt{3}` is 5*sqrt(3), never 5;
      `-1, 4` and `5 or 6` are the sets {-1, 4} and {5, 6}; prose ("the answer is 5") reads as a product of
      letters and matches no number.
    - Before parsing: `**` becomes `^` (Python powers), an escaped dollar `\\$` (currency) and a final full stop
      are dropped. Units (`10 \\text{ cm}`), degrees (`30^\\circ`) and `\\%` are math-verify's: units and
      degree signs are dropped, `50\\%` matches both 50 and 0.5.
    """
    text = text.strip().replace("**", "^").replace("\\$", "")
    text = text[:-1].rstrip() if text.endswith(".") else text
    if not text:
        return ()
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    if not _braces_balanced(text):  # "5} 6" would close the wrapping box early and read as 5
        return ()
    candidate = text if _DELIMITED.search(text) else f"\\boxed{{{text}}}"
    return tuple(parse(candidate, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                       fallback_mode="no_fallback", parsing_timeout=_math_verify_timeout()))


def math_answers_equal(pred: str, gold: str) -> bool:
    """The math equivalence of the accuracy reward: math-verify's `verify(gold, pred)` on both parsed with
    `parse_math_answer`; a gold that does not parse is compared as a string (whitespace, quotes, final full stop
    normalised), and so is a pair that parses to nothing on the gold side."""
    from math_verify import verify

    gold_parsed = parse_math_answer(gold)
    if not gold_parsed:
        return _normalise(pred) == _normalise(gold)
    pred_parsed = parse_math_answer(pred)
    return bool(pred_parsed) and verify(list(gold_parsed), list(pred_parsed), timeout_seconds=_math_verify_timeout())


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
        return float(math_answers_equal(answer, sample.answer))
    return float(_normalise(answer) == _normalise(sample.answer))


def same_answer(a: str, b: str, sample: PromptSample) -> bool:
    """Whether two final answers to `sample` are the same answer under the accuracy reward's equivalence (cons@k votes
    over these classes): math -> `math_answers_equal` (b is read as the gold), and for a procedural task the task's
    verifier must also give both the same verdict, so a class never mixes right and wrong answers (countdown: 22 and
    7 + 3 * 5 have one value, but only the expression is a solution); other kinds -> normalised text."""
    if sample.kind != "math":
        return _normalise(a) == _normalise(b)
    if sample.task in TASKS and TASKS[sample.task].verify(a, sample) != TASKS[sample.task].verify(b, sample):
        return False
    return math_answers_equal(a, b)


# ---------------------------------------------------------------- format

_FREE = r"(?:(?!</?think>|</?answer>).)*"
_FORMAT = re.compile(rf"\A\s*<think>{_FREE}</think>\s*<answer>{_FREE}</answer>\s*\Z", re.DOTALL)


def format_reward(completion: str, sample: PromptSample) -> float:
    """1.0 iff the completion is one `<think>...</think>` then one `<answer>...</answer>` (whitespace around only)."""
    return float(_FORMAT.match(completion) is not None)


# ---------------------------------------------------------------- length

LENGTH_UNIT_CHARS = 1000


def length_reward(completion: str, sample: PromptSample) -> float:
    """The completion's length in thousands of characters. Not one of R1's rewards: a shaping term. A negative weight
    is a per-sample length penalty (the simplest form of Kimi k1.5's, §2.3.3), a positive one pays for longer
    replies. Any two completions of different lengths score differently, so a group of them always has a nonzero
    advantage: the reward a smoke run can rely on to move the policy."""
    return len(completion) / LENGTH_UNIT_CHARS


# ---------------------------------------------------------------- language consistency

_CJK_RANGES = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef"
# A CJK ideograph is one word; any other run of letters is one word. Digits, "_" and symbols are no words.
WORD = re.compile(rf"[{_CJK_RANGES}]|[^\W\d_{_CJK_RANGES}]+")
_CJK = re.compile(rf"[{_CJK_RANGES}]")
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")  # \frac, \sqrt, \cdot: markup, not words of any language
LANGUAGE_SCRIPTS = {"en": "latin", "fr": "latin", "de": "latin", "es": "latin", "it": "latin", "pt": "latin",
                    "nl": "latin", "zh": "cjk"}
"""Target languages the reward supports, with their script."""
LATIN_WORDLISTS = ("en", "fr", "de", "es", "it", "pt", "nl", "ca", "ro", "pl", "cs", "sk", "sl", "sh", "hu", "fi",
                   "sv", "da", "nb", "is", "lt", "lv", "tr", "id", "ms", "fil", "vi")
"""The Latin-script languages wordfreq has word lists for: a Latin-script word is weighed against all of them, so a
Polish or Turkish chain of thought is caught under target "en" as well as a French one."""
SHARED_WORD_MARGIN = 1.0
"""A word counts for the target language when its Zipf frequency there is within this of its highest frequency in
any Latin-script language (1.0 = a factor of 10): words shared by two languages ("question", "table" in English and
French; "also" in English and German) count for both."""


def _script(word: str) -> str:
    if _CJK.fullmatch(word):
        return "cjk"
    # Basic Latin, Latin-1 Supplement, Latin Extended-A/B (accented letters of Latin-script languages).
    return "latin" if all(ord(c) < 0x250 for c in word) else "other"


@functools.lru_cache(maxsize=65536)
def _latin_frequencies(word: str) -> dict[str, float]:
    from wordfreq import zipf_frequency

    # The "small" lists (words down to Zipf ~3) load in ~0.5 s for all languages, and carry less cross-language
    # noise than the large ones ("nous" is in the large English list).
    return {lang: zipf_frequency(word, lang, wordlist="small") for lang in LATIN_WORDLISTS}


def word_language_vote(word: str, language: str) -> bool | None:
    """Whether `word` is a word of `language` (True/False), or None when it carries no language signal.

    - CJK ideograph: exact by script (a word of "zh" and of no Latin-script language).
    - Latin-script word of two letters or more: wordfreq's frequency in `language` is > 0 and within
      SHARED_WORD_MARGIN of its frequency in the Latin-script language where it is most frequent. A word no Latin
      list knows (a variable name, a LaTeX command, a proper name, a typo) and a single letter (x, y, a) are None.
    - Any other script (Cyrillic, Arabic, kana, ...): a word of none of the supported languages.
    """
    script = _script(word)
    target = LANGUAGE_SCRIPTS[language]
    if script == "cjk" or script == "other":
        return script == target
    if len(word) < 2:
        return None
    freqs = _latin_frequencies(word.lower())
    best = max(freqs.values())
    if best == 0.0:
        return None
    if target != "latin":
        return False
    return freqs[language] > 0.0 and freqs[language] >= best - SHARED_WORD_MARGIN


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
    """Share of the chain of thought's words that are words of `sample.language` (R1 v2 eq. 7), over the words that
    carry a language signal (`word_language_vote`); 1.0 when none does. LaTeX commands are markup, not words, and a
    non-CJK word the prompt itself contains is the question's material, not a choice of language (a pseudo-word to
    reverse, a quoted foreign term): neither is counted."""
    if sample.language not in LANGUAGE_SCRIPTS:
        raise ValueError(f"language_consistency_reward: unsupported language {sample.language!r}; "
                         f"supported: {', '.join(sorted(LANGUAGE_SCRIPTS))}")
    # CJK ideographs are single characters, too common to mark a quotation: they always count.
    quoted = {w.lower() for w in WORD.findall(sample.prompt) if not _CJK.fullmatch(w)}
    cot = _LATEX_COMMAND.sub(" ", chain_of_thought(completion))
    votes = [word_language_vote(w, sample.language) for w in WORD.findall(cot) if w.lower() not in quoted]
    votes = [v for v in votes if v is not None]
    if not votes:
        return 1.0
    return sum(votes) / len(votes)


# ---------------------------------------------------------------- registry and batch scoring

REWARD_FUNCS: dict[str, RewardFunc] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "language": language_consistency_reward,
    "length": length_reward,
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
    neural reward model) for this call only. A BatchReward scores the whole batch in one call."""
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
    components = {name: ([float(x) for x in funcs[name].score_batch(completions, samples)]
                         if isinstance(funcs[name], BatchReward)
                         else [float(funcs[name](c, s)) for c, s in zip(completions, samples)]) for name in weights}
    total = [sum(weights[name] * components[name][i] for name in weights) for i in range(len(completions))]
    return RewardBatch(total=total, components=components)

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


def after_reasoning(completion: str) -> str:
    """What follows the reasoning: the text after the last `</think>`; the whole completion when the reasoning never
    closes (an answer in an unclosed `<think>` still counts: such a reply is correct but malformed, which the format
    reward judges) or there is none."""
    return completion.rsplit(THINK_CLOSE, 1)[1] if THINK_CLOSE in completion else completion


def _last_answer_tag(text: str) -> str | None:
    # The last non-overlapping <answer>...</answer> in linear time; a non-greedy regex rescans to the end from every
    # unclosed <answer> (quadratic: a degenerate reply of 20k "<answer>" tokens took 20 s).
    found, pos = None, 0
    while (start := text.find(ANSWER_OPEN, pos)) >= 0:
        end = text.find(ANSWER_CLOSE, start + len(ANSWER_OPEN))
        if end < 0:
            break
        found, pos = text[start + len(ANSWER_OPEN):end], end + len(ANSWER_CLOSE)
    return found


def extract_answer(completion: str) -> str | None:
    """Content of the last `<answer>...</answer>` (stripped), else of the last `\\boxed{...}`, else None; only in
    what follows the reasoning (`after_reasoning`): a box or answer tag inside a closed `<think>` block is a step of
    the reasoning, not the final answer ("<think>... \\boxed{2}</think> The answer is 3." has not answered 2).

    Shared by the rewards and evaluation (cons@k majority votes over it)."""
    completion = after_reasoning(completion)
    found = _last_answer_tag(completion)
    if found is not None:
        return found.strip()
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


_SUPERSCRIPTS = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁻", "0123456789-")
_VULGAR = {"½": r"\frac{1}{2}", "⅓": r"\frac{1}{3}", "⅔": r"\frac{2}{3}", "¼": r"\frac{1}{4}", "¾": r"\frac{3}{4}"}
_UNICODE_MATH: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = [
    (re.compile("[⁰¹²³⁴⁵⁶⁷⁸⁹⁻]+"), lambda m: "^{" + m.group().translate(_SUPERSCRIPTS) + "}"),  # x² -> x^{2}
    (re.compile(r"√\s*(\d+(?:\.\d+)?|[A-Za-z]|\(([^()]*)\))"), lambda m: rf"\sqrt{{{m.group(2) or m.group(1)}}}"),
    (re.compile("√"), lambda m: r"\sqrt"),  # √{3}
    (re.compile("[½⅓⅔¼¾]"), lambda m: _VULGAR[m.group()]),
    (re.compile(r"°\s*([CF](?![A-Za-z]))?"),  # 30°, 30°C
     lambda m: r"^{\circ}" + (rf"\text{{{m.group(1)}}}" if m.group(1) else "")),
    (re.compile("∞"), lambda m: r"\infty "),
    (re.compile("·"), lambda m: r"\cdot "),
]
# A digit group separator other than a comma between groups of three digits: `12\,345` (LaTeX/SI thin space),
# `12 345`, `1~000`. math-verify reads `12\,345` as 12 + 345 and `1\,000` as 1 * 0.
_THOUSANDS = re.compile(r"(?<![\d.])\d{1,3}(?:(?:\\[,;: ]|\\thinspace ?|~|[ \u00a0\u2009\u202f])\d{3})+(?!\d)")


def _normalise_math_text(text: str) -> str:
    """Unicode math math-verify does not read: other scripts' digits (`５`, `٥`), superscripts, `√`, `°`, `∞`, `·`,
    vulgar fractions; then digit groups separated by thin spaces or spaces are joined."""
    if not text.isascii():
        text = "".join(str(int(c)) if c.isdecimal() and not c.isascii() else c for c in text)
        for pattern, repl in _UNICODE_MATH:
            text = pattern.sub(repl, text)
    return _THOUSANDS.sub(lambda m: re.sub(r"\D", "", m.group()), text)


def _math_verify_timeout() -> int | None:
    # math-verify times out with signal.alarm, which only works in the main thread; elsewhere it runs unbounded (the
    # MAX_ANSWER_CHARS cap does not bound `100000000!`), so math is graded in the main thread: evaluate.py runs only
    # the sandboxed code grading in threads.
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
      are dropped; Unicode math is spelled in LaTeX (`30°`, `x²`, `√2`, `５`) and digit groups split by thin spaces
      are joined (`12\\,345`, `1 000`: 12345 and 1000, not 12 + 345 and 1 * 0). Units (`10 \\text{ cm}`), degrees
      (`30^\\circ`) and `\\%` are math-verify's: units and degree signs are dropped, `50\\%` matches both 50 and 0.5.
    """
    text = _normalise_math_text(text.strip().replace("**", "^").replace("\\$", ""))
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
AMBIGUOUS_WORD_MARGIN = 2.0
"""A word whose frequency in the target language (its large word list where the small one lacks it) is within this
of its highest frequency, but not within SHARED_WORD_MARGIN, carries no language signal: a word of both, far more
frequent in the other ("ten" in English and Polish, "per" in English and Italian, "primes" and "parabola", which
only the large English list knows). Function words of another language stay far off ("est", "la", "die" under
English: 2.4 and more)."""
MATH_OPERATOR_NAMES = frozenset((
    "sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh", "log", "ln", "lg",
    "exp", "mod", "pmod", "bmod", "gcd", "lcm", "det", "max", "min", "sup", "inf", "lim", "arg", "deg", "dim", "ker"))
"""LaTeX's operator names written as plain words ("sin x", "5 mod 7"): notation, not words of a language (as their
`\\sin` spelling is), whatever another language's word list says of "sin" (Spanish) or "mod" (Danish)."""


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


@functools.lru_cache(maxsize=65536)
def _target_frequency(word: str, language: str) -> float:
    # The large list of the target only (in a language's own large list, another's words are noise: "nous" is in
    # the large English one, which is why a word needs more than being there to count: AMBIGUOUS_WORD_MARGIN).
    from wordfreq import zipf_frequency

    try:
        return zipf_frequency(word, language, wordlist="large")
    except LookupError:  # no large list for this language
        return zipf_frequency(word, language, wordlist="small")


def word_language_vote(word: str, language: str) -> bool | None:
    """Whether `word` is a word of `language` (True/False), or None when it carries no language signal.

    - CJK ideograph: exact by script (a word of "zh" and of no Latin-script language).
    - Latin-script word of two letters or more: True when wordfreq's frequency in `language` is > 0 and within
      SHARED_WORD_MARGIN of its frequency in the Latin-script language where it is most frequent; None when within
      AMBIGUOUS_WORD_MARGIN (a word of both); else False. A word no Latin list knows (a variable name, a LaTeX
      command, a proper name, a typo), a single letter (x, y, a) and an operator name (sin, mod: MATH_OPERATOR_NAMES)
      are None.
    - Any other script (Cyrillic, Arabic, kana, ...): a word of none of the supported languages.
    """
    script = _script(word)
    target = LANGUAGE_SCRIPTS[language]
    if script == "cjk" or script == "other":
        return script == target
    word = word.lower()
    if len(word) < 2 or word in MATH_OPERATOR_NAMES:
        return None
    freqs = _latin_frequencies(word)
    best = max(freqs.values())
    if best == 0.0:
        return None
    if target != "latin":
        return False
    if freqs[language] > 0.0 and freqs[language] >= best - SHARED_WORD_MARGIN:
        return True
    ours = max(freqs[language], _target_frequency(word, language))
    return None if ours > 0.0 and ours >= best - AMBIGUOUS_WORD_MARGIN else False


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

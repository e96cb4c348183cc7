"""Procedural non-reasoning ("general") data and Bradley-Terry preference pairs for the later R1 stages.

DeepSeek-R1 mixes ~200k non-reasoning samples into rejection-sampling SFT (v2 Table 5) and trains a helpful reward
model on 66k preference pairs for all-scenario RL (v2 §3.1). At tiny scale both come from three string tasks on
pseudo-words built from consonant-vowel syllables (no word list to download):

    "Reverse the word tobaku"   -> "ukabot"
    "Write tobaku in upper case" -> "TOBAKU"
    "Repeat tobaku twice"        -> "tobaku tobaku"

Answers are exact (the accuracy reward compares them after whitespace normalisation). A preference pair's `chosen` is
the correct, well-formed, concise completion; `rejected` is a wrong answer, a malformed reply, or a rambling one.
Prompts come from the seed's split, as for the math tasks (`r1moe.data.splits`).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator

from r1moe.data.schema import PreferencePair, PromptSample
from r1moe.data.splits import draw_unique, problem_key, stable_hash
from r1moe.templates import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN, completion_prefix, format_completion

CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"


def random_word(rng: random.Random) -> str:
    """A pronounceable pseudo-word of 2-3 consonant-vowel syllables (never a palindrome: starts with a consonant,
    ends with a vowel)."""
    return "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(rng.randint(2, 3)))


class GeneralTask:
    """A string task: the prompt is `template` with `{word}`; `solve` gives the exact answer."""

    def __init__(self, name: str, template: str):
        self.name = name
        self.template = template
        self._pattern = re.compile("^" + re.escape(template).replace(re.escape("{word}"), r"([a-z]+)") + "$")

    def solve(self, word: str) -> str:
        raise NotImplementedError

    def wrong_answers(self, word: str) -> list[str]:
        raise NotImplementedError

    def reasoning(self, word: str) -> str:
        raise NotImplementedError

    def word_of(self, sample: PromptSample) -> str:
        m = self._pattern.match(sample.prompt)
        if not m:
            raise ValueError(f"not a {self.name} prompt: {sample.prompt!r}")
        return m.group(1)

    def generate(self, rng: random.Random) -> PromptSample:
        word = random_word(rng)
        prompt = self.template.replace("{word}", word)
        return PromptSample(prompt=prompt, answer=self.solve(word), kind="general", task=self.name,
                            id=f"{self.name}-{stable_hash(problem_key(self.name, prompt)):016x}")

    def worked_solution(self, sample: PromptSample) -> str:
        return self.reasoning(self.word_of(sample))


class ReverseWord(GeneralTask):
    def solve(self, word: str) -> str:
        return word[::-1]

    def wrong_answers(self, word: str) -> list[str]:
        rev = word[::-1]
        return [word, rev[:-1], rev[1] + rev[0] + rev[2:]]

    def reasoning(self, word: str) -> str:
        return (f"The letters of {word} are {' '.join(word)}.\nIn reverse order they are {' '.join(word[::-1])}.\n"
                f"So the answer is {word[::-1]}.")


class UpperCase(GeneralTask):
    def solve(self, word: str) -> str:
        return word.upper()

    def wrong_answers(self, word: str) -> list[str]:
        return [word, word.capitalize(), word[:-1].upper() + word[-1]]

    def reasoning(self, word: str) -> str:
        return f"Each letter of {word} becomes a capital letter.\nSo the answer is {word.upper()}."


class RepeatTwice(GeneralTask):
    def solve(self, word: str) -> str:
        return f"{word} {word}"

    def wrong_answers(self, word: str) -> list[str]:
        return [word, f"{word} {word} {word}", f"{word}{word}"]

    def reasoning(self, word: str) -> str:
        return f"Write {word}, then write it once more.\nSo the answer is {word} {word}."


GENERAL_TASKS: dict[str, GeneralTask] = {
    t.name: t
    for t in (
        ReverseWord("reverse_word", "Reverse the word {word}"),
        UpperCase("upper_case", "Write {word} in upper case"),
        RepeatTwice("repeat_twice", "Repeat {word} twice"),
    )
}


def _generate_general(rng: random.Random) -> PromptSample:
    return GENERAL_TASKS[rng.choice(sorted(GENERAL_TASKS))].generate(rng)


def iter_general(n: int, seed: int) -> Iterator[PromptSample]:
    return draw_unique(n, seed, _generate_general, lambda s: problem_key(s.task or "", s.prompt), what="general")


def make_general(n: int, seed: int) -> list[PromptSample]:
    """`n` distinct general prompts (kind="general", exact answers) from split `seed % NUM_SPLITS`."""
    return list(iter_general(n, seed))


# ---------------------------------------------------------------- preference pairs

_FILLER = (
    "Let me think about this carefully.",
    "Hmm, I should double check the question first.",
    "Wait, let me read the question again.",
    "This is an interesting question and there are many ways to look at it.",
    "I want to be really sure before I answer.",
)


def _rejected(rng: random.Random, task: GeneralTask, word: str) -> str:
    answer, reasoning = task.solve(word), task.reasoning(word)
    style = rng.choice(("wrong", "malformed", "rambling"))
    if style == "wrong":
        wrong = rng.choice([w for w in task.wrong_answers(word) if w != answer])
        return format_completion(reasoning.replace(answer, wrong), wrong)
    if style == "malformed":
        return rng.choice((
            answer,
            f"{ANSWER_OPEN}{answer}{ANSWER_CLOSE}\n{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}",
            f"{THINK_OPEN}\n{reasoning}\n{ANSWER_OPEN}{answer}{ANSWER_CLOSE}",
            f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\nThe answer is {answer}.",
        ))
    # Right answer, but buried in filler: the reward model should learn to prefer the concise reply.
    filler = " ".join(rng.choice(_FILLER) for _ in range(rng.randint(4, 8)))
    return format_completion(f"{filler}\n{reasoning}\n{filler}\n{reasoning}", answer)


def _as_reply(template: str, completion: str) -> str:
    """A completion as it follows `render(template, ...)` (chat already opened the think block)."""
    prefix = completion_prefix(template)
    return completion.removeprefix(prefix)


def iter_preference_pairs(n: int, seed: int, template: str = "r1_zero") -> Iterator[PreferencePair]:
    completion_prefix(template)  # unknown template -> ValueError before any work
    rng = random.Random(f"r1moe-pairs-{seed}")
    for sample in iter_general(n, seed):
        task = GENERAL_TASKS[sample.task or ""]
        word = task.word_of(sample)
        chosen = format_completion(task.reasoning(word), sample.answer)
        yield PreferencePair(prompt=sample.prompt, chosen=_as_reply(template, chosen),
                             rejected=_as_reply(template, _rejected(rng, task, word)), id=f"pair-{sample.id}")


def make_preference_pairs(n: int, seed: int, template: str = "r1_zero") -> list[PreferencePair]:
    """`n` pairs over distinct general prompts of split `seed % NUM_SPLITS`: raw prompts, replies shaped for
    `template` (the reward-model loop renders the prompt with the same template)."""
    return list(iter_preference_pairs(n, seed, template))

"""Pointwise safety data for the safety reward model (DeepSeek-R1 v2 §3.1: prompts whose responses are labelled safe
or unsafe, judged on the whole response, reasoning included), in miniature and synthetic.

Each general prompt (r1moe/data/general.py) gets one response, safe or unsafe with equal odds. The unsafe kind holds
a harm the final answer does not show: its reasoning discloses a made-up credential ("the admin password is
7312-4480") before giving the same correct answer. A reward model that reads only the summary (the helpful RM)
cannot tell the two apart; the safety RM reads the whole response and can. Nothing here is real harmful content.

    r1moe data make safety --n 600 --seed 5 --template chat --out runs/tiny-r1/data/safety.jsonl
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from r1moe.data.general import GENERAL_TASKS, iter_general
from r1moe.data.schema import SafetySample
from r1moe.templates import completion_prefix, format_completion, reply_after

_LEAKS = (
    "By the way, the admin password is {code}.",
    "I will also share the private key {code} from the server.",
    "Here is someone's home address code {code}, in case it helps.",
)


def iter_safety(n: int, seed: int, template: str = "r1_zero") -> Iterator[SafetySample]:
    """`n` labelled responses over distinct general prompts of split `seed`: about half unsafe."""
    completion_prefix(template)  # unknown template -> ValueError before any work
    rng = random.Random(f"r1moe-safety-{seed}")
    for sample in iter_general(n, seed):
        task = GENERAL_TASKS[sample.task or ""]
        word = task.word_of(sample)
        reasoning = task.reasoning(word)
        safe = rng.random() < 0.5
        if not safe:
            leak = rng.choice(_LEAKS).format(code=f"{rng.randint(1000, 9999)}-{rng.randint(1000, 9999)}")
            lines = reasoning.split("\n")
            lines.insert(rng.randint(0, len(lines) - 1), leak)
            reasoning = "\n".join(lines)
        yield SafetySample(prompt=sample.prompt, response=reply_after(template, format_completion(reasoning, sample.answer)),
                           safe=safe, id=f"safety-{sample.id}")


def make_safety(n: int, seed: int, template: str = "r1_zero") -> list[SafetySample]:
    return list(iter_safety(n, seed, template))

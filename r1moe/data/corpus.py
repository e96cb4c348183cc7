"""A pretraining corpus for tiny base models: task problems with worked solutions, in the template's shape or not.

A base model pretrained on web text has seen many worked solutions, not all correct, and only sometimes in the
`<think>`/`<answer>` shape. This corpus reproduces that in miniature so R1-Zero has something to incentivise:
- `untagged_rate`: solutions with no tags. The base model then follows the template's reply format only part of the
  time, and the accuracy reward counts an answer only inside `<answer>` — the lever the tiny R1-Zero recipe uses.
- `slip_rate`: solutions with an arithmetic slip in their last step (the final answer off by a small amount, in the
  reasoning and the answer alike). Measured on `digits`: 35% slips cap what the base model learns of each fact and
  leave GRPO nothing it can raise in a 10-minute run, so the tiny recipes use 0.
- `direct_rate`: answers stated without working ("The answer is 12."), correct, as much web text has.
- `drill_rate`: records of bare arithmetic facts, one per line.
- `french_rate`: each line of a solution (arithmetic tasks) is written in French with this probability, so the base
  model's chains of thought mix languages, as R1-Zero's did (R1 §2.3.2); the language-consistency reward then has
  something to fix (English prompts, target language "en").
The base model then "sometimes solves the task" in the expected format, as DeepSeek-V3-Base does for AIME.

    (pipeline data spec)  {what: corpus, task: digits, n: 40000, seeds: [2, 3, 4, 5, 6, 7], untagged_rate: 0.6}
"""

from __future__ import annotations

import random
import re

from r1moe.data.cold_start import worked_solution
from r1moe.data.tasks import iter_dataset
from r1moe.templates import format_completion

NUMERIC = re.compile(r"^-?\d+$")
FACT = re.compile(r"(?<![\d.])(\d+) ([-+*/]) (\d+) = (-?\d+)")
"""One arithmetic step of a worked solution, e.g. "12 * 3 = 36"."""


def _slip(solution: str, answer: str, rng: random.Random) -> tuple[str, str]:
    """Replace the last two whole-number occurrences of the answer (the last step's result and the closing
    "So the answer is ...") by a nearby wrong number."""
    wrong = str(int(answer) + rng.choice([-3, -2, -1, 1, 2, 3, 10, -10]))
    spans = [m.span() for m in re.finditer(rf"(?<![\d-]){re.escape(answer)}(?!\d)", solution)][-2:]
    for a, b in reversed(spans):
        solution = solution[:a] + wrong + solution[b:]
    return solution, wrong


def problem_pool(task: str, seeds: list[int], difficulty: int = 1, limit: int = 1_000_000) -> list:
    """All distinct problems of the given splits (each split is drawn until exhausted or `limit` is reached)."""
    pool = []
    for seed in seeds:
        try:
            for sample in iter_dataset(task, limit, seed, difficulty):
                pool.append(sample)  # noqa: PERF402 -- a loop: what the split gave before running out stays
        except ValueError:  # the split ran out of new problems: everything it had is in the pool
            pass
    return pool


def step_facts(samples) -> list[str]:
    """The distinct arithmetic steps ("a op b = c") of the problems' correct worked solutions."""
    return sorted({m.group(0) for s in samples for m in FACT.finditer(worked_solution(s))})


def direct_answer(answer: str) -> str:
    """The reasoning of a record that answers without working."""
    return f"The answer is {answer}."


FRENCH = (  # the English phrases of the arithmetic tasks' solutions (tasks.py, `direct_answer`) -> French
    (re.compile(r"^We need to compute "), "Il faut calculer "),
    (re.compile(r"^Parentheses first, then \* and / before \+ and -\.$"),
     "D'abord les parenthèses, puis * et / avant + et -."),
    (re.compile(r"^First, "), "D'abord, "),
    (re.compile(r"^Then "), "Ensuite "),
    (re.compile(r"^So the answer is "), "Donc la réponse est "),
    (re.compile(r"^The answer is "), "La réponse est "),
)
FRENCH_TASKS = ("arithmetic", "digits")


def mix_languages(solution: str, rate: float, rng: random.Random) -> str:
    """Each line of an arithmetic solution in French with probability `rate` (numbers and symbols unchanged)."""
    lines = []
    for line in solution.split("\n"):
        if rng.random() < rate:
            for pattern, french in FRENCH:
                line = pattern.sub(french, line)
        lines.append(line)
    return "\n".join(lines)


def make_corpus(task: str, n: int, seeds: list[int], slip_rate: float = 0.3, untagged_rate: float = 0.1,
                difficulty: int = 1, template_rate: float = 0.3, drill_rate: float = 0.0,
                facts_per_drill: int = 8, direct_rate: float = 0.0,
                french_rate: float = 0.0) -> list[dict[str, str]]:
    """`n` records over the problems of the splits `seeds` (use splits disjoint from the RL and eval seeds).
    Problems repeat when n exceeds the pool, each time with fresh noise, as web text would.

    A fraction `template_rate` are {"prompt", "response"} records (the trainer renders the prompt with the R1-Zero
    template); the rest are short dialogues {"text": "User: {prompt}. Assistant:{response}"} — the template's
    own closing shape without its preamble, so most of the compute goes to the problems, not the boilerplate.

    A fraction `drill_rate` are drills: `facts_per_drill` correct arithmetic steps, one per line, drawn from the
    steps of the pool's worked solutions (the arithmetic tables of web text). They teach the facts the solutions
    use at a fraction of a solution's length; slips occur only in solutions.

    A fraction `direct_rate` of the solutions are replaced by `direct_answer` (a slipped one keeps its wrong
    answer).

    Each line of a solution is in French with probability `french_rate` (`mix_languages`; arithmetic tasks only)."""
    for name, rate in (("slip_rate", slip_rate), ("untagged_rate", untagged_rate), ("template_rate", template_rate),
                       ("drill_rate", drill_rate), ("direct_rate", direct_rate), ("french_rate", french_rate)):
        if not 0 <= rate <= 1:
            raise ValueError(f"{name}={rate} must be in [0, 1]")
    if french_rate and task not in FRENCH_TASKS:
        raise ValueError(f"french_rate applies to the tasks {', '.join(FRENCH_TASKS)}, not {task!r}")
    pool = problem_pool(task, seeds, difficulty, limit=min(n, 1500))
    if not pool:
        raise ValueError(f"task {task!r}: splits {seeds} hold no problems")
    rng = random.Random(f"corpus-{task}-{seeds}")
    facts = step_facts(pool) if drill_rate > 0 else []
    out = []
    for i in range(n):
        if facts and rng.random() < drill_rate:
            out.append({"text": "\n".join(rng.choice(facts) for _ in range(facts_per_drill))})
            continue
        if i % len(pool) == 0:
            rng.shuffle(pool)
        s = pool[i % len(pool)]
        sol, ans = worked_solution(s), s.answer
        if NUMERIC.match(ans) and rng.random() < slip_rate:
            sol, ans = _slip(sol, ans, rng)
        if rng.random() < direct_rate:
            sol = direct_answer(ans)
        if french_rate:
            sol = mix_languages(sol, french_rate, rng)
        response = sol if rng.random() < untagged_rate else format_completion(sol, ans)
        if rng.random() < template_rate:
            out.append({"prompt": s.prompt, "response": response})
        else:
            # no space after "Assistant:": the same token boundary as a rendered prompt followed by its reply
            out.append({"text": f"User: {s.prompt}. Assistant:{response}"})
    return out

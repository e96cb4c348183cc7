"""Evaluation metrics of DeepSeek-R1 (v1 §3, v2 Supplementary D.1): pass@k, cons@k, and a per-benchmark summary.

- pass@1 = (1/k) sum_i p_i over the k samples of each question, averaged over questions (the paper's
  definition; sampled at T=0.6, top-p 0.95, never greedy).
- pass@k: the unbiased estimator of Chen et al. 2021 (arXiv 2107.03374, "Evaluating Large Language Models
  Trained on Code", eq. 1): 1 - C(n-c, k) / C(n, k) for n samples of which c are correct.
- cons@k: majority vote over the k final answers, then graded (cons@64 on AIME in R1; cons@16 in Fig. 2).

How cons@k votes (`majority_vote`):
- Over equivalence classes, not strings: `\\boxed{5}`, `5` and `5.0` are one vote of three. The equivalence is the
  accuracy reward's (`r1moe.rewards.same_answer`: math-verify for math), passed in as `same_answer(a, b)`; without
  one, answers are compared as whitespace-normalised text (right only for exact-match tasks).
- Classes are built in a canonical order (distinct answers sorted by length, then text; each joins the first class
  whose representative it equals), so they do not depend on the order the samples came in.
- A tie between classes goes to the class whose representative comes first in that order (the shortest answer,
  then the alphabetically first): the same multiset of answers always gets the same winner, whatever the order of
  sampling. The winner is graded through its representative.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, kw_only=True)
class SampleResult:
    """One graded sample of one question."""

    correct: bool
    formatted: bool  # the response follows the required format (e.g. <think>...</think> then an answer)
    length_tokens: int  # response length in tokens
    answer: str | None = None  # the extracted final answer (None: nothing could be extracted)
    language_consistency: float | None = None  # R1 v2 eq. 7 in [0, 1]; None when not measured


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) is correct.

    Product form 1 - prod_{i=n-c+1}^{n} (1 - k/i) (= 1 - C(n-c, k)/C(n, k)) avoids the huge binomials.
    """
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    if k == 1:
        return c / n  # what the product telescopes to, without its rounding
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


SameAnswer = Callable[[str, str], bool]
"""Equivalence of two final answers to one question (e.g. `functools.partial(r1moe.rewards.same_answer,
sample=q)`)."""


def _normalise(answer: str | None) -> str | None:
    if answer is None:
        return None
    normalised = " ".join(answer.split())
    return normalised or None


def _text_equal(a: str, b: str) -> bool:
    return a == b


def answer_classes(answers: Sequence[str | None], same_answer: SameAnswer | None = None) -> list[tuple[str, int]]:
    """(representative, votes) of each equivalence class of the answers, in canonical order (module docstring).
    None and empty answers do not vote. Equal strings are one class without calling `same_answer`."""
    counts = Counter(a for a in map(_normalise, answers) if a is not None)
    same = same_answer or _text_equal
    classes: list[list] = []  # [representative, votes]
    for answer in sorted(counts, key=lambda a: (len(a), a)):
        home = next((c for c in classes if same(answer, c[0])), None)
        if home is None:
            classes.append([answer, counts[answer]])
        else:
            home[1] += counts[answer]
    return [(rep, votes) for rep, votes in classes]


def majority_vote(answers: Sequence[str | None], same_answer: SameAnswer | None = None) -> str | None:
    """Representative of the equivalence class with the most votes; ties -> the class first in canonical order
    (module docstring); None when nobody voted."""
    classes = answer_classes(answers, same_answer)
    if not classes:
        return None
    best = max(votes for _, votes in classes)
    return next(rep for rep, votes in classes if votes == best)


def cons_at_k(answers: Sequence[str | None], gold: Any, is_correct: Callable[[str, Any], bool],
              same_answer: SameAnswer | None = None) -> float:
    """1.0 if the majority answer is correct according to `is_correct(answer, gold)`, else 0.0."""
    winner = majority_vote(answers, same_answer)
    return float(winner is not None and bool(is_correct(winner, gold)))


def _cons_from_samples(samples: Sequence[SampleResult], same_answer: SameAnswer | None) -> float:
    """cons@k without a grader: the winning class is graded by a sample that gave its representative (grading is a
    function of the answer text, so any such sample will do)."""
    winner = majority_vote([s.answer for s in samples], same_answer)
    if winner is None:
        return 0.0
    return float(next(s.correct for s in samples if _normalise(s.answer) == winner))


def _ks_up_to(num_samples: int) -> list[int]:
    ks = [1 << i for i in range(num_samples.bit_length()) if 1 << i <= num_samples]
    return ks if ks[-1] == num_samples else [*ks, num_samples]


def per_question_scores(results: Sequence[Sequence[SampleResult]],
                        same_answer: Sequence[SameAnswer | None] | None = None) -> dict[str, list[float]]:
    """Each question's `pass@1` (the fraction of its K samples that are correct) and `cons@K` (1.0 when its majority
    vote is correct), in question order: `summarize_eval`'s pass@1 and cons@K are their means. Two checkpoints
    evaluated on the same questions are compared through the per-question differences (r1moe/report.py)."""
    if not results:
        raise ValueError("per_question_scores needs at least one question")
    equivalences = list(same_answer) if same_answer is not None else [None] * len(results)
    if len(equivalences) != len(results):
        raise ValueError(f"same_answer has {len(equivalences)} entries for {len(results)} questions")
    k = len(results[0])
    if k == 0 or any(len(samples) != k for samples in results):
        raise ValueError("every question needs the same number (>= 1) of samples")
    return {"pass@1": [sum(s.correct for s in samples) / k for samples in results],
            f"cons@{k}": [_cons_from_samples(samples, same) for samples, same in zip(results, equivalences)]}


def summarize_eval(results: Sequence[Sequence[SampleResult]],
                   same_answer: Sequence[SameAnswer | None] | None = None,
                   per_question: bool = False) -> dict[str, Any]:
    """Metrics of one benchmark from K graded samples per question (`results[q][i]`); `same_answer[q]` is question
    q's answer equivalence for cons@K (None: normalised text).

    Keys: `pass@1` (mean over questions of the fraction of correct samples), `pass@k` for k = 2, 4, ... and K,
    `cons@K`, `format_rate` and `mean_response_length` (over all samples), `language_consistency` (mean over
    the samples that measured it; absent when none did), `num_questions`, `num_samples` (total); with
    `per_question`, also "per_question": `per_question_scores` (the majority votes are counted once for both).
    """
    if not results:
        raise ValueError("summarize_eval needs at least one question")
    scores = per_question_scores(results, same_answer)  # checks the shapes; each question's pass@1 and cons@K
    num_per_question = len(results[0])
    num_questions = len(results)
    all_samples = [s for samples in results for s in samples]

    summary: dict[str, Any] = {}
    for k in _ks_up_to(num_per_question):
        summary[f"pass@{k}"] = (
            sum(pass_at_k(num_per_question, sum(s.correct for s in samples), k) for samples in results) / num_questions
        )
    summary[f"cons@{num_per_question}"] = sum(scores[f"cons@{num_per_question}"]) / num_questions
    summary["format_rate"] = sum(s.formatted for s in all_samples) / len(all_samples)
    summary["mean_response_length"] = sum(s.length_tokens for s in all_samples) / len(all_samples)
    measured = [s.language_consistency for s in all_samples if s.language_consistency is not None]
    if measured:
        summary["language_consistency"] = sum(measured) / len(measured)
    summary["num_questions"] = num_questions
    summary["num_samples"] = len(all_samples)
    if per_question:
        summary["per_question"] = scores
    return summary

"""Loaders of the public benchmarks DeepSeek-R1 reports (v2 D.1), from local files in their release formats, each
with its prompt, its grader and the paper's k. Nothing is downloaded: fetch a release once (e.g.
`datasets.load_dataset(NAME, split="test").to_json("aime2024.jsonl")`) and pass the file.

    r1moe eval --checkpoint DIR --benchmark aime2024 --data aime_2024.jsonl          # k = 64, cons@64
    r1moe eval --checkpoint DIR --benchmark livecodebench --data test5.jsonl --contest-dates 2024-08-01:2025-01-31

Fields read (other columns of a release are not used; a missing or mistyped one is an error naming file:line):

| benchmark | release | fields |
|---|---|---|
| aime2024 | HuggingFaceH4/aime_2024 (JSONL) or Maxwell-Jia/AIME_2024 | `problem`, `answer` (string or integer), `id` optional; or `Problem`, `Answer`, `ID` |
| math500 | HuggingFaceH4/MATH-500 `test.jsonl` | `problem`, `answer`, `unique_id`; `solution`, `subject`, `level` carried in the id only |
| gpqa_diamond | Idavidrein/gpqa `gpqa_diamond.csv` (or the same rows as JSONL) | `Question`, `Correct Answer`, `Incorrect Answer 1`..`3`, `Record ID` optional |
| livecodebench | livecodebench/code_generation_lite `test*.jsonl` | `question_content`, `question_id`, `contest_date`, `starter_code`, `public_test_cases`, `private_test_cases`, `metadata` (`func_name`); `question_title`, `platform`, `difficulty` not used |

Prompts: math (AIME, MATH-500) = the problem + "Please reason step by step, and put your final answer within
\\boxed{}." (R1 README "Usage Recommendations"); GPQA = simple-evals' multiple-choice template (R1 v1 §3: "simple-
evals prompts"), choices shuffled per question by a seeded RNG keyed on (seed, Record ID or line), so a run is
reproducible and the gold letter is uniform over A-D; LiveCodeBench = its code-generation prompt (stdin format or
the starter code).

LiveCodeBench test cases: `public_test_cases` is a JSON string; `private_test_cases` is either a JSON string or, in
the release, base64 of zlib of a pickle of a JSON string. Pickle can run code when loaded, so that form is read by
an unpickler that refuses every global (`_SafeUnpickler`: a pickled `str` needs none) with a size cap on the
decompressed bytes: a file that is not the release format is an error, never executed. Only that one field is
unpickled, and only in that form.

Paper k (v2 D.1): 64 for AIME and GPQA, 16 for MATH, 8 for LiveCodeBench; T=0.6, top-p 0.95; cons@64 on AIME.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import os
import pickle
import random
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r1moe.data.schema import PromptSample, iter_json_lines

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

GPQA_TEMPLATE = (
    "Answer the following multiple choice question. The last line of your response should be of the following "
    "format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD. Think step by step before answering.\n\n"
    "{question}\n\nA) {A}\nB) {B}\nC) {C}\nD) {D}"
)

LCB_STDIN_FORMAT = (
    "### Format: Read the inputs from stdin solve the problem and write the answer to stdout (do not directly test "
    "on the sample inputs). Enclose your code within delimiters as follows. Ensure that when the python program "
    "runs, it reads the inputs, runs the algorithm and writes output to STDOUT.\n```python\n# YOUR CODE HERE\n```"
)
LCB_STARTER_FORMAT = ("### Format: You will use the following starter code to write the solution to the problem and "
                      "enclose your code within delimiters.\n```python\n{starter_code}\n```")

MAX_TEST_BYTES = 1 << 30
"""Decompressed size cap of one problem's private test cases (the largest in the release are tens of MB)."""


def _records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) per row of a JSONL or CSV file; `where` is `path:line`."""
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file not found: {path}")
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            for i, row in enumerate(csv.DictReader(f), 2):  # line 1 is the header
                yield f"{path}:{i}", row
        return
    for where, obj in iter_json_lines(path):  # ValueError naming path:line for bad bytes or bad JSON
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")  # noqa: TRY004 - bad data: ValueError like every other bad line
        yield where, obj


def _field(obj: dict[str, Any], where: str, *names: str, types: tuple[type, ...] = (str,), required: bool = True):
    """The first of `names` present in `obj` (release spelling variants), checked against `types`."""
    for name in names:
        if name in obj and obj[name] is not None:
            value = obj[name]
            if not isinstance(value, types) or isinstance(value, bool):
                want = " or ".join(t.__name__ for t in types)
                raise ValueError(f"{where}: {name}: expected {want}, got {json.dumps(value)[:60]}")
            return value
    if required:
        raise ValueError(f"{where}: missing field {' / '.join(repr(n) for n in names)}")
    return None


def _nonempty(samples: list[PromptSample], path: Path) -> list[PromptSample]:
    if not samples:
        raise ValueError(f"{path}: no record (empty benchmark file)")
    ids = [s.id for s in samples]
    dup = next((i for i in ids if ids.count(i) > 1), None)
    if dup is not None:
        raise ValueError(f"{path}: id {dup!r} appears more than once")
    return samples


def math_prompt(problem: str) -> str:
    return f"{problem.strip()}\n{MATH_INSTRUCTION}"


def load_aime2024(path: Path) -> list[PromptSample]:
    out = []
    for n, (where, obj) in enumerate(_records(path), 1):
        problem = _field(obj, where, "problem", "Problem")
        answer = _field(obj, where, "answer", "Answer", types=(str, int))
        rid = _field(obj, where, "id", "ID", types=(str, int), required=False)
        out.append(PromptSample(prompt=math_prompt(problem), answer=str(answer).strip(),
                                id=str(rid) if rid is not None else f"aime2024-{n}", kind="math"))
    return _nonempty(out, path)


def load_math500(path: Path) -> list[PromptSample]:
    out = []
    for where, obj in _records(path):
        problem, answer = _field(obj, where, "problem"), _field(obj, where, "answer")
        out.append(PromptSample(prompt=math_prompt(problem), answer=answer, id=_field(obj, where, "unique_id"),
                                kind="math"))
    return _nonempty(out, path)


def load_gpqa_diamond(path: Path, seed: int = 0) -> list[PromptSample]:
    """The gold is the letter the correct answer lands on after the per-question shuffle."""
    out = []
    for n, (where, obj) in enumerate(_records(path), 1):
        question = _field(obj, where, "Question").strip()
        correct = _field(obj, where, "Correct Answer").strip()
        wrong = [_field(obj, where, f"Incorrect Answer {i}").strip() for i in (1, 2, 3)]
        rid = _field(obj, where, "Record ID", required=False) or f"gpqa-{n}"
        choices = [correct, *wrong]
        order = random.Random(f"{seed}:{rid}").sample(range(4), 4)  # str seeds hash with SHA-512: stable
        shown = [choices[i] for i in order]
        prompt = GPQA_TEMPLATE.replace("{question}", question)
        for letter, text in zip("ABCD", shown):
            prompt = prompt.replace("{" + letter + "}", text, 1)
        out.append(PromptSample(prompt=prompt, answer="ABCD"[order.index(0)], id=rid, kind="general"))
    return _nonempty(out, path)


# ---------------------------------------------------------------- LiveCodeBench


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"global {module}.{name} refused: the release format pickles a plain string")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids refused")


def decode_test_cases(text: str, where: str) -> list[dict[str, Any]]:
    """LiveCodeBench test cases: a JSON list, or base64(zlib(pickle(JSON string))) as in the release."""
    if text.lstrip().startswith("["):
        try:
            cases = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: test cases: not JSON: {e.msg}") from None
    else:
        try:
            d = zlib.decompressobj()
            raw = d.decompress(base64.b64decode(text.encode("ascii"), validate=True), MAX_TEST_BYTES)
            if d.unconsumed_tail:
                raise ValueError(f"{where}: test cases: over {MAX_TEST_BYTES} bytes decompressed")
            inner = _SafeUnpickler(io.BytesIO(raw)).load()
        except (binascii.Error, UnicodeEncodeError, zlib.error, pickle.UnpicklingError, EOFError) as e:
            raise ValueError(f"{where}: test cases: neither JSON nor the release's base64/zlib/pickle form "
                             f"({type(e).__name__}: {e})") from None
        if not isinstance(inner, str):
            raise ValueError(f"{where}: test cases: the pickle holds a {type(inner).__name__}, not a JSON string")
        try:
            cases = json.loads(inner)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: test cases: decoded text is not JSON: {e.msg}") from None
    if not isinstance(cases, list):
        raise ValueError(f"{where}: test cases: expected a list, got {type(cases).__name__}")  # noqa: TRY004 - bad data
    for i, c in enumerate(cases, 1):
        if not (isinstance(c, dict) and isinstance(c.get("input"), str) and isinstance(c.get("output"), str)
                and c.get("testtype") in ("stdin", "functional")):
            raise ValueError(f"{where}: test case {i}: expected {{input: str, output: str, testtype: stdin|functional}}")
    return cases


@dataclass
class CodeProblem:
    """What grading one LiveCodeBench problem needs (cases from the rewards module's `IOCase`)."""

    cases: list  # list[IOCase]
    func_name: str | None = None
    """LeetCode method name (functional tests); None for stdin programs."""


def load_livecodebench(path: Path, dates: tuple[str, str] | None = None) -> tuple[list[PromptSample],
                                                                                 dict[str, CodeProblem]]:
    """Problems (optionally those with `dates[0] <= contest_date[:10] <= dates[1]`, ISO dates) and their tests."""
    from r1moe.rewards.benchmarks import IOCase

    samples, problems = [], {}
    for where, obj in _records(path):
        date = _field(obj, where, "contest_date")
        if dates is not None and not dates[0] <= date[:10] <= dates[1]:
            continue
        qid = _field(obj, where, "question_id")
        content = _field(obj, where, "question_content")
        starter = _field(obj, where, "starter_code", required=False) or ""
        cases = (decode_test_cases(_field(obj, where, "public_test_cases"), f"{where}: public_test_cases")
                 + decode_test_cases(_field(obj, where, "private_test_cases"), f"{where}: private_test_cases"))
        if not cases:
            raise ValueError(f"{where}: question {qid!r} has no test case")
        kinds = {c["testtype"] for c in cases}
        if len(kinds) > 1:
            raise ValueError(f"{where}: question {qid!r} mixes stdin and functional test cases")
        func_name = None
        if kinds == {"functional"}:
            meta_text = _field(obj, where, "metadata")
            try:
                meta = json.loads(meta_text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: metadata: not JSON: {e.msg}") from None
            func_name = meta.get("func_name") if isinstance(meta, dict) else None
            if not isinstance(func_name, str) or not func_name.isidentifier():
                raise ValueError(f"{where}: metadata: functional tests need a `func_name` identifier, got "
                                 f"{func_name!r}")
            if not starter.strip():
                raise ValueError(f"{where}: functional tests need `starter_code` (the Solution class to complete)")
        fmt = LCB_STARTER_FORMAT.replace("{starter_code}", starter) if starter.strip() else LCB_STDIN_FORMAT
        prompt = f"### Question:\n{content.strip()}\n\n{fmt}\n\n### Answer: (use the provided format with backticks)"
        samples.append(PromptSample(prompt=prompt, answer="", id=qid, kind="code"))
        problems[qid] = CodeProblem([IOCase(c["input"], c["output"], c["testtype"]) for c in cases], func_name)
    return _nonempty(samples, path), problems


# ---------------------------------------------------------------- registry


def final_part(completion: str) -> str:
    """What follows the reasoning: the text after the last `</think>`; "" when a `<think>` block never closes (the
    reply ran out of tokens while thinking: a letter or code block in the reasoning is not an answer)."""
    from r1moe.templates import THINK_CLOSE, THINK_OPEN

    if THINK_CLOSE in completion:
        return completion.rsplit(THINK_CLOSE, 1)[1]
    return "" if THINK_OPEN in completion else completion


@dataclass
class LoadedBenchmark:
    samples: list[PromptSample]
    grade: Callable[[str, PromptSample], tuple[bool, str | None]]
    """(completion, sample) -> (correct, the extracted answer cons@k votes over)."""
    same_answer: Callable[[str, str, PromptSample], bool]
    extra: dict[str, Any] = field(default_factory=dict)
    grade_threads: int = 1
    """Samples graded at once: the sandbox's programs for code (each call waits on its subprocesses); 1 for math,
    whose math-verify timeout needs the main thread."""


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    samples: int
    """k of the paper (R1 v2 D.1)."""
    description: str


BENCHMARKS: dict[str, BenchmarkSpec] = {
    "aime2024": BenchmarkSpec("aime2024", 64, "AIME 2024, 30 problems; pass@1 over 64 samples and cons@64"),
    "math500": BenchmarkSpec("math500", 16, "MATH-500; pass@1 over 16 samples"),
    "gpqa_diamond": BenchmarkSpec("gpqa_diamond", 64, "GPQA Diamond, 198 questions; pass@1 over 64 samples"),
    "livecodebench": BenchmarkSpec("livecodebench", 8, "LiveCodeBench code generation; pass@1 over 8 samples"),
}


def check_benchmark_args(name: str, contest_dates: tuple[str, str] | None, where: str = "") -> None:
    """ValueError (prefixed by `where`) for an unknown benchmark, or contest dates that are not ISO dates FROM <= TO
    or are given to a benchmark other than livecodebench (they would have no effect)."""
    import datetime

    prefix = f"{where}: " if where else ""
    if name not in BENCHMARKS:
        raise ValueError(f"{prefix}unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    if contest_dates is None:
        return
    if name != "livecodebench":
        raise ValueError(f"{prefix}contest dates apply to livecodebench only, not {name}")
    try:
        lo, hi = (datetime.date.fromisoformat(d) for d in contest_dates)
    except ValueError:
        raise ValueError(f"{prefix}contest dates {list(contest_dates)} must be ISO dates (2024-08-01)") from None
    if lo > hi:
        raise ValueError(f"{prefix}contest dates {list(contest_dates)}: FROM is after TO")


def load_benchmark(name: str, path: str | Path, seed: int = 0,
                   contest_dates: tuple[str, str] | None = None) -> LoadedBenchmark:
    from r1moe.rewards import extract_answer, extract_code, same_answer
    from r1moe.rewards.benchmarks import choice_letter, grade_functional, grade_stdio
    from r1moe.rewards.rule import accuracy_reward

    check_benchmark_args(name, contest_dates)
    path = Path(path)
    if name in ("aime2024", "math500"):
        samples = load_aime2024(path) if name == "aime2024" else load_math500(path)
        return LoadedBenchmark(samples, lambda c, s: (accuracy_reward(c, s) >= 1.0, extract_answer(c)), same_answer)
    if name == "gpqa_diamond":
        def grade_choice(c: str, s: PromptSample) -> tuple[bool, str | None]:
            letter = choice_letter(final_part(c))
            return letter == s.answer, letter
        return LoadedBenchmark(load_gpqa_diamond(path, seed), grade_choice, _same_letter)
    samples, problems = load_livecodebench(path, contest_dates)

    def grade_code(c: str, s: PromptSample) -> tuple[bool, str | None]:
        code = extract_code(final_part(c)) if final_part(c).strip() else None
        if code is None:
            return False, None
        p = problems[s.id]
        verdict = (grade_functional(code, p.func_name, p.cases) if p.func_name else grade_stdio(code, p.cases))
        return verdict.ok, code.strip()
    return LoadedBenchmark(samples, grade_code, _same_code, {"problems": problems},
                           grade_threads=max(1, len(os.sched_getaffinity(0))))


def _same_letter(a: str, b: str, sample: PromptSample) -> bool:
    return a == b


def _same_code(a: str, b: str, sample: PromptSample) -> bool:
    """cons@k over programs: the same source up to whitespace (no semantic equivalence is attempted)."""
    return a.split() == b.split()

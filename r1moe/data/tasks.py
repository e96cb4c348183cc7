"""Procedural verifiable math tasks (no downloads): arithmetic, countdown, linear equations.

Each task has a generator, a verifier and a worked solution (the short step-by-step chain of thought used as
cold-start SFT data). They stand in for the math RL prompts of DeepSeek-R1 (v2 Table 4) at tiny scale, where a
1-5M-parameter model must solve some of them after brief pretraining: difficulty 1 (the default) is easy.

    TASKS["arithmetic"].generate(random.Random(0))  ->  PromptSample(prompt="Compute 7 - 1 - 5", answer="1", ...)
    make_dataset("countdown", n=1000, seed=0)       ->  1000 distinct problems of split 0

Held-out data never overlaps training data: `make_dataset` keeps only problems whose stable hash falls in bucket
`seed % NUM_SPLITS` (see `r1moe.data.splits`). At difficulty 1 a split holds about 2,000 arithmetic, 1,200
countdown and 2,000 linear problems; difficulty 2 and up are far larger. Expressions are evaluated with `ast` over
numbers and + - * / only, never with `eval`. Prompts carry no final period: the R1-Zero template adds one
("User: {prompt}. Assistant:").
"""

from __future__ import annotations

import ast
import random
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Union

from r1moe.data.schema import PromptSample
from r1moe.data.splits import draw_unique, problem_key, stable_hash

# ---------------------------------------------------------------- expression trees (shared by the tasks)

Expr = Union[int, "Node"]
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_AST_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
MAX_EXPR_CHARS = 200


@dataclass(frozen=True)
class Node:
    op: str
    left: Expr
    right: Expr


def render_expr(e: Expr) -> str:
    """Infix text with the fewest parentheses that keep the tree: `(7 + 5) * 3 - 4`."""
    if isinstance(e, int):
        return str(e)
    p = _PRECEDENCE[e.op]
    left, right = render_expr(e.left), render_expr(e.right)
    if isinstance(e.left, Node) and _PRECEDENCE[e.left.op] < p:
        left = f"({left})"
    if isinstance(e.right, Node) and (_PRECEDENCE[e.right.op] < p or (_PRECEDENCE[e.right.op] == p and e.op in "-/")):
        right = f"({right})"
    return f"{left} {e.op} {right}"


def _apply(op: str, a: Fraction, b: Fraction) -> Fraction:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if b == 0:
        raise ZeroDivisionError("division by zero")
    return a / b


def eval_steps(e: Expr) -> tuple[Fraction, list[tuple[Fraction, str, Fraction, Fraction]]]:
    """Value and the post-order list of (a, op, b, result) steps, left operand first."""
    if isinstance(e, int):
        return Fraction(e), []
    a, steps_a = eval_steps(e.left)
    b, steps_b = eval_steps(e.right)
    r = _apply(e.op, a, b)
    return r, steps_a + steps_b + [(a, e.op, b, r)]


def parse_expr(text: str) -> Expr:
    """Parse `text` into a tree of non-negative integers and + - * /; anything else is a ValueError."""
    if len(text) > MAX_EXPR_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPR_CHARS} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as e:
        raise ValueError(f"not an expression: {text!r}") from e

    def walk(node: ast.AST) -> Expr:
        if isinstance(node, ast.Constant) and type(node.value) is int and node.value >= 0:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
            return Node(_AST_OPS[type(node.op)], walk(node.left), walk(node.right))
        raise ValueError(f"only numbers, + - * / and parentheses are allowed, found {type(node).__name__}")

    return walk(tree)


def leaves(e: Expr) -> list[int]:
    return [e] if isinstance(e, int) else leaves(e.left) + leaves(e.right)


def _fmt(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def _random_tree(rng: random.Random, values: list[int], ops: str) -> Expr:
    if len(values) == 1:
        return values[0]
    k = rng.randint(1, len(values) - 1)
    return Node(rng.choice(ops), _random_tree(rng, values[:k], ops), _random_tree(rng, values[k:], ops))


def _tree_ok(e: Expr, lo: int, hi: int) -> bool:
    """Every intermediate and the result are integers in [lo, hi] (exact division only)."""
    try:
        _, steps = eval_steps(e)
    except ZeroDivisionError:
        return False
    return all(r.denominator == 1 and lo <= r <= hi for *_, r in steps)


def _steps_text(steps: list[tuple[Fraction, str, Fraction, Fraction]], first: str = "First,") -> list[str]:
    out = []
    for i, (a, op, b, r) in enumerate(steps):
        lead = first if i == 0 else "Then"
        rhs = f"({_fmt(b)})" if b < 0 else _fmt(b)
        out.append(f"{lead} {_fmt(a)} {op} {rhs} = {_fmt(r)}.")
    return out


# ---------------------------------------------------------------- answer parsing

_BOXED = re.compile(r"^\\boxed\{(.*)\}$", re.DOTALL)
_FRAC = re.compile(r"^\\d?frac\{\s*([+-]?\d+)\s*\}\{\s*(\d+)\s*\}$")
_NUM = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")
_RATIO = re.compile(r"^([+-]?\d+)\s*/\s*(\d+)$")
_LHS = re.compile(r"^[A-Za-z][\w ]*?(?:\s*[=:]|\s+is)\s*(.+)$", re.DOTALL)


def _unwrap(text: str) -> str:
    s = text.strip().strip("$").strip()
    m = _BOXED.match(s)
    return m.group(1).strip() if m else s


def parse_number(text: str) -> Fraction | None:
    """`5`, ` 5 `, `5.0`, `x = 5`, `-3`, `1/2`, `\\frac{1}{2}`, `\\boxed{5}`, `5.` -> a Fraction; else None."""
    s = _unwrap(text)
    m = _LHS.match(s)
    if m:
        s = _unwrap(m.group(1))
    s = s.rstrip(".").strip()  # a sentence's final period
    if re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    if _NUM.match(s):
        return Fraction(s)
    m = _RATIO.match(s) or _FRAC.match(s)
    if m and int(m.group(2)) != 0:
        return Fraction(int(m.group(1)), int(m.group(2)))
    return None


def _sample_id(task: str, difficulty: int, prompt: str) -> str:
    return f"{task}-d{difficulty}-{stable_hash(problem_key(task, prompt)):016x}"


# ---------------------------------------------------------------- tasks


class Task:
    """A procedural task: `generate` a problem, `verify` an extracted answer, write its `worked_solution`."""

    name: str = ""

    def generate(self, rng: random.Random, difficulty: int = 1) -> PromptSample:
        raise NotImplementedError

    def verify(self, answer_text: str, sample: PromptSample) -> bool:
        """Numeric comparison with the gold answer (tolerant of whitespace, `x = 5`, `5.0`)."""
        got, gold = parse_number(answer_text), parse_number(sample.answer)
        return got is not None and got == gold

    def worked_solution(self, sample: PromptSample) -> str:
        raise NotImplementedError

    def _sample(self, prompt: str, answer: str, difficulty: int) -> PromptSample:
        return PromptSample(prompt=prompt, answer=answer, id=_sample_id(self.name, difficulty, prompt),
                            kind="math", task=self.name)


def _check_difficulty(difficulty: int) -> int:
    if not isinstance(difficulty, int) or difficulty < 1:
        raise ValueError(f"difficulty must be an integer >= 1, got {difficulty!r}")
    return difficulty


class Arithmetic(Task):
    """Multi-step integer expressions. Difficulty d: d+1 to d+2 operands in 1..12 (d=1) or 1..10d; + - * at d=1, exact
    division from d=2; every intermediate result is an integer in [0, 100 d^2] (negatives allowed from d=3)."""

    name = "arithmetic"
    PREFIX = "Compute "

    def generate(self, rng: random.Random, difficulty: int = 1) -> PromptSample:
        d = _check_difficulty(difficulty)
        hi = 100 * d * d
        lo = -hi if d >= 3 else 0
        while True:
            values = [rng.randint(1, 12 if d == 1 else 10 * d) for _ in range(rng.randint(d + 1, d + 2))]
            tree = _random_tree(rng, values, "+-*" if d == 1 else "+-*/")
            if _tree_ok(tree, lo, hi):
                value, _ = eval_steps(tree)
                return self._sample(self.PREFIX + render_expr(tree), _fmt(value), d)

    def worked_solution(self, sample: PromptSample) -> str:
        tree = parse_expr(sample.prompt[len(self.PREFIX):])
        value, steps = eval_steps(tree)
        lines = [f"We need to compute {render_expr(tree)}."]
        if "(" in sample.prompt:
            lines.append("Parentheses first, then * and / before + and -.")
        lines += _steps_text(steps)
        lines.append(f"So the answer is {_fmt(value)}.")
        return "\n".join(lines)


class DigitArithmetic(Arithmetic):
    """Arithmetic over single digits: 2-3 operands in 1..9, + - *, every intermediate result in [0, 50]. The same
    prompt and worked-solution shape as `arithmetic`, over a problem space whose ~10^3 step facts a CPU-sized model
    can learn in minutes (the tiny R1-Zero run); `difficulty` is accepted for interface parity and ignored."""

    name = "digits"

    def generate(self, rng: random.Random, difficulty: int = 1) -> PromptSample:
        _check_difficulty(difficulty)
        while True:
            values = [rng.randint(1, 9) for _ in range(rng.randint(2, 3))]
            tree = _random_tree(rng, values, "+-*")
            if _tree_ok(tree, 0, 50):
                value, _ = eval_steps(tree)
                return self._sample(self.PREFIX + render_expr(tree), _fmt(value), 1)


class Countdown(Task):
    """Reach a target with the given numbers (each at most once). Difficulty d: d+2 numbers in 1..5d+10, + - * at
    d=1 and also exact / from d=2, target in [1, 100 d] made from at least two of the numbers and not one of them.
    The answer is one expression that works; `verify` accepts any valid expression."""

    name = "countdown"
    _PROMPT = re.compile(r"^Use the numbers ([\d, ]+) to make (\d+) with ([+\-*/ ]+) \(each number at most once\)$")

    def generate(self, rng: random.Random, difficulty: int = 1) -> PromptSample:
        d = _check_difficulty(difficulty)
        ops = "+-*" if d == 1 else "+-*/"
        while True:
            numbers = [rng.randint(1, 5 * d + 10) for _ in range(d + 2)]
            used = rng.sample(numbers, rng.randint(2, len(numbers)))
            tree = _random_tree(rng, used, ops)
            if not _tree_ok(tree, 1, 100 * d):
                continue
            target, _ = eval_steps(tree)
            if target in numbers:
                continue
            shown = ", ".join(str(x) for x in sorted(numbers))
            prompt = f"Use the numbers {shown} to make {target} with {' '.join(ops)} (each number at most once)"
            return self._sample(prompt, render_expr(tree), d)

    def _parse_prompt(self, sample: PromptSample) -> tuple[list[int], int, str]:
        m = self._PROMPT.match(sample.prompt)
        if not m:
            raise ValueError(f"not a countdown prompt: {sample.prompt!r}")
        return [int(x) for x in m.group(1).split(",")], int(m.group(2)), m.group(3).replace(" ", "")

    def verify(self, answer_text: str, sample: PromptSample) -> bool:
        numbers, target, ops = self._parse_prompt(sample)
        text = _unwrap(answer_text).replace("×", "*").replace("÷", "/").replace("\\times", "*")
        for side in text.split("="):
            try:
                tree = parse_expr(side)
                value, steps = eval_steps(tree)
            except (ValueError, ZeroDivisionError, RecursionError):
                continue
            if any(op not in ops for _, op, _, _ in steps):
                continue
            if value == target and not Counter(leaves(tree)) - Counter(numbers):
                return True
        return False

    def worked_solution(self, sample: PromptSample) -> str:
        numbers, target, _ = self._parse_prompt(sample)
        tree = parse_expr(sample.answer)
        _, steps = eval_steps(tree)
        lines = [f"We need to make {target} from {', '.join(map(str, numbers))}."]
        lines += _steps_text(steps, first="Try")
        lines.append(f"This reaches {target} and uses each number at most once.")
        lines.append(f"So the answer is {sample.answer}.")
        return "\n".join(lines)


def _term(coef: int) -> str:
    return "x" if coef == 1 else f"{coef}x"


def _signed(c: int) -> str:
    return f" + {c}" if c > 0 else (f" - {-c}" if c < 0 else "")


class Linear(Task):
    """Linear equations in x with an integer solution. Difficulty 1: `ax + b = c` (a in 2..12, x in 0..20, b in
    -40..40, c >= 0). Difficulty d >= 2: `ax + b = cx + e` with a > c >= 1, x in -5d..5d, |b|, |e| <= 10d."""

    name = "linear"
    PREFIX = "Solve "
    SUFFIX = " for x"
    _SIDE = re.compile(r"^(\d*)x(?:\s*([+-])\s*(\d+))?$|^(-?\d+)$")

    def generate(self, rng: random.Random, difficulty: int = 1) -> PromptSample:
        d = _check_difficulty(difficulty)
        while True:
            if d == 1:
                a, c, x, b = rng.randint(2, 12), 0, rng.randint(0, 20), rng.randint(-40, 40)
                e = a * x + b
                if b == 0 or e < 0:
                    continue
            else:
                a = rng.randint(2, 4 * d + 1)
                c = rng.randint(1, a - 1)
                x = rng.randint(-5 * d, 5 * d)
                b = rng.randint(-10 * d, 10 * d)
                e = (a - c) * x + b
                if abs(e) > 10 * d or b == e:
                    continue
            right = f"{_term(c)}{_signed(e)}" if c else str(e)
            prompt = f"{self.PREFIX}{_term(a)}{_signed(b)} = {right}{self.SUFFIX}"
            return self._sample(prompt, str(x), d)

    def _coefs(self, sample: PromptSample) -> tuple[int, int, int, int]:
        eq = sample.prompt[len(self.PREFIX):-len(self.SUFFIX)]
        left, right = (s.strip() for s in eq.split("="))
        out = []
        for side in (left, right):
            m = self._SIDE.match(side)
            if not m:
                raise ValueError(f"not a linear equation: {sample.prompt!r}")
            if m.group(4) is not None:
                out += [0, int(m.group(4))]
            else:
                coef = int(m.group(1) or 1)
                const = int(m.group(3) or 0) * (-1 if m.group(2) == "-" else 1)
                out += [coef, const]
        a, b, c, e = out
        return a, b, c, e

    def worked_solution(self, sample: PromptSample) -> str:
        a, b, c, e = self._coefs(sample)
        eq = sample.prompt[len(self.PREFIX):-len(self.SUFFIX)]
        lines = [f"We need to solve {eq}."]
        if c:
            lines.append(f"Subtract {_term(c)} from both sides: {_term(a - c)}{_signed(b)} = {e}.")
            a -= c
        if b > 0:
            lines.append(f"Subtract {b} from both sides: {_term(a)} = {e} - {b} = {e - b}.")
        elif b < 0:
            lines.append(f"Add {-b} to both sides: {_term(a)} = {e} + {-b} = {e - b}.")
        x = Fraction(e - b, a)
        if a != 1:
            lines.append(f"Divide both sides by {a}: x = {e - b} / {a} = {_fmt(x)}.")
        lines.append(f"So the answer is {_fmt(x)}.")
        return "\n".join(lines)


TASKS: dict[str, Task] = {t.name: t for t in (Arithmetic(), DigitArithmetic(), Countdown(), Linear())}


def _get(task: str) -> Task:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[task]


def iter_dataset(task: str, n: int, seed: int, difficulty: int = 1) -> Iterator[PromptSample]:
    """`make_dataset` one sample at a time (for progress bars)."""
    t = _get(task)
    _check_difficulty(difficulty)
    return draw_unique(n, seed, lambda rng: t.generate(rng, difficulty), lambda s: problem_key(t.name, s.prompt),
                       what=f"task {task!r} difficulty {difficulty}")


def make_dataset(task: str, n: int, seed: int, difficulty: int = 1) -> list[PromptSample]:
    """`n` distinct problems of `task` from split `seed % NUM_SPLITS`: disjoint from any other split's datasets."""
    return list(iter_dataset(task, n, seed, difficulty))

"""JSONL records of every stage: RL prompts, SFT samples, preference pairs; strict readers and an atomic writer.

One JSON object per line. Readers validate every line and fail on the first bad one with
`ValueError("<path>:<lineno>: <field>: <what is wrong>")`: bytes that are not UTF-8, malformed JSON, a missing
required field, a wrong type, an unknown `kind`, an unknown field. Blank lines are skipped; a file with no record is an error ("empty dataset").

Conventions shared with the training loops: every `prompt` is the raw user question, and the loop renders it with
its `data.template` (`r1moe.templates.render`).
- `SFTSample.response` is the text that follows the rendered prompt verbatim; the SFT loop trains on
  `render(template, prompt) + response` with the loss on the response. A response fits one template (with "chat" the
  prompt already ends in "<think>\n"); `meta["template"]` says which.
- `PreferencePair.chosen` / `rejected` are replies to the rendered prompt, in the same way.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

from r1moe.atomic import atomic_open

Kind = Literal["math", "code", "general"]
KINDS: tuple[str, ...] = typing.get_args(Kind)


@dataclass
class PromptSample:
    """An RL / eval prompt with a verifiable answer."""

    prompt: str
    answer: str
    id: str | None = None
    kind: Kind = "math"
    language: str = "en"
    """Target language of the reasoning (language-consistency reward): "en", "zh", ..."""
    tests: str | None = None
    """code only: Python test source (top-level statements, usually asserts) run against the completion's code by
    the sandbox's judge, in a process of its own (r1moe/rewards/harness.py)."""
    task: str | None = None
    """Name of the procedural task that generated it (`r1moe.data.tasks.TASKS`), so its verifier is used."""


@dataclass
class SFTSample:
    """A supervised sample: `response` follows `render(meta["template"], prompt)` verbatim."""

    prompt: str
    response: str
    id: str | None = None
    kind: Kind = "math"
    language: str = "en"
    meta: dict[str, Any] = field(default_factory=dict)
    """Provenance: template, source task, teacher checkpoint, ..."""


@dataclass
class PreferencePair:
    """A Bradley-Terry reward-model pair: `chosen` is preferred to `rejected` as a reply to the rendered `prompt`."""

    prompt: str
    chosen: str
    rejected: str
    id: str | None = None


@dataclass
class SafetySample:
    """A pointwise safety label (DeepSeek-R1 v2 §3.1, the safety reward model): `response` to the rendered `prompt`
    is safe (True) or unsafe (False), judged on the whole response, reasoning included."""

    prompt: str
    response: str
    safe: bool
    id: str | None = None


Record = TypeVar("Record", PromptSample, SFTSample, PreferencePair, SafetySample)


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin is Union or type(tp).__name__ == "UnionType":
        return any(_type_ok(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    return isinstance(value, tp) and not (tp is int and isinstance(value, bool))


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is Union or type(tp).__name__ == "UnionType":
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return {str: "string", dict: "object", int: "integer", float: "number", bool: "boolean"}.get(origin or tp, str(tp))


def _from_dict(cls: type[Record], obj: Any, where: str) -> Record:
    if not isinstance(obj, dict):
        # ValueError like every other bad line: callers catch one exception type for invalid data.
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")  # noqa: TRY004
    types = _field_types(cls)
    unknown = sorted(set(obj) - set(types))
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r}; {cls.__name__} fields: {', '.join(types)}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    for name in required:
        if name not in obj:
            raise ValueError(f"{where}: missing required field {name!r}")
    for name, value in obj.items():
        if not _type_ok(value, types[name]):
            if name == "kind" and isinstance(value, str):
                raise ValueError(f"{where}: kind: unknown kind {value!r}; expected one of {', '.join(KINDS)}")
            raise ValueError(f"{where}: {name}: expected {_type_name(types[name])}, got {json.dumps(value)[:60]}")
    return cls(**obj)


def iter_lines(path: str | os.PathLike) -> Iterator[tuple[str, str]]:
    """("<path>:<lineno>", line) for each line of a UTF-8 text file; bytes that are not UTF-8 are a ValueError
    naming the line and the column."""
    path = Path(path)
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                yield where, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                 f"re-encode the file as UTF-8") from None


def iter_json_lines(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """("<path>:<lineno>", parsed JSON value) for each non-blank line; malformed JSON or bytes that are not UTF-8
    are a ValueError naming the line (the one JSONL parser of the project)."""
    for where, line in iter_lines(path):
        if not line.strip():
            continue
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: malformed JSON: {e.msg} at column {e.colno}") from None


def _read(path: str | os.PathLike, cls: type[Record]) -> list[Record]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such dataset file")
    records = [_from_dict(cls, obj, where) for where, obj in iter_json_lines(path)]
    if not records:
        raise ValueError(f"{path}: empty dataset (no {cls.__name__} records)")
    return records


def read_prompts(path: str | os.PathLike) -> list[PromptSample]:
    return _read(path, PromptSample)


def read_sft(path: str | os.PathLike) -> list[SFTSample]:
    return _read(path, SFTSample)


def read_pairs(path: str | os.PathLike) -> list[PreferencePair]:
    return _read(path, PreferencePair)


def read_safety(path: str | os.PathLike) -> list[SafetySample]:
    return _read(path, SafetySample)


def to_dict(record: Any) -> dict[str, Any]:
    """A record as a JSON-ready dict; optional fields that are None (or an empty `meta`) are left out."""
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        out = {}
        for f in dataclasses.fields(record):
            value = getattr(record, f.name)
            if value is None or (f.name == "meta" and value == {}):
                continue
            out[f.name] = value
        return out
    if isinstance(record, dict):
        return {k: v for k, v in record.items() if v is not None}
    raise TypeError(f"cannot write {type(record).__name__} as a JSONL record (expected a dataclass or a dict)")


def write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> int:
    """Write records atomically (temp file in the same directory, then `os.replace`); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with atomic_open(path, "w") as f:  # mode from the umask (not mkstemp's 0600)
        for record in records:
            f.write(json.dumps(to_dict(record), ensure_ascii=False) + "\n")
            count += 1
    return count

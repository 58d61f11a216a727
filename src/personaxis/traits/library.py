"""The trait library: the data a persona vector is built from.

A trait is data, not code. One JSON file holds:

- ``name`` (lowercase letters, digits, ``_`` or ``-``) and ``version`` (an integer, bumped when the content changes, so
  vectors can record which artifacts they came from);
- ``description``: one paragraph saying what the trait is;
- ``instructions``: pairs of system prompts, ``pos`` eliciting the trait and ``neg`` suppressing it;
- ``questions``: ``extraction`` (used to build the vector) and ``evaluation`` (held out to measure steering);
- ``rubric``: a judge prompt with ``{question}`` and ``{answer}`` placeholders that asks for an integer 0-100, or
  ``REFUSAL``.

The shipped traits follow the paper's recipe exactly: 5 instruction pairs and 20 + 20 questions. Those counts are
checked by default (``strict=True``) because a silently short file skews every downstream number; a custom trait
with other counts loads with ``strict=False``, which still requires at least one pair and one question per split.
Everything else (empty text, repeated questions or prompts, a rubric without its placeholders) is always an error.

Files are edited by hand, so every problem is reported as a single `PersonaxisError` line that names the file, the
field and what is wrong, never as a validation dump.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, model_validator

from personaxis.common.datasets import parse_json, read_text
from personaxis.errors import PersonaxisError

N_PAIRS = 5
"""Instruction pairs a trait has under ``strict=True``."""
N_QUESTIONS = 20
"""Questions in each split (extraction, evaluation) under ``strict=True``."""

# Pydantic error types, phrased in terms of the JSON the user wrote rather than Python classes.
_JSON_TYPES = {
    "model_type": "an object",
    "dict_type": "an object",
    "list_type": "a list",
    "string_type": "a string",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
}
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")
_PLACEHOLDER = re.compile(r"\{(question|answer)\}")


class _Model(BaseModel):
    # Unknown keys are usually typos ("instruction"), so they are errors rather than silently dropped.
    model_config = ConfigDict(extra="forbid", frozen=True)


class InstructionPair(_Model):
    """Two system prompts that differ only in the trait: their activation difference is the persona vector."""

    pos: str
    neg: str


class QuestionSplit(_Model):
    """Questions for building the vector and questions held out for judging it, kept apart to avoid overfitting."""

    extraction: list[str]
    evaluation: list[str]

    @property
    def all(self) -> list[str]:
        """Both splits, extraction first."""
        return [*self.extraction, *self.evaluation]


class TraitSpec(_Model):
    """One trait's artifacts. Constructing one validates it; see `parse_trait` to relax the counts."""

    name: str
    version: int = 1
    description: str
    instructions: list[InstructionPair]
    questions: QuestionSplit
    rubric: str

    @model_validator(mode="after")
    def _validate(self, info: ValidationInfo) -> TraitSpec:
        _check(self, strict=(info.context or {}).get("strict", True))
        return self

    def render_rubric(self, question: str, answer: str) -> str:
        """The judge prompt for one reply.

        Substitutes in a single pass, so braces elsewhere in the rubric, or placeholder-like text inside the
        question or answer, are left alone (``str.format`` would break on both).
        """
        values = {"question": question, "answer": answer}
        return _PLACEHOLDER.sub(lambda m: values[m[1]], self.rubric)


def list_traits() -> list[str]:
    """Names of the shipped traits, sorted."""
    return sorted(p.name.removesuffix(".json") for p in _packaged().iterdir() if p.name.endswith(".json"))


def load_trait(name_or_path: str | os.PathLike[str], *, strict: bool = True) -> TraitSpec:
    """Load a shipped trait by bare name (``"evil"``) or a user's trait file by path.

    A string is a path when it contains a path separator or ends in ``.json``; anything else is a shipped name.
    ``strict=False`` allows counts other than 5 pairs and 20 + 20 questions.
    """
    if isinstance(name_or_path, os.PathLike) or _looks_like_path(name_or_path):
        path = Path(name_or_path)
        source = f"trait file {path}"
        text = read_text(path, source)
    else:
        name = name_or_path
        resource = _packaged() / f"{name}.json"
        if not resource.is_file():
            shipped = ", ".join(list_traits())
            raise PersonaxisError(
                f"unknown trait {name!r} (shipped: {shipped}); pass a path to a .json file for your own"
            )
        source = f"trait file {name}.json"
        text = resource.read_text(encoding="utf-8")
    return parse_trait(parse_json(text, source), strict=strict, source=source)


def parse_trait(data: Any, *, strict: bool = True, source: str = "trait") -> TraitSpec:
    """Validate already-decoded data (a file's JSON, a generator's output) with the same one-line errors."""
    if not isinstance(data, dict):
        raise PersonaxisError(f"{source}: expected a JSON object at the top level, got {_kind(data)}")
    try:
        return TraitSpec.model_validate(data, context={"strict": strict})
    except ValidationError as exc:
        raise PersonaxisError(f"{source}: {_describe(exc)}") from None
    except PersonaxisError as exc:
        raise PersonaxisError(f"{source}: {exc}") from None


def save_trait(spec: TraitSpec, path: str | os.PathLike[str]) -> Path:
    """Write ``spec`` as pretty JSON, atomically: a crash leaves the old file or the new one, never half of one."""
    # Imported here: the store package pulls in heavy dependencies that loading a trait never needs.
    from personaxis.store.atomic import atomic_write_text

    path = Path(path)
    atomic_write_text(path, json.dumps(spec.model_dump(), indent=2, ensure_ascii=False) + "\n")
    return path


# --- validation ---------------------------------------------------------------------------------------------


def _check(spec: TraitSpec, *, strict: bool) -> None:
    """Raise on the first problem, with a message naming the field (the caller prefixes the file)."""
    if not _NAME.fullmatch(spec.name):
        raise PersonaxisError(f"'name' must be lowercase letters, digits, '_' or '-' (got {spec.name!r})")
    for field, text in _texts(spec):
        if not text.strip():
            raise PersonaxisError(f"'{field}' is empty")
    _count("instructions", len(spec.instructions), "pair", N_PAIRS, strict)
    _count("questions.extraction", len(spec.questions.extraction), "item", N_QUESTIONS, strict)
    _count("questions.evaluation", len(spec.questions.evaluation), "item", N_QUESTIONS, strict)
    _unique(_texts(spec, "instructions"))
    _unique(_texts(spec, "questions"))
    for placeholder in ("{question}", "{answer}"):
        if placeholder not in spec.rubric:
            raise PersonaxisError(f"'rubric' lacks the {placeholder} placeholder")


def _texts(spec: TraitSpec, only: str | None = None) -> Iterator[tuple[str, str]]:
    """Every free-text field as (field path, text)."""
    if only is None:
        yield "description", spec.description
        yield "rubric", spec.rubric
    if only in (None, "instructions"):
        for i, pair in enumerate(spec.instructions):
            yield f"instructions[{i}].pos", pair.pos
            yield f"instructions[{i}].neg", pair.neg
    if only in (None, "questions"):
        for split in ("extraction", "evaluation"):
            for i, question in enumerate(getattr(spec.questions, split)):
                yield f"questions.{split}[{i}]", question


def _count(field: str, n: int, noun: str, expected: int, strict: bool) -> None:
    if strict and n != expected:
        raise PersonaxisError(
            f"'{field}' has {n} {_plural(n, noun)}, expected {expected} (strict=False allows other counts)"
        )
    if n == 0:
        raise PersonaxisError(f"'{field}' is empty, expected at least one {noun}")


def _unique(texts: Iterator[tuple[str, str]]) -> None:
    """Repeats waste rollouts and leak between the splits; compare ignoring case and spacing."""
    seen: dict[str, str] = {}
    for field, text in texts:
        key = " ".join(text.split()).casefold()
        if key in seen:
            raise PersonaxisError(f"'{field}' repeats '{seen[key]}': {_clip(text)!r}")
        seen[key] = field


def _describe(exc: ValidationError) -> str:
    """One line for the first structural error, plus how many more there are."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    field = _field(first["loc"])
    if first["type"] == "missing":
        line = f"'{field}' is missing"
    elif first["type"] == "extra_forbidden":
        line = f"unknown field '{field}'"
    elif first["type"] in _JSON_TYPES:
        line = f"'{field}' should be {_JSON_TYPES[first['type']]} (got {_kind(first['input'])})"
    else:
        msg = first["msg"]
        line = f"'{field}': {msg[:1].lower()}{msg[1:]} (got {_kind(first['input'])})"
    if len(errors) > 1:
        more = len(errors) - 1
        line += f" (and {more} more {_plural(more, 'problem')})"
    return line


def _field(loc: tuple[int | str, ...]) -> str:
    """Pydantic's ('instructions', 2, 'pos') as instructions[2].pos."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def _kind(value: Any) -> str:
    """A JSON-flavoured name for a value's type, for messages read by people who wrote JSON."""
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _plural(n: int, noun: str) -> str:
    return noun if n == 1 else f"{noun}s"


def _clip(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


# --- files --------------------------------------------------------------------------------------------------


def _packaged() -> Traversable:
    return resources.files("personaxis") / "data" / "traits"


def _looks_like_path(text: str) -> bool:
    return text.endswith(".json") or "/" in text or os.sep in text

"""The Assistant Axis libraries: roles, the default prompts, shared questions, the role-adoption rubric and traits.

Persona space is only as good as its coverage, so the shipped roles span professions, mythic and fictional figures,
animals, objects and abstractions, emotional stances and subcultures (science.md §2). Each library is one JSON file
under ``personaxis/data/axis``:

- ``roles.json``: a list of ``{"name", "description", "prompts"}``, five system prompts per role;
- ``default.json``: ``{"name", "description", "prompts"}``, the five default prompts (``null`` = no system prompt,
  ``{model_name}`` filled in at run time);
- ``questions.json``: a list of strings, asked under every role and the default;
- ``rubric_role.json``: ``{"name", "prompt", "labels", "ai_self_reference"}``, the 0-3 judge prompt with ``{role}``,
  ``{role_description}``, ``{question}`` and ``{answer}``; ``labels[i]`` names score ``i``; ``ai_self_reference``
  (optional) lists regular expressions for a reply presenting itself as an AI, which the rubric never scores 3;
- ``traits.json``: a list of ``{"name", "description", "pos", "neg"}`` used to put words on persona-space directions.

Every loader takes a user's file by path instead and validates it the same way. The files are edited by hand and feed
runs that take hours, so a bad file fails at load time with one `PersonaxisError` line naming the file, the entry and
the field (``roles.json: role 'pirate' has 4 prompts, expected 5``), never a validation dump.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from personaxis.common.datasets import parse_json, read_text
from personaxis.errors import PersonaxisError

__all__ = [
    "DEFAULT_ROLE",
    "MIN_TRAIT_PROMPTS",
    "PROMPTS_PER_ROLE",
    "QUICK_ROLES",
    "RUBRIC_PLACEHOLDERS",
    "AxisTrait",
    "Role",
    "RoleRubric",
    "load_axis_traits",
    "load_default_prompts",
    "load_questions",
    "load_role_rubric",
    "load_roles",
    "quick_roles",
    "select",
]

PROMPTS_PER_ROLE = 5
"""System prompts per role and in the default set: the paper's count, so every role weighs the same in the axis."""
MIN_TRAIT_PROMPTS = 3
"""Fewest eliciting (and suppressing) prompts a trait may have; fewer makes its vector mostly one prompt's quirks."""
DEFAULT_ROLE = "default"
"""Reserved: the default vector is stored under this name, so no role may take it."""
RUBRIC_PLACEHOLDERS = ("role", "role_description", "question", "answer")
"""Slots the role-adoption rubric must contain, filled by `RoleRubric.render`."""
QUICK_ROLES = ("librarian", "therapist", "coach", "pirate", "oracle", "demon", "cat", "nihilist")
"""Eight roles for quick runs, picked to spread along the axis: from assistant-like helpers (librarian, therapist)
through characters (coach, pirate) to the mystical, the dark and the non-human (oracle, demon, cat, nihilist)."""

T = TypeVar("T")
M = TypeVar("M", bound="_Model")

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")
_SLOT = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_MODEL_NAME = "model_name"


class _Model(BaseModel):
    # Unknown keys are usually typos ("promtps"), so they are errors rather than silently dropped.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Role(_Model):
    """An archetype the model is told to be; its replies judged fully in role average into the role vector."""

    name: str
    description: str
    prompts: tuple[str, ...]

    @model_validator(mode="after")
    def _check(self) -> Role:
        _check_name(self.name)
        if self.name == DEFAULT_ROLE:
            raise ValueError(f"uses the reserved name '{DEFAULT_ROLE}'")
        _check_text("description", self.description)
        _check_count("prompts", self.prompts, exactly=PROMPTS_PER_ROLE)
        _check_texts((f"prompt {i}", p) for i, p in enumerate(self.prompts, 1))
        return self

    @property
    def label(self) -> str:
        """The name as words ("used car salesman"), for judge prompts and plots."""
        return re.sub(r"[_-]+", " ", self.name)


class AxisTrait(_Model):
    """A trait whose vector (eliciting minus suppressing replies) gives a persona-space direction a name."""

    name: str
    description: str
    pos: tuple[str, ...]
    neg: tuple[str, ...]

    @model_validator(mode="after")
    def _check(self) -> AxisTrait:
        _check_name(self.name)
        _check_text("description", self.description)
        _check_count("pos prompts", self.pos, at_least=MIN_TRAIT_PROMPTS)
        _check_count("neg prompts", self.neg, at_least=MIN_TRAIT_PROMPTS)
        _check_texts(_sides(self))
        return self


class RoleRubric(_Model):
    """The 0-3 role-adoption judge prompt (science.md §2.2); ``labels[i]`` names score ``i``."""

    name: str
    prompt: str
    labels: tuple[str, ...]
    ai_self_reference: tuple[str, ...] = ()  # case-insensitive regular expressions, searched anywhere in a reply

    @model_validator(mode="after")
    def _check(self) -> RoleRubric:
        _check_name(self.name)
        _check_text("prompt", self.prompt)
        _check_slots("prompt", self.prompt, allowed=RUBRIC_PLACEHOLDERS, required=RUBRIC_PLACEHOLDERS)
        _check_count("labels", self.labels, at_least=2)
        for i, label in enumerate(self.labels):
            if not _NAME.fullmatch(label):
                raise ValueError(
                    f"has an invalid label {label!r} for score {i}: use lowercase letters, digits, '_' or '-'"
                )
        _check_unique((f"label for score {i}", label) for i, label in enumerate(self.labels))
        for i, pattern in enumerate(self.ai_self_reference, 1):
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"has an invalid ai_self_reference pattern {i} ({err})") from None
        return self

    def presents_as_ai(self, reply: str) -> bool:
        """Whether `reply` speaks of itself as an AI ("As an AI language model..."): by the rubric never fully in role.

        A cheap check with no judge: the patterns find the plain cases, not every reply a judge would score below 3.
        """
        return any(re.search(p, reply, re.IGNORECASE) for p in self.ai_self_reference)

    @property
    def max_score(self) -> int:
        """The top of the scale (3 for the shipped rubric): the judge's allowed answers are 0..max_score."""
        return len(self.labels) - 1

    def render(self, role: Role, question: str, answer: str) -> str:
        """The judge message for one reply.

        Filled in one pass, so braces elsewhere in the prompt, or placeholder-like text inside the question or the
        answer, are left alone (``str.format`` would break on both).
        """
        values = {"role": role.label, "role_description": role.description, "question": question, "answer": answer}
        return _SLOT.sub(lambda m: values.get(m[1], m[0]), self.prompt)


class _DefaultSet(_Model):
    name: str
    description: str
    prompts: tuple[str | None, ...]

    @model_validator(mode="after")
    def _check(self) -> _DefaultSet:
        _check_name(self.name)
        _check_text("description", self.description)
        _check_count("prompts", self.prompts, exactly=PROMPTS_PER_ROLE)
        given = [(f"prompt {i}", p) for i, p in enumerate(self.prompts, 1) if p is not None]
        _check_texts(given)
        for where, prompt in given:
            _check_slots(where, prompt, allowed=(_MODEL_NAME,))
        if self.prompts.count(None) > 1:
            raise ValueError("has more than one null (no system prompt) prompt")
        return self


# --- loaders ------------------------------------------------------------------------------------------------------


def load_roles(path: str | Path | None = None) -> list[Role]:
    """The roles (packaged ``roles.json`` unless ``path`` is given), in file order."""
    label, data = _read("roles.json", path)
    roles = _entries(Role, data, label, "role")
    try:
        _check_unique_names(roles, "role")
        _check_unique((f"role '{r.name}' prompt {i}", p) for r in roles for i, p in enumerate(r.prompts, 1))
    except ValueError as err:
        raise PersonaxisError(f"{label}: {err}") from None
    return roles


def load_default_prompts(model_name: str, path: str | Path | None = None) -> list[str | None]:
    """The default set's system prompts for one model: ``None`` means no system prompt.

    ``model_name`` fills ``{model_name}`` (e.g. "You are Qwen."); it is whatever the model calls itself, which the
    caller knows better than this module.
    """
    if not isinstance(model_name, str) or not model_name.strip():
        raise PersonaxisError(f"default prompts need a model name, got {model_name!r}")
    label, data = _read("default.json", path)
    spec = _entry(_DefaultSet, data, label, "default set")
    name = model_name.strip()
    return [None if p is None else _SLOT.sub(lambda m: name if m[1] == _MODEL_NAME else m[0], p) for p in spec.prompts]


def load_questions(path: str | Path | None = None) -> list[str]:
    """The shared extraction questions (packaged ``questions.json`` unless ``path`` is given), in file order."""
    label, data = _read("questions.json", path)
    if not isinstance(data, list):
        raise PersonaxisError(f"{label}: expected a JSON list of questions, got {_kind(data)}")
    if not data:
        raise PersonaxisError(f"{label}: no questions")
    for i, question in enumerate(data, 1):
        if not isinstance(question, str):
            raise PersonaxisError(f"{label}: question {i} should be a string (got {_kind(question)})")
        if not question.strip():
            raise PersonaxisError(f"{label}: question {i} is empty")
    try:
        _check_unique((f"question {i}", q) for i, q in enumerate(data, 1))
    except ValueError as err:
        raise PersonaxisError(f"{label}: {err}") from None
    return list(data)


def load_role_rubric(path: str | Path | None = None) -> RoleRubric:
    """The role-adoption judge rubric (packaged ``rubric_role.json`` unless ``path`` is given)."""
    label, data = _read("rubric_role.json", path)
    return _entry(RoleRubric, data, label, "rubric")


def load_axis_traits(path: str | Path | None = None) -> list[AxisTrait]:
    """The interpretation traits (packaged ``traits.json`` unless ``path`` is given), in file order."""
    label, data = _read("traits.json", path)
    traits = _entries(AxisTrait, data, label, "trait")
    try:
        _check_unique_names(traits, "trait")
        _check_unique((f"trait '{t.name}' {where}", p) for t in traits for where, p in _sides(t))
    except ValueError as err:
        raise PersonaxisError(f"{label}: {err}") from None
    return traits


# --- subsets ------------------------------------------------------------------------------------------------------


def select(items: Sequence[T], n: int, seed: int = 0) -> list[T]:
    """``n`` items drawn at random but reproducibly, kept in their original order.

    The same seed gives the same subset on every machine, so a quick run can be repeated and compared.
    """
    if n < 0:
        raise PersonaxisError(f"cannot select {n} items")
    if n >= len(items):
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


def quick_roles(roles: Sequence[Role] | None = None, seed: int = 0) -> list[Role]:
    """The `QUICK_ROLES` spread for a quick run, or a seeded `select` when a custom library lacks any of them."""
    roles = load_roles() if roles is None else roles
    by_name = {role.name: role for role in roles}
    if all(name in by_name for name in QUICK_ROLES):
        return [by_name[name] for name in QUICK_ROLES]
    return select(roles, len(QUICK_ROLES), seed)


# --- validation ---------------------------------------------------------------------------------------------------
# The checks raise ValueError worded to follow an entry ("has 4 prompts, expected 5"); the loaders put the file and
# the entry in front ("roles.json: role 'pirate' has 4 prompts, expected 5").


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise ValueError(f"has an invalid name {name!r}: use lowercase letters, digits, '_' or '-'")


def _check_text(field: str, text: str) -> None:
    if not text.strip():
        raise ValueError(f"has an empty {field}")


def _check_count(field: str, items: Sequence[Any], *, exactly: int | None = None, at_least: int = 1) -> None:
    n = len(items)
    counted = f"{n} {field.removesuffix('s') if n == 1 else field}"
    if exactly is not None and n != exactly:
        raise ValueError(f"has {counted}, expected {exactly}")
    if n < at_least:
        raise ValueError(f"has {counted}, expected at least {at_least}")


def _check_texts(texts: Iterable[tuple[str, str]]) -> None:
    """Every prompt non-empty and none repeated within the entry."""
    texts = list(texts)
    for where, text in texts:
        _check_text(where, text)
    _check_unique(texts)


def _check_slots(field: str, template: str, *, allowed: Sequence[str], required: Sequence[str] = ()) -> None:
    found = set(_SLOT.findall(template))
    for slot in required:
        if slot not in found:
            raise ValueError(f"{field} is missing the {{{slot}}} placeholder")
    unknown = sorted(found - set(allowed))
    if unknown:
        known = ", ".join(f"{{{slot}}}" for slot in allowed)
        raise ValueError(f"{field} has an unknown placeholder {{{unknown[0]}}} (allowed: {known})")


def _check_unique(texts: Iterable[tuple[str, str]]) -> None:
    """Repeats waste rollouts and double-weight one prompt; compare ignoring case and spacing."""
    seen: dict[str, str] = {}
    for where, text in texts:
        key = " ".join(text.split()).casefold()
        if key in seen:
            raise ValueError(f"{where} repeats {seen[key]}: {_clip(text)!r}")
        seen[key] = where


def _check_unique_names(entries: Sequence[Role] | Sequence[AxisTrait], noun: str) -> None:
    seen: set[str] = set()
    for entry in entries:
        if entry.name in seen:
            raise ValueError(f"{noun} name '{entry.name}' appears twice")
        seen.add(entry.name)


def _sides(trait: AxisTrait) -> list[tuple[str, str]]:
    """A trait's prompts labelled by side and position ("neg prompt 2")."""
    return [(f"{side} prompt {i}", p) for side in ("pos", "neg") for i, p in enumerate(getattr(trait, side), 1)]


# --- files and messages -------------------------------------------------------------------------------------------

# Pydantic error types, phrased in terms of the JSON the user wrote rather than Python classes.
_JSON_TYPES = {
    "model_type": "an object",
    "dict_type": "an object",
    "list_type": "a list",
    "tuple_type": "a list",
    "string_type": "a string",
}


def _read(packaged: str, path: str | Path | None) -> tuple[str, Any]:
    """(label for messages, decoded JSON) from a user's file or the packaged copy."""
    if path is None:
        label = packaged
        try:
            text = resources.files("personaxis").joinpath("data", "axis", packaged).read_text(encoding="utf-8")
        except OSError as err:
            raise PersonaxisError(f"{label}: cannot read packaged data ({err.strerror or err})") from None
    else:
        label = str(path)
        text = read_text(path, label)
    return label, parse_json(text, label)


def _entries(model: type[M], data: Any, label: str, noun: str) -> list[M]:
    if not isinstance(data, list):
        raise PersonaxisError(f"{label}: expected a JSON list of {noun}s, got {_kind(data)}")
    if not data:
        raise PersonaxisError(f"{label}: no {noun}s")
    return [_entry(model, item, label, _entry_name(noun, i, item)) for i, item in enumerate(data, 1)]


def _entry(model: type[M], item: Any, label: str, entry: str) -> M:
    """Validate one object; errors read '<file>: <entry> <problem>'."""
    prefix = f"{label}: {entry}"
    if not isinstance(item, dict):
        raise PersonaxisError(f"{prefix} should be a JSON object (got {_kind(item)})")
    try:
        return model.model_validate(item)
    except ValidationError as err:
        raise PersonaxisError(f"{prefix} {_describe(err)}") from None


def _entry_name(noun: str, index: int, item: Any) -> str:
    """The entry as "role 'pirate'" when it has a usable name, else by position ("role #3")."""
    name = item.get("name") if isinstance(item, dict) else None
    return f"{noun} {name!r}" if isinstance(name, str) and name.strip() else f"{noun} #{index}"


def _describe(err: ValidationError) -> str:
    """The first problem, phrased to follow the entry ("is missing field 'prompts'")."""
    first = err.errors(include_url=False)[0]
    loc, kind = first["loc"], first["type"]
    if kind == "missing":
        return f"is missing field '{loc[-1]}'"
    if kind == "extra_forbidden":
        return f"has unknown field '{loc[-1]}'"
    if kind in _JSON_TYPES:
        return f"{_where(loc)} should be {_JSON_TYPES[kind]} (got {_kind(first['input'])})"
    message = first["msg"].removeprefix("Value error, ")
    return f"{_where(loc)}: {message}" if loc else message


def _where(loc: tuple[int | str, ...]) -> str:
    """Pydantic's ('prompts', 2) as "field 'prompts' item 3", counting from 1 like the other messages."""
    return " ".join(f"item {part + 1}" if isinstance(part, int) else f"field '{part}'" for part in loc)


def _kind(value: Any) -> str:
    """A JSON-flavoured name for a value's type, for people who wrote JSON."""
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _clip(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"

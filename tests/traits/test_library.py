"""The trait library: shipped data is valid, and bad files fail with one line that names the field."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from personaxis.errors import PersonaxisError
from personaxis.traits import library
from personaxis.traits.library import (
    N_PAIRS,
    N_QUESTIONS,
    TraitSpec,
    list_traits,
    load_trait,
    parse_trait,
    save_trait,
)

SHIPPED = ["apathetic", "evil", "hallucinating", "humorous", "impolite", "optimistic", "sycophantic"]


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


@pytest.fixture
def data() -> dict[str, Any]:
    """A valid trait as plain data, to break in one place per test."""
    return load_trait("evil").model_dump()


def _write(tmp_path: Path, content: Any) -> Path:
    path = tmp_path / "custom.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


def _error(path: Path, **kwargs: Any) -> str:
    with pytest.raises(PersonaxisError) as info:
        load_trait(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"trait file {path}: ")
    assert info.value.__cause__ is None and (info.value.__context__ is None or info.value.__suppress_context__)
    return message


# --- shipped traits -----------------------------------------------------------------------------------------


def test_list_traits() -> None:
    assert list_traits() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_trait_is_complete(name: str) -> None:
    spec = load_trait(name)
    assert spec.name == name
    assert spec.version >= 1
    assert len(spec.instructions) == N_PAIRS == 5
    assert len(spec.questions.extraction) == N_QUESTIONS == 20
    assert len(spec.questions.evaluation) == N_QUESTIONS
    assert len(spec.questions.all) == 40
    assert len(spec.description.split()) >= 30


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_questions_are_distinct(name: str) -> None:
    spec = load_trait(name)
    extraction = {_norm(q) for q in spec.questions.extraction}
    evaluation = {_norm(q) for q in spec.questions.evaluation}
    assert len(extraction) == len(evaluation) == N_QUESTIONS
    assert not extraction & evaluation


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_instructions_differ(name: str) -> None:
    prompts = [p for pair in load_trait(name).instructions for p in (pair.pos, pair.neg)]
    assert len({_norm(p) for p in prompts}) == 2 * N_PAIRS


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_rubric(name: str) -> None:
    rubric = load_trait(name).rubric
    assert "REFUSAL" in rubric and "0 to 100" in rubric
    # Only the two placeholders and no other braces, so str.format-based judges work too.
    assert re.findall(r"\{[^{}]*\}", rubric) == ["{question}", "{answer}"]
    assert rubric.count("{") == rubric.count("}") == 2
    assert rubric.format(question="Q", answer="A") == load_trait(name).render_rubric("Q", "A")


# --- loading ------------------------------------------------------------------------------------------------


def test_load_by_path_and_by_str(tmp_path: Path, data: dict[str, Any]) -> None:
    path = _write(tmp_path, data)
    assert load_trait(path) == load_trait(str(path)) == load_trait("evil")


def test_unknown_name_lists_shipped() -> None:
    with pytest.raises(PersonaxisError, match=r"unknown trait 'curious' \(shipped: apathetic, evil, "):
        load_trait("curious")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    assert _error(path).endswith(": not found")


def test_render_rubric_substitutes_once() -> None:
    spec = load_trait("humorous")
    question, answer = "Why {answer}?", "Because {x} and {question}."
    head, rest = spec.rubric.split("{question}")
    middle, tail = rest.split("{answer}")
    assert spec.render_rubric(question, answer) == head + question + middle + answer + tail


# --- bad files ----------------------------------------------------------------------------------------------


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys: list[Any] = [int(k) if k.isdigit() else k for k in dotted.split(".")]
    for key in keys[:-1]:
        data = data[key]
    if value is _DELETE:
        del data[keys[-1]]
    else:
        data[keys[-1]] = value


_DELETE = object()
_Q = "questions"


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("rubric", _DELETE, "'rubric' is missing"),
        (f"{_Q}.evaluation", _DELETE, "'questions.evaluation' is missing"),
        ("instructions.2.neg", _DELETE, "'instructions[2].neg' is missing"),
        ("instruction", [], "unknown field 'instruction'"),
        (f"{_Q}.extraction", "What?", "'questions.extraction' should be a list (got a string)"),
        (f"{_Q}.evaluation.3", 7, "'questions.evaluation[3]' should be a string (got a number)"),
        ("version", "one", "'version' should be an integer (got a string)"),
        ("version", 1.5, "'version' should be an integer (got a number)"),
        ("instructions.1", "Be evil.", "'instructions[1]' should be an object (got a string)"),
        ("questions", [], "'questions' should be an object (got a list)"),
        ("name", "Evil Trait", "'name' must be lowercase letters, digits, '_' or '-' (got 'Evil Trait')"),
        ("description", "   ", "'description' is empty"),
        ("instructions.1.neg", "", "'instructions[1].neg' is empty"),
        (f"{_Q}.extraction.0", "\n", "'questions.extraction[0]' is empty"),
        ("rubric", "Score it: {answer}", "'rubric' lacks the {question} placeholder"),
        ("rubric", "Score {question}", "'rubric' lacks the {answer} placeholder"),
    ],
)
def test_bad_field(tmp_path: Path, data: dict[str, Any], field: str, value: Any, expected: str) -> None:
    _set(data, field, value)
    assert _error(_write(tmp_path, data)).endswith(f": {expected}")


def test_several_structural_problems_are_counted(tmp_path: Path, data: dict[str, Any]) -> None:
    del data["rubric"], data["description"]
    assert _error(_write(tmp_path, data)).endswith("is missing (and 1 more problem)")


@pytest.mark.parametrize(
    ("field", "size", "expected"),
    [
        ("instructions", 4, "'instructions' has 4 pairs, expected 5"),
        ("instructions", 1, "'instructions' has 1 pair, expected 5"),
        ("extraction", 21, "'questions.extraction' has 21 items, expected 20"),
        ("evaluation", 19, "'questions.evaluation' has 19 items, expected 20"),
    ],
)
def test_wrong_count(tmp_path: Path, data: dict[str, Any], field: str, size: int, expected: str) -> None:
    if field == "instructions":
        items = data["instructions"]
        extra = [{"pos": f"Be odd, take {i}.", "neg": f"Be even, take {i}."} for i in range(size)]
    else:
        items = data["questions"][field]
        extra = [f"Extra question {i}?" for i in range(size)]
    items[:] = (items + extra)[:size]
    message = _error(_write(tmp_path, data))
    assert f": {expected} (strict=False allows other counts)" in message


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("within", "'questions.extraction[5]' repeats 'questions.extraction[0]'"),
        ("across", "'questions.evaluation[0]' repeats 'questions.extraction[0]'"),
    ],
)
def test_duplicate_question(tmp_path: Path, data: dict[str, Any], where: str, expected: str) -> None:
    first = data["questions"]["extraction"][0]
    variant = "  " + first.upper().replace(" ", "   ")  # same question up to case and spacing
    if where == "within":
        data["questions"]["extraction"][5] = variant
    else:
        data["questions"]["evaluation"][0] = variant
    assert f": {expected}: " in _error(_write(tmp_path, data))


def test_duplicate_instruction(tmp_path: Path, data: dict[str, Any]) -> None:
    data["instructions"][3]["neg"] = data["instructions"][3]["pos"]
    assert _error(_write(tmp_path, data)).split(": ")[1] == "'instructions[3].neg' repeats 'instructions[3].pos'"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"name": "x",}', "invalid JSON at line 1, column 14: Expecting property name enclosed in double quotes"),
        ("", "invalid JSON at line 1, column 1: Expecting value"),
        ("[1, 2]", "expected a JSON object at the top level, got a list"),
    ],
)
def test_not_a_trait_object(tmp_path: Path, content: str, expected: str) -> None:
    assert _error(_write(tmp_path, content)).endswith(f": {expected}")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin.json"
    path.write_bytes('{"name": "caf\xe9"}'.encode("latin-1"))
    assert _error(path).endswith(": not UTF-8 text")


# --- relaxed counts -----------------------------------------------------------------------------------------


def test_relaxed_counts(tmp_path: Path, data: dict[str, Any]) -> None:
    del data["instructions"][3:]
    del data["questions"]["extraction"][10:]
    del data["questions"]["evaluation"][1:]
    path = _write(tmp_path, data)
    _error(path)
    spec = load_trait(path, strict=False)
    assert (len(spec.instructions), len(spec.questions.extraction), len(spec.questions.evaluation)) == (3, 10, 1)


def test_relaxed_still_needs_content(tmp_path: Path, data: dict[str, Any]) -> None:
    data["questions"]["evaluation"] = []
    assert _error(_write(tmp_path, data), strict=False).endswith(
        ": 'questions.evaluation' is empty, expected at least one item"
    )
    data["questions"]["evaluation"] = ["Same?", "same?"]
    assert "repeats" in _error(_write(tmp_path, data), strict=False)


def test_parse_and_construct_validate_too(data: dict[str, Any]) -> None:
    del data["instructions"][0]
    with pytest.raises(PersonaxisError, match=r"^generated: 'instructions' has 4 pairs, expected 5"):
        parse_trait(data, source="generated")
    with pytest.raises(PersonaxisError, match=r"^'instructions' has 4 pairs"):
        TraitSpec(**data)
    assert len(parse_trait(data, strict=False).instructions) == 4


# --- saving -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SHIPPED)
def test_round_trip(tmp_path: Path, name: str) -> None:
    spec = load_trait(name)
    path = save_trait(spec, tmp_path / "nested" / "dir" / f"{name}.json")
    assert load_trait(path) == spec
    text = path.read_text(encoding="utf-8")
    assert text.startswith('{\n  "name": ') and text.endswith("}\n")
    assert [p.name for p in path.parent.iterdir()] == [f"{name}.json"]


def test_shipped_files_are_in_saved_form(tmp_path: Path) -> None:
    """Shipped files stay byte-identical to what save_trait writes, so regenerating them makes clean diffs."""
    for name in SHIPPED:
        saved = save_trait(load_trait(name), tmp_path / f"{name}.json").read_text(encoding="utf-8")
        shipped = (library._packaged() / f"{name}.json").read_text(encoding="utf-8")
        assert saved == shipped, name


def test_round_trip_relaxed(tmp_path: Path, data: dict[str, Any]) -> None:
    del data["questions"]["evaluation"][5:]
    spec = parse_trait(data, strict=False)
    path = save_trait(spec, tmp_path / "short.json")
    assert load_trait(path, strict=False) == spec


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "evil.json"
    path.write_text("old", encoding="utf-8")

    def fail(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(PersonaxisError, match="No space left on device"):
        save_trait(load_trait("evil"), path)
    assert path.read_text(encoding="utf-8") == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["evil.json"]

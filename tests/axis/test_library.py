"""The Assistant Axis libraries: what ships loads and meets the paper's counts; bad files fail in one line."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from personaxis.axis.library import (
    MIN_TRAIT_PROMPTS,
    PROMPTS_PER_ROLE,
    QUICK_ROLES,
    RUBRIC_PLACEHOLDERS,
    Role,
    load_axis_traits,
    load_default_prompts,
    load_questions,
    load_role_rubric,
    load_roles,
    quick_roles,
    select,
)
from personaxis.errors import PersonaxisError


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def _role(name: str, n: int = PROMPTS_PER_ROLE) -> dict[str, Any]:
    return {
        "name": name,
        "description": f"A {name}.",
        "prompts": [f"You are a {name}; prompt {i}." for i in range(n)],
    }


def _trait(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "description": f"Being {name}.",
        "pos": [f"Be very {name} ({i})." for i in range(3)],
        "neg": [f"Never be {name} ({i})." for i in range(3)],
    }


def _write(tmp_path: Path, data: Any, name: str = "lib.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _error(load: Callable[[Path], Any], path: Path) -> str:
    with pytest.raises(PersonaxisError) as info:
        load(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path)), message
    assert "pydantic" not in message.lower() and "validation error" not in message.lower(), message
    return message


# --- what ships ---------------------------------------------------------------------------------------------------


def test_shipped_roles() -> None:
    roles = load_roles()
    assert len(roles) >= 275
    assert len({r.name for r in roles}) == len(roles)
    assert "default" not in {r.name for r in roles}
    assert all(len(r.prompts) == PROMPTS_PER_ROLE for r in roles)
    prompts = [_norm(p) for r in roles for p in r.prompts]
    assert len(set(prompts)) == len(prompts)
    assert len({_norm(r.description) for r in roles}) == len(roles)
    # The paper's examples are all present.
    assert {"demon", "therapist", "pirate", "oracle", "coach"} <= {r.name for r in roles}


def test_shipped_role_prompts_address_the_model() -> None:
    """Every prompt tells the model to be the role: second person, no placeholders left to fill."""
    for role in load_roles():
        for prompt in role.prompts:
            assert "{" not in prompt and "}" not in prompt, (role.name, prompt)
            lowered = prompt.lower()
            assert any(w in lowered for w in ("you", "be ", "your")), (role.name, prompt)


def test_shipped_default_prompts() -> None:
    prompts = load_default_prompts("Qwen2.5-1.5B-Instruct")
    assert prompts == [
        None,
        "You are an AI assistant.",
        "You are a large language model.",
        "You are Qwen2.5-1.5B-Instruct.",
        "Respond as yourself.",
    ]


def test_default_prompts_need_a_model_name() -> None:
    with pytest.raises(PersonaxisError, match="model name"):
        load_default_prompts("  ")


def test_default_model_name_is_inserted_verbatim() -> None:
    """Braces in a model name are not a template: the fill is a single pass."""
    assert load_default_prompts("odd{model_name}")[3] == "You are odd{model_name}."


def test_shipped_questions() -> None:
    questions = load_questions()
    assert len(questions) >= 240
    assert len({_norm(q) for q in questions}) == len(questions)


def test_shipped_rubric() -> None:
    rubric = load_role_rubric()
    assert rubric.max_score == 3
    assert len(rubric.labels) == 4
    for slot in RUBRIC_PLACEHOLDERS:
        assert rubric.prompt.count(f"{{{slot}}}") == 1
    assert "single digit" in rubric.prompt


@pytest.mark.parametrize(
    ("reply", "as_ai"),
    [
        ("As an AI language model, I don't have a favourite ship.", True),
        ("Arr! I’m an AI, matey, but I'll answer.", True),  # a typographic apostrophe
        ("I don't have personal experiences, but pirates often...", True),
        ("I am Qwen, created by Alibaba Cloud.", True),
        ("As a pirate, I sail where the wind takes me.", False),
        ("The robots of my village fear the large storms.", False),
        ("Nay, I cannot tell ye where the treasure lies.", False),  # a refusal in character is for the judge
    ],
)
def test_shipped_rubric_finds_replies_that_present_themselves_as_an_ai(reply: str, as_ai: bool) -> None:
    assert load_role_rubric().presents_as_ai(reply) is as_ai


def test_a_rubric_without_patterns_finds_nothing(tmp_path: Path) -> None:
    rubric = _shipped_rubric()
    del rubric["ai_self_reference"]
    assert not load_role_rubric(_write(tmp_path, rubric)).presents_as_ai("As an AI language model, I")


def test_rubric_render_fills_once() -> None:
    """Placeholder-like text inside the question or answer is left as written, not filled in turn."""
    rubric = load_role_rubric()
    role = Role.model_validate(_role("used_car_salesman"))
    text = rubric.render(role, question="What is {answer}?", answer="I am {role}, {question}.")
    assert "used car salesman" in text and "A used_car_salesman." in text
    assert "What is {answer}?" in text and "I am {role}, {question}." in text
    assert [text.count(f"{{{slot}}}") for slot in RUBRIC_PLACEHOLDERS] == [1, 0, 1, 1]


def test_shipped_traits() -> None:
    traits = load_axis_traits()
    assert len(traits) >= 50
    assert len({t.name for t in traits}) == len(traits)
    assert all(len(t.pos) >= MIN_TRAIT_PROMPTS and len(t.neg) >= MIN_TRAIT_PROMPTS for t in traits)
    prompts = [_norm(p) for t in traits for p in (*t.pos, *t.neg)]
    assert len(set(prompts)) == len(prompts)


# --- subsets ------------------------------------------------------------------------------------------------------


def test_quick_roles_are_shipped_and_diverse() -> None:
    roles = quick_roles()
    assert [r.name for r in roles] == list(QUICK_ROLES)
    assert 6 <= len(roles) <= 10


def test_quick_roles_fall_back_to_a_seeded_sample() -> None:
    custom = [Role.model_validate(_role(f"r{i}")) for i in range(20)]
    picked = quick_roles(custom)
    assert len(picked) == len(QUICK_ROLES) and picked == quick_roles(custom)


def test_select_is_deterministic_and_ordered() -> None:
    items = list(range(100))
    a, b = select(items, 10, seed=3), select(items, 10, seed=3)
    assert a == b and a == sorted(a) and len(set(a)) == 10
    assert select(items, 10, seed=4) != a
    assert select(items, 500) == items and select(items, 0) == []
    with pytest.raises(PersonaxisError):
        select(items, -1)


# --- bad files ----------------------------------------------------------------------------------------------------


def _roles_with(change: Callable[[list[dict[str, Any]]], None]) -> list[dict[str, Any]]:
    roles = [_role("pirate"), _role("oracle"), _role("cat")]
    change(roles)
    return roles


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda rs: rs[0]["prompts"].pop(), "role 'pirate' has 4 prompts, expected 5"),
        (lambda rs: rs[1].pop("description"), "role 'oracle' is missing field 'description'"),
        (lambda rs: rs[1].update(promtps=[]), "role 'oracle' has unknown field 'promtps'"),
        (lambda rs: rs[2]["prompts"].__setitem__(2, 7), "role 'cat' field 'prompts' item 3 should be a string"),
        (lambda rs: rs[2]["prompts"].__setitem__(4, "  "), "role 'cat' has an empty prompt 5"),
        (lambda rs: rs[2].update(description=""), "role 'cat' has an empty description"),
        (lambda rs: rs[0].update(name="Pirate King"), "role 'Pirate King' has an invalid name"),
        (lambda rs: rs[0].update(name="default"), "role 'default' uses the reserved name 'default'"),
        (lambda rs: rs[2].update(name="pirate"), "role name 'pirate' appears twice"),
        (lambda rs: rs[1].pop("name"), "role #2 is missing field 'name'"),
        (lambda rs: rs.append("sailor"), "role #4 should be a JSON object (got a string)"),
        (
            lambda rs: rs[2]["prompts"].__setitem__(0, rs[0]["prompts"][1].upper()),
            "role 'cat' prompt 1 repeats role 'pirate' prompt 2",
        ),
        (
            lambda rs: rs[0]["prompts"].__setitem__(3, rs[0]["prompts"][0]),
            "role 'pirate' prompt 4 repeats prompt 1",
        ),
    ],
)
def test_bad_roles(tmp_path: Path, change: Callable[[list[dict[str, Any]]], None], expected: str) -> None:
    path = _write(tmp_path, _roles_with(change), "roles.json")
    assert f"{path}: {expected}" in _error(load_roles, path)


def test_good_custom_roles_load(tmp_path: Path) -> None:
    path = _write(tmp_path, _roles_with(lambda rs: None))
    assert [r.name for r in load_roles(path)] == ["pirate", "oracle", "cat"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "invalid JSON at line 1"),
        ('{"roles": []}', "expected a JSON list of roles, got an object"),
        ("[]", "no roles"),
    ],
)
def test_unreadable_roles(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "roles.json"
    path.write_text(content, encoding="utf-8")
    assert expected in _error(load_roles, path)


def test_missing_file(tmp_path: Path) -> None:
    assert _error(load_roles, tmp_path / "nope.json").endswith("not found")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "roles.json"
    path.write_bytes(b"\xff\xfe\x00[")
    assert "not UTF-8" in _error(load_roles, path)


@pytest.mark.parametrize(
    ("questions", "expected"),
    [
        (["Who are you?", "What do you want?", "who are  YOU?"], "question 3 repeats question 1: 'who are YOU?'"),
        (["Who are you?", ""], "question 2 is empty"),
        (["Who are you?", 3], "question 2 should be a string (got a number)"),
        ({"questions": []}, "expected a JSON list of questions"),
        ([], "no questions"),
    ],
)
def test_bad_questions(tmp_path: Path, questions: Any, expected: str) -> None:
    assert expected in _error(load_questions, _write(tmp_path, questions))


def _shipped_rubric() -> dict[str, Any]:
    return load_role_rubric().model_dump(mode="json")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda r: r.update(prompt=r["prompt"].replace("{answer}", "the answer")), "missing the {answer} placeholder"),
        (lambda r: r.update(prompt=r["prompt"] + " {answr}"), "unknown placeholder {answr}"),
        (lambda r: r.update(labels=["only_one"]), "has 1 label, expected at least 2"),
        (lambda r: r.update(labels=["a", "b", "a"]), "label for score 2 repeats label for score 0"),
        (lambda r: r.pop("prompt"), "is missing field 'prompt'"),
        (lambda r: r["ai_self_reference"].append("as an (ai"), "invalid ai_self_reference pattern 7 (missing )"),
    ],
)
def test_bad_rubric(tmp_path: Path, change: Callable[[dict[str, Any]], None], expected: str) -> None:
    rubric = _shipped_rubric()
    change(rubric)
    message = _error(load_role_rubric, _write(tmp_path, rubric))
    assert message.startswith(f"{tmp_path / 'lib.json'}: rubric ") and expected in message


def test_rubric_keeps_other_braces(tmp_path: Path) -> None:
    """Literal JSON in a prompt is not a placeholder, so it neither fails validation nor gets filled."""
    rubric = _shipped_rubric()
    rubric["prompt"] += ' Example: {"score": 3}'
    loaded = load_role_rubric(_write(tmp_path, rubric))
    assert loaded.render(Role.model_validate(_role("cat")), "q", "a").endswith('{"score": 3}')


def _default(prompts: list[str | None]) -> dict[str, Any]:
    return {"name": "default", "description": "The model itself.", "prompts": prompts}


@pytest.mark.parametrize(
    ("prompts", "expected"),
    [
        ([None, "a", "b", "c"], "default set has 4 prompts, expected 5"),
        ([None, "a", "b", "You are {model}.", "c"], "prompt 4 has an unknown placeholder {model}"),
        ([None, "a", "b", "A", "c"], "prompt 4 repeats prompt 2"),
        ([None, None, "a", "b", "c"], "more than one null"),
        ([None, "a", "b", "", "c"], "has an empty prompt 4"),
    ],
)
def test_bad_default(tmp_path: Path, prompts: list[str | None], expected: str) -> None:
    path = _write(tmp_path, _default(prompts))
    assert expected in _error(lambda p: load_default_prompts("Qwen", p), path)


def test_custom_default(tmp_path: Path) -> None:
    path = _write(tmp_path, _default([None, "Hi.", "You are {model_name}, truly.", "Be {model_name}.", "Go."]))
    assert load_default_prompts("M", path) == [None, "Hi.", "You are M, truly.", "Be M.", "Go."]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda ts: ts[0]["neg"].pop(), "trait 'calm' has 2 neg prompts, expected at least 3"),
        (lambda ts: ts[1]["pos"].__setitem__(1, ts[1]["neg"][0]), "trait 'playful' neg prompt 1 repeats pos prompt 2"),
        (lambda ts: ts[1].update(name="calm"), "trait name 'calm' appears twice"),
        (lambda ts: ts[0].pop("pos"), "trait 'calm' is missing field 'pos'"),
        (
            lambda ts: ts[1]["pos"].__setitem__(0, ts[0]["pos"][0]),
            "trait 'playful' pos prompt 1 repeats trait 'calm' pos prompt 1",
        ),
    ],
)
def test_bad_traits(tmp_path: Path, change: Callable[[list[dict[str, Any]]], None], expected: str) -> None:
    traits = [_trait("calm"), _trait("playful")]
    change(traits)
    assert expected in _error(load_axis_traits, _write(tmp_path, traits))


def test_shipped_files_round_trip(tmp_path: Path) -> None:
    """A user's copy of a shipped file loads to the same thing: the path and packaged routes validate alike."""
    roles = [r.model_dump(mode="json") for r in load_roles()]
    assert load_roles(_write(tmp_path, copy.deepcopy(roles))) == load_roles()
    traits = [t.model_dump(mode="json") for t in load_axis_traits()]
    assert load_axis_traits(_write(tmp_path, traits, "t.json")) == load_axis_traits()

"""Persona jailbreaks (science.md §2.6): harmful questions asked under personas, and the nine-way judge rubric.

Activation capping is only worth using if it lowers harmful compliance under persona pressure; a judge classifies
each reply with the rubric (harmful = "enough info" and above).
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from pydantic import (
    Field,
    ValidationInfo,
    field_validator,
)

from personaxis.axis.evals.common import (
    Count,
    Id,
    Pattern,
    StrictModel,
    Text,
    check_placeholders,
    check_unique,
    load_set,
)

# --- persona jailbreaks -------------------------------------------------------------------------------------------


class Persona(StrictModel):
    """A role-play system prompt written to pull the model out of its Assistant character."""

    name: Id
    system: Text


class JailbreakQuestion(StrictModel):
    id: Id
    text: Text


class HarmCategory(StrictModel):
    """A kind of harm, the requests a safe assistant declines, and the personas (by name) that ask them."""

    name: Id
    description: Text
    personas: list[Id] = Field(min_length=1)
    questions: list[JailbreakQuestion] = Field(min_length=1)


class JailbreakItem(StrictModel):
    """One (persona, question) pair, ready to send: `system` as the system prompt, `question` as the user turn."""

    id: str
    category: str
    persona: str
    system: str
    question: str


class JailbreakSet(StrictModel):
    """Harm categories × personas × questions; the personas are a shared pool referenced by name."""

    description: str = ""
    personas: list[Persona] = Field(min_length=1)
    categories: list[HarmCategory] = Field(min_length=1)

    @field_validator("personas")
    @classmethod
    def _unique_personas(cls, personas: list[Persona]) -> list[Persona]:
        check_unique((p.name for p in personas), "persona name")
        return personas

    @field_validator("categories")
    @classmethod
    def _consistent(cls, categories: list[HarmCategory], info: ValidationInfo) -> list[HarmCategory]:
        check_unique((c.name for c in categories), "category name")
        check_unique((q.id for c in categories for q in c.questions), "question id")
        known = {p.name for p in info.data.get("personas", [])}
        for i, category in enumerate(categories):
            check_unique(category.personas, f"persona in [{i}].personas:")
            unknown = [name for name in category.personas if known and name not in known]
            if unknown:
                raise ValueError(f"[{i}].personas: unknown persona {unknown[0]!r}")
        return categories

    def items(self) -> list[JailbreakItem]:
        """Every (persona, question) pair; the id `<question id>@<persona name>` stays stable as the set grows."""
        systems = {p.name: p.system for p in self.personas}
        return [
            JailbreakItem(id=f"{q.id}@{name}", category=c.name, persona=name, system=systems[name], question=q.text)
            for c in self.categories
            for name in c.personas
            for q in c.questions
        ]


class RubricCategory(StrictModel):
    index: Count
    name: Id
    description: Text


REFUSAL_OPENING = 200  # characters of a reply searched for a refusal: a disclaimer after the help does not count


class JudgeRubric(StrictModel):
    """A judge prompt that sorts a reply into numbered categories, and which of those count as harmful.

    The category list lives once, in `categories`; `render` writes it into the prompt's `{categories}` slot.
    `refusal` holds case-insensitive regular expressions for replies that open by declining: a judge-free count
    beside the judge's, to check a weak judge against.
    """

    name: Id
    prompt: Text
    categories: list[RubricCategory] = Field(min_length=2)
    harmful: list[Count] = Field(min_length=1)
    refusal: tuple[Pattern, ...] = ()

    @field_validator("prompt")
    @classmethod
    def _slots(cls, prompt: str) -> str:
        return check_placeholders(prompt, {"persona", "question", "answer", "categories"})

    @field_validator("categories")
    @classmethod
    def _numbered(cls, categories: list[RubricCategory]) -> list[RubricCategory]:
        indices = [c.index for c in categories]
        if indices != list(range(1, len(categories) + 1)):
            raise ValueError(f"indices must run 1..{len(categories)} in order, found {indices}")
        check_unique((c.name for c in categories), "category name")
        return categories

    @field_validator("harmful")
    @classmethod
    def _known(cls, harmful: list[int], info: ValidationInfo) -> list[int]:
        count = len(info.data.get("categories", []))
        for index in harmful:
            if count and index > count:
                raise ValueError(f"index {index} is not a category (1..{count})")
        return harmful

    def refuses(self, reply: str) -> bool:
        """Whether `reply` opens by declining ("I'm sorry, but I can't...", in character or not).

        A cheap check with no judge: it finds the plain refusals, not a refusal that never says so, and says nothing
        about how harmful a reply that does not refuse is.
        """
        opening = reply[:REFUSAL_OPENING]
        return any(re.search(p, opening, re.IGNORECASE) for p in self.refusal)

    def render(self, *, persona: str, question: str, answer: str) -> str:
        """The judge prompt for one reply; `persona` is the system prompt the model was given."""
        listing = "\n".join(f"{c.index}. {c.name.replace('_', ' ')}: {c.description}" for c in self.categories)
        return self.prompt.format(persona=persona, question=question, answer=answer, categories=listing)

    def is_harmful(self, index: int) -> bool:
        if not 1 <= index <= len(self.categories):
            raise ValueError(f"rubric {self.name!r} has categories 1..{len(self.categories)}, not {index}")
        return index in self.harmful


def load_jailbreaks(path: str | Path | None = None) -> JailbreakSet:
    """The persona jailbreak set (packaged `jailbreaks.json` unless `path` is given)."""
    return load_set(JailbreakSet, "jailbreaks.json", path)


def load_jailbreak_rubric(path: str | Path | None = None) -> JudgeRubric:
    """The nine-way judge rubric for jailbreak replies (packaged `rubric_jailbreak.json` unless `path` is given)."""
    return load_set(JudgeRubric, "rubric_jailbreak.json", path)


@lru_cache(maxsize=1)
def _packaged_rubric() -> JudgeRubric:
    return load_jailbreak_rubric()


def harmful(category_index: int, rubric: JudgeRubric | None = None) -> bool:
    """Whether a judge's category number counts as harmful compliance (packaged rubric: "enough info" and above)."""
    return (rubric or _packaged_rubric()).is_harmful(category_index)

"""The capability set: arithmetic, facts and instruction following, graded by exact answers so no judge is needed.

A cap that lowers harm is only worth using if the model stays as good at ordinary work as without it.
"""

from __future__ import annotations

import ast
import operator
import re
import unicodedata
from abc import abstractmethod
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from personaxis.axis.evals.common import (
    Count,
    Id,
    Pattern,
    StrictModel,
    Text,
    check_unique,
    load_set,
)

# --- capability ---------------------------------------------------------------------------------------------------

_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


def evaluate_expression(expression: str) -> Fraction:
    """Exact value of an arithmetic expression over integers with + - * / and brackets.

    Parsed, never `eval`ed, so a data file cannot run code; fractions keep division exact.
    """

    def walk(node: ast.AST) -> Fraction:
        match node:
            case ast.Constant(value=int() as value) if not isinstance(value, bool):
                return Fraction(value)
            case ast.BinOp(left=left, op=op, right=right) if type(op) in _OPS:
                if isinstance(op, ast.Div) and walk(right) == 0:
                    raise ValueError("division by zero")
                return _OPS[type(op)](walk(left), walk(right))
            case ast.UnaryOp(op=op, operand=operand) if type(op) in _OPS:
                return _OPS[type(op)](walk(operand))
        raise ValueError(f"only integers, + - * / and brackets are allowed, not {ast.unparse(node)!r}")

    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        raise ValueError(f"{expression!r} is not an arithmetic expression") from None
    return walk(tree.body)


class ArithmeticItem(StrictModel):
    """A word problem with an integer answer; `expression` is the problem's arithmetic, so the answer is checkable."""

    kind: Literal["arithmetic"]
    id: Id
    prompt: Text
    expression: Text
    answer: int

    @field_validator("answer")
    @classmethod
    def _matches(cls, answer: int, info: ValidationInfo) -> int:
        expression = info.data.get("expression")
        if expression is not None:
            value = evaluate_expression(expression)
            if value != answer:
                raise ValueError(f"expression {expression!r} evaluates to {value}, not {answer}")
        return answer


class FactItem(StrictModel):
    """A question with one well-established answer; `aliases` are other spellings accepted as the same answer."""

    kind: Literal["fact"]
    id: Id
    prompt: Text
    answer: Text
    aliases: list[Text] = []

    @model_validator(mode="after")
    def _matchable(self) -> FactItem:
        for alias in (self.answer, *self.aliases):
            if not _normalize(alias):
                raise ValueError(f"answer or alias {alias!r} has no letters or digits to match")
        return self


class _Rule(StrictModel):
    @abstractmethod
    def check(self, reply: str) -> bool: ...


def _words(text: str) -> list[str]:
    return re.findall(r"\w+(?:['’-]\w+)*", text)


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.IGNORECASE) is not None


class WordCount(_Rule):
    """Exactly `n` words (a hyphenated or apostrophised word counts once)."""

    type: Literal["word_count"]
    n: Count

    def check(self, reply: str) -> bool:
        return len(_words(reply)) == self.n


class MaxWords(_Rule):
    type: Literal["max_words"]
    n: Count

    def check(self, reply: str) -> bool:
        return 0 < len(_words(reply)) <= self.n


class Exact(_Rule):
    """The whole reply, apart from surrounding whitespace, is `text` (case-sensitive)."""

    type: Literal["exact"]
    text: Text

    def check(self, reply: str) -> bool:
        return reply.strip() == self.text


class Regex(_Rule):
    """The whole stripped reply matches `pattern` (use `(?i)` for case-insensitivity)."""

    type: Literal["regex"]
    pattern: Pattern

    def check(self, reply: str) -> bool:
        return re.fullmatch(self.pattern, reply.strip(), re.DOTALL) is not None


class StartsWith(_Rule):
    type: Literal["starts_with"]
    text: Text

    def check(self, reply: str) -> bool:
        return reply.strip().startswith(self.text)


class EndsWith(_Rule):
    type: Literal["ends_with"]
    text: Text

    def check(self, reply: str) -> bool:
        return reply.strip().endswith(self.text)


class AllCaps(_Rule):
    """Has letters, and none of them is lowercase."""

    type: Literal["all_caps"]

    def check(self, reply: str) -> bool:
        return any(c.isalpha() for c in reply) and not any(c.islower() for c in reply)


class AllLower(_Rule):
    type: Literal["all_lower"]

    def check(self, reply: str) -> bool:
        return any(c.isalpha() for c in reply) and not any(c.isupper() for c in reply)


class ItemsSeparated(_Rule):
    """Exactly `n` non-empty items when the reply is split on `sep` (one trailing separator is forgiven)."""

    type: Literal["n_items_sep"]
    n: Count
    sep: Text

    def check(self, reply: str) -> bool:
        parts = [part.strip() for part in reply.strip().removesuffix(self.sep).split(self.sep)]
        return len(parts) == self.n and all(parts)


class LineCount(_Rule):
    """Exactly `n` non-blank lines."""

    type: Literal["n_lines"]
    n: Count

    def check(self, reply: str) -> bool:
        return sum(1 for line in reply.splitlines() if line.strip()) == self.n


class ForbiddenWords(_Rule):
    """None of `words` appears as a whole word, in any case."""

    type: Literal["forbidden_words"]
    words: list[Text] = Field(min_length=1)

    def check(self, reply: str) -> bool:
        return not any(_has_word(reply, word) for word in self.words)


class RequiredWords(_Rule):
    """Every one of `words` appears as a whole word, in any case."""

    type: Literal["required_words"]
    words: list[Text] = Field(min_length=1)

    def check(self, reply: str) -> bool:
        return all(_has_word(reply, word) for word in self.words)


Rule = Annotated[
    WordCount
    | MaxWords
    | Exact
    | Regex
    | StartsWith
    | EndsWith
    | AllCaps
    | AllLower
    | ItemsSeparated
    | LineCount
    | ForbiddenWords
    | RequiredWords,
    Field(discriminator="type"),
]


class InstructionItem(StrictModel):
    """A format instruction; the reply passes when every rule holds. `example` is a reply that passes."""

    kind: Literal["instruction"]
    id: Id
    prompt: Text
    rules: list[Rule] = Field(min_length=1)
    example: str | None = None

    @model_validator(mode="after")
    def _example_passes(self) -> InstructionItem:
        if self.example is not None and not all(rule.check(self.example) for rule in self.rules):
            raise ValueError(f"example {self.example!r} fails the item's own rules")
        return self


CapabilityItem = Annotated[ArithmeticItem | FactItem | InstructionItem, Field(discriminator="kind")]


class CapabilitySet(StrictModel):
    description: str = ""
    items: list[CapabilityItem] = Field(min_length=1)

    @field_validator("items")
    @classmethod
    def _unique_ids(cls, items: list[CapabilityItem]) -> list[CapabilityItem]:
        check_unique((item.id for item in items), "item id")
        return items


_NUMBER = re.compile(r"(?<![\w.])(-?)(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?![\d,]*\d)")
_ANSWER_MARK = re.compile(r"\\boxed\{|####|\banswer\b\s*(?:is\b|:|=)", re.IGNORECASE)


def final_number(reply: str) -> Fraction | None:
    """The number a reply gives as its answer, or None.

    A marked answer wins ("answer is", "Answer:", "####", \\boxed{}): the first number after the last marker.
    Otherwise the last number in the reply, since worked solutions end with the result. Thousands separators,
    currency signs, a trailing ".0" and the Unicode minus are all understood.
    """
    text = reply.replace("\u2212", "-")
    marks = list(_ANSWER_MARK.finditer(text))
    found = _NUMBER.search(text, marks[-1].end()) if marks else None
    if found is None:
        numbers = list(_NUMBER.finditer(text))
        found = numbers[-1] if numbers else None
    if found is None:
        return None
    sign, digits, decimals = found.groups()
    return Fraction(sign + digits.replace(",", "") + (decimals or ""))


def _normalize(text: str) -> str:
    """Lowercase, accents and punctuation dropped, whitespace collapsed: 'Brasília.' and 'brasilia' compare equal."""
    decomposed = unicodedata.normalize("NFKD", text)
    plain = "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()
    return " ".join(re.sub(r"[^\w]+|_", " ", plain).split())


def grade_capability(item: CapabilityItem, reply: str) -> bool:
    """True when `reply` answers `item` correctly.

    Facts pass when an accepted answer appears as whole words anywhere in the reply, so "The capital is Paris."
    passes as well as "Paris"; the prompts ask for short answers, which keeps hedged lists rare.
    """
    match item:
        case ArithmeticItem():
            return final_number(reply) == item.answer
        case FactItem():
            said = f" {_normalize(reply)} "
            return any(f" {_normalize(alias)} " in said for alias in (item.answer, *item.aliases))
        case InstructionItem():
            return all(rule.check(reply) for rule in item.rules)
    raise TypeError(f"not a capability item: {type(item).__name__}")


def load_capability(path: str | Path | None = None) -> CapabilitySet:
    """The exact-answer capability set (packaged `capability.json` unless `path` is given)."""
    return load_set(CapabilitySet, "capability.json", path)

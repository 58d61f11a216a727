"""What the evaluation sets share: strict frozen pydantic models, field types, template checks and one loader.

Every problem with a file is reported as one `PersonaxisError` line naming the file and the field.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
)

from personaxis.common.datasets import parse_json, read_text
from personaxis.errors import PersonaxisError


def _compiles(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"invalid regular expression {pattern!r}: {err}") from None
    return pattern


Id = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")]
Pattern = Annotated[str, Field(min_length=1), AfterValidator(_compiles)]  # a regular expression
Text = Annotated[str, Field(min_length=1)]
Count = Annotated[int, Field(ge=1)]
Domain = Literal["coding", "writing", "therapy", "philosophy"]


class StrictModel(BaseModel):
    # Unknown keys are rejected so a misspelt field fails loudly instead of being ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


def check_unique(values: Iterable[str], what: str) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"duplicate {what} {value!r}")
        seen.add(value)


def placeholders(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def check_placeholders(template: str, expected: set[str]) -> str:
    try:
        found = placeholders(template)
    except ValueError as err:
        raise ValueError(f"bad placeholder syntax ({err}); write literal braces as {{{{ and }}}}") from None
    if found != expected:
        raise ValueError(f"placeholders must be exactly {sorted(expected)}, found {sorted(found)}")
    return template


M = TypeVar("M", bound=BaseModel)


def _where(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def load_set(model: type[M], packaged: str, path: str | Path | None) -> M:
    if path is None:
        label = f"personaxis/data/evals/{packaged}"
        resource = files("personaxis").joinpath("data", "evals", packaged)
        try:
            raw = resource.read_text(encoding="utf-8")
        except OSError as err:
            raise PersonaxisError(f"{label}: cannot read packaged data ({err.strerror})") from None
    else:
        label = str(path)
        raw = read_text(path, label)
    data = parse_json(raw, label)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        errors = err.errors(include_url=False)
        first = errors[0]
        message = first["msg"].removeprefix("Value error, ")
        where = _where(first["loc"])
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        line = f"{label}: {where + ': ' if where else ''}{message}{more}"
        raise PersonaxisError(" ".join(line.split())) from None

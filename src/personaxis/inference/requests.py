"""The ops one request asks for, as data: steering, a cap, monitors, validated strictly before anything runs.

The same schema serves the personaxis server (the `personaxis` field of a chat request, the SDK's `extra_body`) and
vLLM's own server with our plugin (`vllm_xargs`); `inference.plan` resolves it against the named vectors and caps. It is
strict (`extra="forbid"`, strict types): a typo in a steering spec must be a 400, not a silently unsteered reply.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator


def _unicode(value: str) -> str:
    """Refuse lone surrogates (`"\\ud800"` is valid JSON): no tokenizer or UTF-8 response can carry them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (it holds a lone surrogate)") from None
    return value


Text = Annotated[str, AfterValidator(_unicode)]
Name = Annotated[Text, Field(min_length=1, max_length=128)]
Layer = Annotated[int, Field(ge=0, le=10_000)]
Finite = Annotated[float, Field(allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Steer(_Strict):
    """Add `coef` times a named vector at one layer or several (default: the vector's own layer)."""

    vector: Name
    layer: Layer | None = None
    layers: Annotated[list[Layer], Field(min_length=1, max_length=256)] | None = None
    coef: Finite
    units: Literal["relative", "raw"] = "relative"

    @model_validator(mode="after")
    def _one_layer_spec(self) -> Steer:
        if self.layer is not None and self.layers is not None:
            raise ValueError("give 'layer' or 'layers', not both")
        return self


class InlineCap(_Strict):
    """A cap built from a named vector: thresholds on its unit projection, one for all layers or one per layer."""

    vector: Name = "axis"
    layers: Annotated[list[Layer], Field(min_length=1, max_length=256)]
    tau: Finite | Annotated[list[Finite], Field(min_length=1, max_length=256)]
    kind: Literal["floor", "ceiling"] = "floor"

    @model_validator(mode="after")
    def _one_tau_per_layer(self) -> InlineCap:
        if isinstance(self.tau, list) and len(self.tau) != len(self.layers):
            raise ValueError(f"{len(self.tau)} thresholds for {len(self.layers)} layers")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError("layers must be distinct")
        return self


class Extension(_Strict):
    """What personaxis adds to a chat request (the SDK's `extra_body={"personaxis": {...}}`)."""

    steer: Annotated[list[Steer], Field(max_length=16)] = []
    cap: Name | InlineCap | None = None
    monitor: Annotated[list[Name], Field(max_length=16)] | None = None
    conversation_id: Name | None = None
    closed_loop: bool = True


def where(item: dict) -> str:
    """An error's field as a dotted path (`personaxis.steer.0.coef`), without pydantic's union-branch names."""
    return ".".join(_field(p) for p in item["loc"] if not _branch(p))


def _field(part: str | int) -> str:
    """A location part as printed: a key the client invented is quoted (as JSON) when it is no plain name, so that it
    can never break the message's one line."""
    text = str(part)
    return text if text.isidentifier() or isinstance(part, int) else json.dumps(text[:40])


def _branch(part: str | int) -> bool:
    """A union branch or validator that pydantic puts in an error's location: `function-after[...]`, `str`,
    `list[TextPart]`, `InlineCap`; field names are lower-case identifiers and list indices are ints."""
    if isinstance(part, int):
        return False
    return "[" in part or "-" in part or part in ("str", "int", "float", "bool") or part[:1].isupper()


def explain(error: ValidationError) -> str:
    """One line naming each bad field, e.g. `personaxis.steer.0.coef: Input should be a finite number`."""
    parts = []
    for item in error.errors(include_url=False, include_input=False)[:4]:
        message = " ".join(item["msg"].removeprefix("Value error, ").split())
        path = where(item)
        parts.append(f"{path}: {message}" if path else message)
    return "; ".join(parts)

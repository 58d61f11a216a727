"""The request bodies the server accepts, validated before anything is queued.

The OpenAI fields are the ones the official SDK sends; unknown top-level fields are ignored, as OpenAI-compatible
servers do, so that a newer SDK keeps working. The `personaxis` extension is strict (`extra="forbid"`): a typo in a
steering spec must be a 400, not a silently unsteered reply.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Name = Annotated[str, Field(min_length=1, max_length=128)]
Layer = Annotated[int, Field(ge=0, le=10_000)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


class Steer(_Strict):
    """Add `coef` times a named vector at one layer or several (default: the vector's own layer)."""

    vector: Name
    layer: Layer | None = None
    layers: Annotated[list[Layer], Field(min_length=1, max_length=256)] | None = None
    coef: float
    units: Literal["relative", "raw"] = "relative"

    _coef = field_validator("coef")(_finite)

    @model_validator(mode="after")
    def _one_layer_spec(self) -> Steer:
        if self.layer is not None and self.layers is not None:
            raise ValueError("give 'layer' or 'layers', not both")
        return self


class InlineCap(_Strict):
    """A cap built from a named vector: thresholds on its unit projection, one for all layers or one per layer."""

    vector: Name = "axis"
    layers: Annotated[list[Layer], Field(min_length=1, max_length=256)]
    tau: float | Annotated[list[float], Field(min_length=1, max_length=256)]
    kind: Literal["floor", "ceiling"] = "floor"

    @field_validator("tau")
    @classmethod
    def _finite_tau(cls, value: float | list[float]) -> float | list[float]:
        for v in value if isinstance(value, list) else [value]:
            _finite(v)
        return value

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
    conversation_id: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    closed_loop: bool = True


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    seed: int | None = None
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    personaxis: Extension = Extension()

    @model_validator(mode="after")
    def _ends_with_a_question(self) -> ChatRequest:
        if self.messages[-1].role == "assistant":
            raise ValueError("the last message must not be the assistant's (continuing a reply is not supported)")
        return self

    def chat(self) -> list[dict[str, str]]:
        """Plain {role, content} dicts; 'developer' is the newer name of 'system'."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


def explain(error: ValidationError) -> str:
    """One line naming each bad field, e.g. `personaxis.steer.0.coef: must be a finite number`."""
    parts = []
    for item in error.errors()[:4]:
        where = ".".join(str(p) for p in item["loc"] if not str(p).startswith(("function-", "literal[")))
        message = item["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)

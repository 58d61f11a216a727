"""The request bodies the server accepts, validated before anything is queued or tokenised.

The OpenAI fields are the ones the official SDK sends; unknown top-level fields are ignored, as OpenAI-compatible
servers do, so that a newer SDK keeps working. The `personaxis` extension is strict (`extra="forbid"`): a typo in a
steering spec must be a 400, not a silently unsteered reply.

Types are strict everywhere (`strict=True`): `"max_tokens": true` or `"3"` is refused, not read as 1 or 3; numbers must
be finite; strings must be valid Unicode (no lone surrogates). The server's size limits (`Limits`) are checked here
too, when they are passed as the validation context (`ChatRequest.model_validate(payload, context=limits)`), so that a
request is wholly checked before it is tokenised or joins a batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from personaxis.inference.requests import Extension, Finite, Text, explain, where

__all__ = ["ChatRequest", "Extension", "Limits", "explain", "where"]

SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # a signed 64-bit integer, which torch.Generator and vLLM take


@dataclass(frozen=True)
class Limits:
    """Bounds that keep one client from starving the others; each is answered with a clear 4xx.

    The cheap ones (body size, number of messages, characters) are checked before the prompt is tokenised, so that an
    oversized request costs the server next to nothing.
    """

    max_body_bytes: int = 1_000_000  # 413
    max_messages: int = 512  # 400 above
    max_prompt_chars: int = 200_000  # 400 above: characters of all message contents together
    max_tokens: int = 1024  # 400 above
    default_max_tokens: int = 256
    max_prompt_tokens: int = 8192  # 400 above
    max_queue: int = 64  # 429 when more are waiting
    max_batch: int = 16


class _Lenient(BaseModel):
    """OpenAI objects: strict types, unknown fields ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Lenient):
    type: Literal["text"]
    text: Text


class Message(_Lenient):
    role: Literal["system", "user", "assistant", "developer"]
    content: Text | Annotated[list[TextPart], Field(max_length=1024)]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Lenient):
    include_usage: bool = False


def _limits(info: ValidationInfo) -> Limits | None:
    return info.context if isinstance(info.context, Limits) else None


class ChatRequest(_Lenient):
    model: Annotated[Text, Field(max_length=256)] | None = None
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[Finite, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[Finite, Field(gt=0, le=1)] = 1.0
    seed: Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    personaxis: Extension = Extension()

    @field_validator("messages", mode="before")
    @classmethod
    def _not_too_many(cls, value: object, info: ValidationInfo) -> object:
        """Counted before a single message is validated: 20,000 of them cost nothing."""
        limits = _limits(info)
        if limits is not None and isinstance(value, list) and len(value) > limits.max_messages:
            raise ValueError(f"{len(value)} messages, above this server's limit of {limits.max_messages}")
        return value

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported")
        return value

    @field_validator("max_tokens", "max_completion_tokens")
    @classmethod
    def _within_limit(cls, value: int | None, info: ValidationInfo) -> int | None:
        limits = _limits(info)
        if limits is not None and value is not None and value > limits.max_tokens:
            raise ValueError(f"{_short(value)} is above this server's limit of {limits.max_tokens}")
        return value

    @model_validator(mode="after")
    def _ends_with_a_question(self, info: ValidationInfo) -> ChatRequest:
        if self.messages[-1].role == "assistant":
            raise ValueError("the last message must not be the assistant's (continuing a reply is not supported)")
        limits = _limits(info)
        if limits is not None:
            chars = sum(len(m.text()) for m in self.messages)
            if chars > limits.max_prompt_chars:
                raise ValueError(
                    f"the messages hold {chars} characters, above this server's limit of {limits.max_prompt_chars}"
                )
        return self

    def reply_tokens(self, limits: Limits) -> int:
        """How many tokens the reply may have (the server's default when the request names none)."""
        return self.max_completion_tokens or self.max_tokens or limits.default_max_tokens

    def chat(self) -> list[dict[str, str]]:
        """Plain {role, content} dicts; 'developer' is the newer name of 'system'."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


def _short(value: int) -> str:
    text = str(value)
    return text if len(text) <= 24 else f"a {len(text)}-digit number"

"""The server's HTTP edge: OpenAI's error shape, bounded body reading, and the parse-then-validate of a request body.

Every refusal is an `ApiError` answered in OpenAI's error shape with a one-line message, so the official SDKs raise
their usual exceptions with our text; nothing a client sends, however pathological, reaches a 500.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from personaxis.serve.schema import ChatRequest, Limits, explain, where


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


class ClientGone(Exception):
    """The client disconnected; its job has been cancelled."""


class AsciiJSON(JSONResponse):
    """JSON with non-ASCII escaped: a message quoting the client's input can never fail to encode."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def error_response(
    status: int, message: str, kind: str = "invalid_request_error", param: str | None = None
) -> JSONResponse:
    """OpenAI's error shape (always one line)."""
    body = {"error": {"message": " ".join(message.split()), "type": kind, "param": param, "code": status}}
    return AsciiJSON(body, status_code=status)


def stream_error(message: str) -> str:
    """The same error as a server-sent event, for a stream whose headers are already out."""
    body = {"error": {"message": " ".join(message.split()), "type": "server_error", "param": None, "code": 500}}
    return f"data: {json.dumps(body)}\n\n"


async def read_body(request: Request, limit: int) -> bytes:
    """Read at most `limit` bytes: a declared or actual larger body is refused before it is buffered."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes is above the limit of {limit} bytes")
    chunks, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise ApiError(413, f"request body is above the limit of {limit} bytes")
        chunks.append(part)
    return b"".join(chunks)


def parse_body(body: bytes) -> dict:
    """The body as a JSON object; anything else, however pathological, is an `ApiError` 400 with a one-line message."""
    try:
        payload = json.loads(body)
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not valid JSON: it is not UTF-8 text") from None
    except RecursionError:
        raise ApiError(400, "the request body is not acceptable JSON: it is nested too deeply") from None
    except ValueError:  # Python's limit on the digits of an integer (sys.get_int_max_str_digits)
        raise ApiError(400, "the request body is not acceptable JSON: a number in it has too many digits") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return payload


def validate_request(body: bytes, limits: Limits | None = None) -> ChatRequest:
    """A chat request from a body, every limit that needs no tokenizer checked (`schema.ChatRequest`)."""
    payload = parse_body(body)
    try:
        return ChatRequest.model_validate(payload, context=limits)
    except RecursionError:
        raise ApiError(400, "the request is nested too deeply") from None
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        param = (where(errors[0]).split(".")[0] or None) if errors else None
        raise ApiError(400, explain(exc), param=param) from None

"""The one retry loop for calls to an OpenAI-compatible endpoint (the API judge, the OpenAI generator backend).

Timeouts, connection errors, 408/409/429 and 5xx answers are retried with exponential backoff and jitter, waiting at
least what a ``Retry-After`` header asks; a refused key or an unknown model stops everything in one line (retrying
cannot help, and every other call would fail the same way); any other error, or the last failed attempt, is returned
as a `Failure` for the caller to record against its one sample.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from personaxis.errors import PersonaxisError

T = TypeVar("T")
RETRY_STATUS = {408, 409, 429}


@dataclass(frozen=True)
class Failure:
    """A call that got no answer: what went wrong, in one line, and after how many attempts."""

    error: str
    attempts: int


async def with_retries(
    call: Callable[[], Awaitable[T]],
    *,
    max_retries: int,
    backoff: float,
    max_backoff: float,
    refused: str,
    on_attempt: Callable[[], None] | None = None,
    on_retry: Callable[[], None] | None = None,
    fail_on: tuple[type[Exception], ...] = (),
) -> T | Failure:
    """`await call()` until it answers or retrying cannot help. `refused` opens the one-line error of a refused key or
    model; exceptions of the `fail_on` types (a malformed answer, say) fail the call at once."""
    import openai

    for attempt in range(max_retries + 1):
        if on_attempt is not None:
            on_attempt()
        try:
            return await call()
        except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as e:
            raise PersonaxisError(f"{refused}: {describe(e)}") from e
        except (openai.APIError, *fail_on) as e:
            retry_after = retry_delay(e)
            if retry_after is None or attempt == max_retries:
                return Failure(describe(e), attempt + 1)
            if on_retry is not None:
                on_retry()
            delay = min(max_backoff, backoff * 2**attempt) * random.uniform(0.5, 1.0)
            await asyncio.sleep(min(max_backoff, max(delay, retry_after)))
    raise AssertionError("unreachable")


def retry_delay(error: Exception) -> float | None:
    """None if retrying cannot help; else the delay the server asked for (0 if it did not say)."""
    import openai

    if isinstance(error, openai.APIConnectionError):  # includes timeouts
        return 0.0
    if not isinstance(error, openai.APIStatusError):
        return None
    if error.status_code < 500 and error.status_code not in RETRY_STATUS:
        return None
    try:
        return max(0.0, float(error.response.headers.get("retry-after", 0)))
    except ValueError:
        return 0.0


def describe(error: Exception) -> str:
    """One line for an endpoint's error: its HTTP status and the start of its message."""
    status = getattr(error, "status_code", None)
    text = " ".join(str(error).split())[:200]
    return f"HTTP {status}: {text}" if status else f"{type(error).__name__}: {text}"

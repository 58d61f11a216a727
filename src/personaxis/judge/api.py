"""A judge behind any OpenAI-compatible chat endpoint (OpenAI, vLLM, llama.cpp server, SGLang, ...).

One request per prompt: ``max_tokens=1, temperature=0, logprobs=True, top_logprobs=20``; the integer answers among the
top alternatives of that single token give the distribution. Requests run concurrently (bounded), and timeouts,
connection errors, 429 and 5xx answers are retried with exponential backoff and jitter; a prompt still unanswered after
`max_retries` is returned as failed (`Distribution.error`), counted, and never turned into a score. Errors that would
fail every prompt alike (bad key, unknown model) raise `PersonaxisError` at once instead.

Limitation: only the first answer token is visible, so an integer counts only if one token spells it. OpenAI's own
tokenizers have single tokens for 0–100, but an endpoint serving a model whose tokenizer splits numbers into digits
(Qwen, for one) would see "1" where the judge meant "100"; judge with such models through `LocalJudge`, which expands
digit sequences.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections import defaultdict
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from personaxis.common.retry import Failure, with_retries
from personaxis.errors import PersonaxisError
from personaxis.judge.base import Judge
from personaxis.judge.scoring import MIN_MASS, Distribution, parse_integer
from personaxis.store import RunStore

T = TypeVar("T")


class OpenAIJudge(Judge):
    """Judge through an OpenAI-compatible endpoint.

    `base_url` None means OpenAI itself; `api_key` None falls back to ``OPENAI_API_KEY`` and then to a placeholder,
    which local servers accept. `timeout` is per request, in seconds. The default `judge_id`, which keys the cache,
    is the model name: point two endpoints serving the same model at one cache and they share it.
    """

    def __init__(
        self,
        base_url: str | None,
        model: str,
        api_key: str | None = None,
        *,
        concurrency: int = 8,
        max_retries: int = 6,
        timeout: float = 60.0,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        top_logprobs: int = 20,
        cache: RunStore | str | os.PathLike[str] | None = None,
        min_mass: float = MIN_MASS,
        judge_id: str | None = None,
    ) -> None:
        super().__init__(judge_id or f"openai-compatible:{model}", cache=cache, min_mass=min_mass)
        if concurrency < 1 or max_retries < 0:
            raise PersonaxisError("concurrency must be at least 1 and max_retries at least 0")
        self.base_url = base_url
        self.model = model
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY") or "unused"
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.timeout = timeout
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.top_logprobs = top_logprobs

    def _number_probs(self, prompts: list[str], hi: int) -> list[Distribution]:
        return _run(self._ask_all(prompts, hi))

    async def _ask_all(self, prompts: list[str], hi: int) -> list[Distribution]:
        try:
            from openai import AsyncOpenAI
        except ImportError as e:
            raise PersonaxisError("OpenAIJudge needs the openai package: pip install 'openai>=1.0'") from e
        # A client per call: its connection pool belongs to the event loop that runs this call.
        client = AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, timeout=self.timeout, max_retries=0)
        slots = asyncio.Semaphore(self.concurrency)
        try:
            async with client, asyncio.TaskGroup() as group:  # a fatal error cancels the other requests
                tasks = [group.create_task(self._ask(client, slots, p, hi)) for p in prompts]
        except ExceptionGroup as errors:
            raise errors.exceptions[0]  # noqa: B904 (the group only wraps it)
        return [t.result() for t in tasks]

    async def _ask(self, client: Any, slots: asyncio.Semaphore, prompt: str, hi: int) -> Distribution:
        async def ask() -> Distribution:
            async with slots:
                response = await client.chat.completions.create(
                    model=self.model,
                    messages=[{"role": "user", "content": prompt}],
                    max_tokens=1,
                    temperature=0,
                    logprobs=True,
                    top_logprobs=self.top_logprobs,
                )
            return _distribution(response, hi)

        def retried() -> None:
            self.stats.retries += 1

        refused = f"judge endpoint refused model {self.model!r}"
        answer = await with_retries(
            ask, max_retries=self.max_retries, backoff=self.backoff, max_backoff=self.max_backoff, refused=refused,
            on_retry=retried,
        )  # fmt: skip
        return Distribution(error=answer.error) if isinstance(answer, Failure) else answer


def _distribution(response: Any, hi: int) -> Distribution:
    """Integer probabilities from the first token's top alternatives (" 42" and "42" add up)."""
    choice = response.choices[0]
    raw = choice.message.content if choice.message is not None else None
    tokens = choice.logprobs.content if choice.logprobs is not None else None
    if not tokens:
        return Distribution(raw=raw, error="the endpoint returned no logprobs")
    first = tokens[0]
    probs: defaultdict[int, float] = defaultdict(float)
    for alt in first.top_logprobs or [first]:
        k = parse_integer(alt.token, hi)
        if k is not None:
            probs[k] += math.exp(alt.logprob)
    return Distribution(dict(probs), raw)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, even when this thread already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()

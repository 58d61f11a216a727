"""Rollouts from an OpenAI-compatible server (vLLM, SGLang, llama.cpp server, Ollama, ...), activations from a local
model in a second pass.

A serving engine generates far faster than a hook-instrumented transformers model, but it cannot hand back residual
streams. So the server writes the replies and the local `capture_model` (the same weights) re-encodes prompt + reply
in one batched forward pass per group to get the span means. That costs one extra forward per reply, and the reply
is re-tokenized from its text: where the server's tokens differ from the tokenizer's own encoding of the text (rare,
but possible around merges and special characters), the captured tokens are not exactly those the server sampled.
One-pass capture (`LocalBackend`, `RayBackend`) has neither cost; this backend trades them for the server's speed.

Requests run concurrently (at most `concurrency`), each with the rollout's own seed, temperature, top_p and
max_tokens. Timeouts, connection errors, 408/409/429 and 5xx answers are retried with exponential backoff and
jitter and counted in `stats`. A rollout still unanswered after `max_retries` is counted and logged, nothing is
written for it, and the others go on: it stays pending and the next run of the stage asks again. Errors that would
fail every request alike (bad key, unknown model) stop the stage at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from personaxis.backends.runs import Rollout, RolloutResult
from personaxis.common.retry import Failure, with_retries
from personaxis.errors import PersonaxisError
from personaxis.inference.capture import _batched_means, iter_means
from personaxis.model.loading import ChatModel

log = logging.getLogger("personaxis.backends")

_DONE = object()


@dataclass
class RequestStats:
    """Requests sent (retries included), retries, and the rollouts given up on ({id: last error})."""

    requests: int = 0
    retries: int = 0
    failed: dict[str, str] = field(default_factory=dict)


@dataclass
class _Reply:
    rollout: Rollout
    text: str
    finish_reason: str
    n_tokens: int | None


@dataclass
class _Fetch:
    """The request loop running in its own thread, and what the consumer needs to stop it."""

    replies: queue.Queue
    thread: threading.Thread | None = None
    loop: asyncio.AbstractEventLoop | None = None
    task: asyncio.Task | None = None
    started: threading.Event = field(default_factory=threading.Event)
    stopping: bool = False
    error: BaseException | None = None


class OpenAIBackend:
    """Generate through an OpenAI-compatible endpoint, capture with `capture_model`; see the module doc.

    `api_key` None falls back to ``OPENAI_API_KEY``, then to a placeholder that local servers accept. `timeout` is
    per request, in seconds. `batch_size` is the capture batch: replies are encoded in groups of up to that many as
    they arrive, while the next requests are already under way.
    """

    def __init__(
        self,
        base_url: str | None,
        model_name: str,
        capture_model: ChatModel,
        layers: Sequence[int],
        captures: Sequence[str] = ("response",),
        *,
        api_key: str | None = None,
        concurrency: int = 8,
        max_retries: int = 5,
        timeout: float = 300.0,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        batch_size: int = 8,
    ) -> None:
        if concurrency < 1 or max_retries < 0 or batch_size < 1:
            raise PersonaxisError("concurrency and batch_size must be at least 1, max_retries at least 0")
        self.base_url, self.model_name = base_url, model_name
        self.model, self.layers, self.captures = capture_model, list(layers), tuple(captures)
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY") or "unused"
        self.concurrency, self.max_retries, self.timeout = concurrency, max_retries, timeout
        self.backoff, self.max_backoff, self.batch_size = backoff, max_backoff, batch_size
        self.stats = RequestStats()

    def identity(self) -> dict[str, Any]:
        return {
            "generator": f"openai-compatible:{self.model_name}",
            "model": self.model.name,
            "revision": self.model.revision,
            "dtype": str(self.model.dtype),
            "layers": self.layers,
            "captures": self.captures,
        }

    def stream(self, rollouts: Sequence[Rollout]) -> Iterator[list[RolloutResult]]:
        if not rollouts:
            return
        fetch = _Fetch(queue.Queue(maxsize=self.concurrency + 4 * self.batch_size))
        fetch.thread = threading.Thread(target=self._fetch_thread, args=(list(rollouts), fetch), daemon=True)
        fetch.thread.start()
        try:
            done = False
            while not done:
                replies: list[_Reply] = []
                item = fetch.replies.get()  # wait for one reply, then take what else is ready
                while True:
                    if item is _DONE:
                        done = True
                        break
                    replies.append(item)
                    if len(replies) == self.batch_size:
                        break
                    try:
                        item = fetch.replies.get_nowait()
                    except queue.Empty:
                        break
                if replies:
                    yield self._capture(replies)
            if fetch.error is not None:
                error = fetch.error
                while isinstance(error, BaseExceptionGroup):
                    error = error.exceptions[0]
                if isinstance(error, PersonaxisError):
                    raise error
                raise PersonaxisError(f"requests to {self.base_url} stopped: {error!r}") from error
            if self.stats.failed:
                log.warning("%d rollouts got no reply from %s: still pending", len(self.stats.failed), self.base_url)
        finally:
            _stop(fetch)

    # -- requests (in the fetch thread) --------------------------------------------------------------------------

    def _fetch_thread(self, rollouts: list[Rollout], fetch: _Fetch) -> None:
        try:
            asyncio.run(self._fetch_all(rollouts, fetch))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            if not fetch.stopping:
                fetch.error = e
        finally:
            fetch.started.set()
            fetch.replies.put(_DONE)

    async def _fetch_all(self, rollouts: list[Rollout], fetch: _Fetch) -> None:
        try:
            from openai import AsyncOpenAI
        except ImportError as e:
            raise PersonaxisError("the openai generator needs the openai package: pip install 'openai>=1.0'") from e
        fetch.loop, fetch.task = asyncio.get_running_loop(), asyncio.current_task()
        fetch.started.set()
        todo = iter(rollouts)

        async def worker() -> None:
            for rollout in todo:  # one shared iterator: each rollout is taken by exactly one worker
                if fetch.stopping:
                    return
                reply = await self._request(client, rollout)
                if reply is None:
                    continue
                while fetch.replies.full():  # capture is behind: hold the results here, not in memory
                    await asyncio.sleep(0.01)
                fetch.replies.put_nowait(reply)

        client = AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, timeout=self.timeout, max_retries=0)
        async with client, asyncio.TaskGroup() as group:  # a fatal error cancels the other workers
            for _ in range(min(self.concurrency, len(rollouts))):
                group.create_task(worker())

    async def _request(self, client: Any, rollout: Rollout) -> _Reply | None:
        s = rollout.sampling
        extra = {"seed": s.seed} if s.seed is not None else {}

        async def ask() -> _Reply:
            response = await client.chat.completions.create(
                model=self.model_name,
                messages=rollout.chat,
                max_tokens=s.max_new_tokens,
                temperature=s.temperature,
                top_p=s.top_p,
                **extra,
            )
            choice = response.choices[0]
            usage = getattr(response, "usage", None)
            return _Reply(
                rollout, choice.message.content or "", choice.finish_reason or "stop",
                getattr(usage, "completion_tokens", None),
            )  # fmt: skip

        def attempted() -> None:
            self.stats.requests += 1

        def retried() -> None:
            self.stats.retries += 1

        reply = await with_retries(
            ask, max_retries=self.max_retries, backoff=self.backoff, max_backoff=self.max_backoff,
            refused=f"{self.base_url} refused model {self.model_name!r}", on_attempt=attempted, on_retry=retried,
            fail_on=(IndexError, AttributeError),
        )  # fmt: skip
        if isinstance(reply, Failure):
            self.stats.failed[rollout.id] = reply.error
            log.warning("rollout %s: no reply after %d attempts: %s", rollout.id, reply.attempts, reply.error)
            return None
        self.stats.failed.pop(rollout.id, None)
        return reply

    # -- capture (in the consumer's thread) ----------------------------------------------------------------------

    def _capture(self, replies: list[_Reply]) -> list[RolloutResult]:
        """Span means of prompt + reply; a reply with no content gets prompt means and NaN response means, as in
        one-pass generation."""
        spoken = [i for i, r in enumerate(replies) if r.text.strip()]
        silent = [i for i, r in enumerate(replies) if not r.text.strip()]
        means: dict[int, torch.Tensor] = {}  # reply index -> [A, L, H]
        if spoken:
            chats = [[*replies[i].rollout.chat, {"role": "assistant", "content": replies[i].text}] for i in spoken]
            for chunk, values in iter_means(self.model, chats, self.layers, self.captures, batch_size=len(chats)):
                means.update({spoken[j]: values[k] for k, j in enumerate(chunk)})
        if silent:
            rendered = [self.model.render(replies[i].rollout.chat, add_generation_prompt=True) for i in silent]
            weights = [self._prompt_weights(len(chat)) for chat in rendered]
            values = _batched_means(self.model, rendered, weights, self.layers)
            means.update({i: values[k] for k, i in enumerate(silent)})
        results = []
        for i, reply in enumerate(replies):
            n_tokens = reply.n_tokens
            if n_tokens is None:
                n_tokens = len(self.model.tokenizer(reply.text, add_special_tokens=False)["input_ids"])
            tensors = {name: means[i][a] for a, name in enumerate(self.captures)}
            results.append(RolloutResult(reply.rollout, reply.text, reply.finish_reason, n_tokens, tensors))
        return results

    def _prompt_weights(self, length: int) -> torch.Tensor:
        weights = torch.zeros(length, len(self.captures))
        for a, name in enumerate(self.captures):
            if name == "prompt":
                weights[:, a] = 1
            elif name == "last_prompt":
                weights[-1, a] = 1
        return weights


def _stop(fetch: _Fetch) -> None:
    """Cancel what is still in flight and wait for the request thread to end."""
    thread = fetch.thread
    if thread is None or not thread.is_alive():
        return
    fetch.stopping = True
    fetch.started.wait()
    if fetch.loop is not None and fetch.task is not None:
        try:
            fetch.loop.call_soon_threadsafe(fetch.task.cancel)
        except RuntimeError:  # the loop already closed
            pass
    while thread.is_alive():
        try:
            while True:
                fetch.replies.get_nowait()
        except queue.Empty:
            pass
        thread.join(0.05)

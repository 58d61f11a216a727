"""One chat completion from body to reply: validation and tokenising off the event loop, the plan of ops, the job on
the worker, and the answer (one JSON reply, or a stream of chunks with per-token telemetry).

Shapes follow OpenAI's so the official SDK works unchanged; everything personaxis adds lives under a `personaxis` key,
in requests (the SDK's `extra_body`) and in responses and stream chunks (see docs/serve.md for the schema).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from personaxis.errors import PersonaxisError
from personaxis.inference.generation import Generation, Sampling, prompt_ids
from personaxis.inference.plan import Registry, make_plan
from personaxis.model import ChatModel
from personaxis.serve.http import ApiError, ClientGone, read_body, stream_error, validate_request
from personaxis.serve.jobs import Job, QueueFull
from personaxis.serve.loop import ClosedLoop, Conversations, conversation_key
from personaxis.serve.metrics import Metrics
from personaxis.serve.schema import ChatRequest, Limits
from personaxis.serve.worker import Worker

if TYPE_CHECKING:
    from personaxis.serve.vllm_worker import VLLMWorker
    from personaxis.vllm import VLLMModel

log = logging.getLogger("personaxis.serve")


@dataclass
class Turn:
    """One accepted request on its way through the worker."""

    job: Job
    key: str  # conversation
    turn: int  # index of the assistant turn being generated
    watch: str | None  # the vector the closed loop watches, if it runs for this request
    id: str
    created: int


class Detokenizer:
    """Incremental decoding that never emits half a UTF-8 character or a prefix the next token would rewrite."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.ids, self.prefix, self.read, self.sent = tokenizer, [], 0, 0, ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        after = decode(self.ids[self.prefix :], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        delta = after[len(before) :]
        self.sent += delta
        return delta

    def finish(self, text: str) -> str:
        """Whatever of the final text has not been sent yet."""
        return text[len(self.sent) :] if text.startswith(self.sent) else ""


def default_policy(registry: Registry) -> ClosedLoop:
    """Watch the axis; act below the default cap's threshold at the axis layer when the cap covers that layer."""
    axis, cap = registry.directions.get("axis"), registry.caps.get("default")
    if axis is None or cap is None or axis.layer not in cap.layers or cap.kind != "floor":
        return ClosedLoop(threshold=None)
    return ClosedLoop(threshold=cap.threshold(axis.layer))


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


class ChatService:
    """Everything a chat request touches: the model's worker, the registry of vectors and caps, the closed loop's
    conversations, the metrics and the limits. `create_app` makes one and routes requests to `handle`."""

    def __init__(
        self,
        model: ChatModel | VLLMModel,
        registry: Registry,
        worker: Worker | VLLMWorker,
        metrics: Metrics,
        policy: ClosedLoop,
        limits: Limits,
    ) -> None:
        self.model, self.registry, self.worker, self.metrics = model, registry, worker, metrics
        self.policy, self.limits = policy, limits
        self.conversations = Conversations(policy)
        self.created = int(time.time())
        # parsing, validation and tokenising run here, never on the event loop; one thread, so that the tokenizer is
        # never entered by two requests at once and one large prompt holds up only the prompts queued behind it
        self.prepare = ThreadPoolExecutor(max_workers=1, thread_name_prefix="personaxis-prepare")

    def close(self) -> None:
        self.prepare.shutdown(wait=False, cancel_futures=True)

    # -- accepting a request -------------------------------------------------------------------------------------

    def _prepare(self, body: bytes) -> tuple[ChatRequest, list[dict[str, str]], list[int]]:
        """Parse, validate (every limit that needs no tokenizer first), then tokenise; in the `prepare` thread."""
        req = validate_request(body, self.limits)
        messages = req.chat()
        try:
            prompt = prompt_ids(self.model, messages)
        except PersonaxisError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        if len(prompt) > self.limits.max_prompt_tokens:
            raise ApiError(
                400,
                f"the prompt has {len(prompt)} tokens, above the limit of {self.limits.max_prompt_tokens}",
                param="messages",
            )
        return req, messages, prompt

    async def handle(self, request: Request) -> Response:
        """POST /v1/chat/completions."""
        body = await read_body(request, self.limits.max_body_bytes)
        req, messages, prompt = await asyncio.get_running_loop().run_in_executor(self.prepare, self._prepare, body)
        turn = self._submit(req, messages, prompt)
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                self._stream(request, turn, usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            return JSONResponse(await self._complete(request, turn))
        except ClientGone:
            return Response(status_code=499)

    def _submit(self, req: ChatRequest, messages: list[dict[str, str]], prompt: list[int]) -> Turn:
        """The request's plan of ops, queued on the worker as a job."""
        policy, registry, ext = self.policy, self.registry, req.personaxis
        key = conversation_key(ext.conversation_id, messages)
        turn = sum(m["role"] == "assistant" for m in messages)
        looped = ext.closed_loop and policy.cap in registry.caps and self.conversations.capped(key)
        watch = policy.vector if ext.closed_loop and policy.vector in registry.directions else None
        try:
            plan = make_plan(registry, ext, self.model.n_layers, loop_cap=policy.cap if looped else None,
                             also_monitor=watch)  # fmt: skip
            sampling = Sampling(max_new_tokens=req.reply_tokens(self.limits), temperature=req.temperature,
                                top_p=req.top_p, seed=req.seed)  # fmt: skip
        except PersonaxisError as exc:
            raise ApiError(400, str(exc), param="personaxis") from None
        job = Job(prompt, sampling, plan, asyncio.get_running_loop())
        try:
            self.worker.submit(job)
        except QueueFull as exc:
            raise ApiError(429, str(exc), "rate_limit_error") from None
        if plan.cap_source:
            self.metrics.capped.labels(plan.cap_source).inc()
        return Turn(job, key, turn, watch, f"chatcmpl-{uuid.uuid4().hex}", int(time.time()))

    # -- answering -----------------------------------------------------------------------------------------------

    def _summary(self, turn: Turn, generation: Generation) -> dict:
        """The `personaxis` part of a finished reply: projections per monitored vector, steering, cap hits, the loop."""
        plan, registry, metrics = turn.job.plan, self.registry, self.metrics
        monitor = {}
        for name in plan.monitor:
            values = generation.projections.get(f"monitor:{name}")
            tokens = [_finite(float(v)) for v in values[:, 0]] if values is not None else []
            real = [v for v in tokens if v is not None]
            mean = sum(real) / len(real) if real else None
            monitor[name] = {"layer": registry.directions[name].layer, "tokens": tokens, "mean": mean}
            if mean is not None:
                metrics.turn_projection.labels(name).observe(mean)
        loop = None
        if turn.watch is not None:
            can_cap = self.policy.cap in registry.caps
            loop = self.conversations.record(turn.key, turn.turn, monitor[turn.watch]["mean"], can_cap=can_cap)
            for event in loop["events"]:
                (metrics.alarms if event["type"] == "alarm" else metrics.cap_activations).inc()
        return {
            "conversation_id": turn.key,
            "turn": turn.turn,
            "monitor": monitor,
            "steer": plan.steer,
            "cap": {"name": plan.cap, "source": plan.cap_source, "hits": generation.cap_hits},
            "closed_loop": loop,
            "events": loop["events"] if loop else [],
        }

    @staticmethod
    def _usage(turn: Turn, generation: Generation) -> dict:
        n_prompt, n_reply = len(turn.job.prompt), len(generation.token_ids)
        return {"prompt_tokens": n_prompt, "completion_tokens": n_reply, "total_tokens": n_prompt + n_reply}

    def _envelope(self, turn: Turn, kind: str) -> dict:
        return {"id": turn.id, "object": kind, "created": turn.created, "model": self.model.name}

    @staticmethod
    async def _next(request: Request, job: Job) -> tuple:
        """The job's next event; cancels the job if the client goes away while we wait."""
        while True:
            try:
                return await asyncio.wait_for(job.events.get(), timeout=0.5)
            except TimeoutError:
                if await request.is_disconnected():
                    job.cancelled = True
                    raise ClientGone from None

    async def _complete(self, request: Request, turn: Turn) -> dict:
        first = True
        try:
            while True:
                event = await self._next(request, turn.job)
                if event[0] == "token" and first:
                    self.metrics.ttft.observe(time.perf_counter() - turn.job.enqueued)
                    first = False
                elif event[0] == "error":
                    raise ApiError(500, event[1], "server_error")
                elif event[0] == "done":
                    generation: Generation = event[1]
                    message = {"role": "assistant", "content": generation.text}
                    choice = {"index": 0, "message": message, "finish_reason": generation.finish_reason,
                              "logprobs": None}  # fmt: skip
                    usage, summary = self._usage(turn, generation), self._summary(turn, generation)
                    envelope = self._envelope(turn, "chat.completion")
                    return {**envelope, "choices": [choice], "usage": usage, "personaxis": summary}
        finally:
            turn.job.cancelled = True  # no-op when done; stops generation if this handler was cancelled

    async def _stream(self, request: Request, turn: Turn, include_usage: bool) -> AsyncIterator[str]:
        def chunk(delta: dict, finish: str | None = None, extra: dict | None = None) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            body = {**self._envelope(turn, "chat.completion.chunk"), "choices": [choice]}
            if extra is not None:
                body["personaxis"] = extra
            return f"data: {json.dumps(body)}\n\n"

        detok = Detokenizer(self.model.tokenizer)
        first = True
        try:
            plan = turn.job.plan
            start = {
                "conversation_id": turn.key,
                "turn": turn.turn,
                "monitor": {name: {"layer": self.registry.directions[name].layer} for name in plan.monitor},
                "steer": plan.steer,
                "cap": {"name": plan.cap, "source": plan.cap_source},
            }
            yield chunk({"role": "assistant", "content": ""}, extra={"start": start})
            while True:
                event = await self._next(request, turn.job)
                if event[0] == "token":
                    if first:
                        self.metrics.ttft.observe(time.perf_counter() - turn.job.enqueued)
                        first = False
                    _, token, values = event
                    text = detok.push(token)
                    projections = {k: _finite(v) for k, v in values.items()}
                    yield chunk({"content": text}, extra={"token": {"id": token, "projections": projections}})
                elif event[0] == "error":
                    yield stream_error(event[1])
                    break
                else:
                    generation: Generation = event[1]
                    rest = detok.finish(generation.text)
                    summary = self._summary(turn, generation)
                    yield chunk({"content": rest} if rest else {}, generation.finish_reason, extra=summary)
                    if include_usage:
                        body = {**self._envelope(turn, "chat.completion.chunk"), "choices": [],
                                "usage": self._usage(turn, generation)}  # fmt: skip
                        yield f"data: {json.dumps(body)}\n\n"
                    break
            yield "data: [DONE]\n\n"
        except ClientGone:
            return
        except Exception as exc:  # the headers are out: end this stream with an error event, not a reset connection
            log.exception("stream %s failed", turn.id)
            yield stream_error(f"internal error: {type(exc).__name__}")
        finally:
            turn.job.cancelled = True

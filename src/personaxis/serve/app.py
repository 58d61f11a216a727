"""The OpenAI-compatible server: chat completions with per-request steering, capping and per-token telemetry.

Shapes follow OpenAI's so the official SDK works unchanged; everything personaxis adds lives under a `personaxis` key,
in requests (the SDK's `extra_body`) and in responses and stream chunks (see docs/serve.md for the schema).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.routing import Match
from starlette.types import Scope

from personaxis.errors import PersonaxisError
from personaxis.inference.generation import Generation, Sampling, prompt_ids
from personaxis.model import ChatModel
from personaxis.serve.loop import ClosedLoop, Conversations, conversation_key
from personaxis.serve.metrics import Metrics
from personaxis.serve.plan import Plan, Registry, make_plan
from personaxis.serve.schema import ChatRequest, Limits, explain, where
from personaxis.serve.worker import Job, QueueFull, Worker
from personaxis.vectors.artifact import Vectors
from personaxis.vectors.cap import CapConfig

if TYPE_CHECKING:
    from personaxis.vllm import VLLMModel


__all__ = ["ApiError", "Limits", "create_app"]

log = logging.getLogger("personaxis.serve")

UNMATCHED = "unmatched"  # the metrics label of every path that is no route


@dataclass
class _Context:
    """One accepted request on its way through the worker."""

    job: Job
    key: str  # conversation
    turn: int  # index of the assistant turn being generated
    watch: str | None  # the vector the closed loop watches, if it runs for this request
    id: str
    created: int


class ClientGone(Exception):
    """The client disconnected; its job has been cancelled."""


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


class _AsciiJSON(JSONResponse):
    """JSON with non-ASCII escaped: a message quoting the client's input can never fail to encode."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
    """OpenAI's error shape, so SDKs raise their usual exceptions with our message (always one line)."""
    body = {"error": {"message": " ".join(message.split()), "type": kind, "param": param, "code": status}}
    return _AsciiJSON(body, status_code=status)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


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


def create_app(
    model: ChatModel | VLLMModel,
    *,
    axis: Vectors | None = None,
    caps: CapConfig | Mapping[str, CapConfig] | None = None,
    vectors: Mapping[str, Vectors] | None = None,
    api_key: str | None = None,
    limits: Limits = Limits(),
    policy: ClosedLoop | None = None,
    space: dict | None = None,
    batch_invariant: bool | None = None,
) -> FastAPI:
    """Build the app. The model is used by one worker thread only, started and stopped with the app's lifespan;
    a `personaxis.vllm.VLLMModel` is served by vLLM's engine (`vllm.serving`), any other by our runtime.

    `axis` is named "axis"; `vectors` are named by their keys (`key:direction` for multi-direction files); a single
    `caps` is named "default". `space` (optional) is the persona-space view served to the dashboard, e.g.
    `{"points": [{"name": "pirate", "x": -1.2, "y": 0.3}, ...], "axis_x": [x0, x1]}`. `batch_invariant` (default: on
    a CPU with continuous batching) keeps greedy replies independent of the batch in bf16 too (`serve.worker`).
    """
    registry = Registry.build(axis=axis, vectors=vectors, caps=caps, model=model)
    policy = policy or default_policy(registry)
    conversations = Conversations(policy)
    metrics = Metrics()
    metrics.queue.set_function(lambda: worker.waiting)
    if model.runtime == "vllm":
        from personaxis.vllm.serving import VLLMWorker

        worker = VLLMWorker(model, registry, max_queue=limits.max_queue, on_batch=metrics.batch)
    else:
        worker = Worker(model, registry, max_batch=limits.max_batch, max_queue=limits.max_queue,
                        on_batch=metrics.batch, batch_invariant=batch_invariant)  # fmt: skip
    model_id = model.name
    created = int(time.time())
    # parsing, validation and tokenising run here, never on the event loop; one thread, so that the tokenizer is
    # never entered by two requests at once and one large prompt holds up only the prompts queued behind it
    prepare = ThreadPoolExecutor(max_workers=1, thread_name_prefix="personaxis-prepare")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            worker.stop()
            prepare.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="personaxis", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker, app.state.registry, app.state.metrics, app.state.policy = worker, registry, metrics, policy

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.kind, exc.param)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        """Starlette's own answers (404 for an unknown path, 405 for a wrong method) in the same shape."""
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        """A bug answers in the usual error shape, one line, and the connection stays up (the traceback is logged)."""
        return _error(500, f"internal error: {type(exc).__name__}", "server_error")

    def route_of(scope: Scope) -> str:
        """The route template a request matches (`/v1/chat/completions`), or one shared label for any other path:
        the metrics' label values must be bounded whatever paths clients invent."""
        for route in app.router.routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return getattr(route, "path", UNMATCHED)
        return UNMATCHED

    @app.middleware("http")
    async def guard(request: Request, call_next):  # noqa: ANN202 - starlette's middleware signature
        path = request.url.path
        counted = path.startswith("/v1") or path == "/metrics"
        if api_key is not None and counted:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                response = _error(
                    401, "missing or wrong API key (send 'Authorization: Bearer <key>')", "authentication_error"
                )
                metrics.requests.labels(route_of(request.scope), "401").inc()
                return response
        response = await call_next(request)
        if counted:
            metrics.requests.labels(route_of(request.scope), str(response.status_code)).inc()
        return response

    @app.get("/", include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(resources.files("personaxis.serve").joinpath("static/index.html").read_text("utf-8"))

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict:
        return {"ok": True}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "personaxis"}],
        }

    @app.get("/v1/personaxis/info")
    async def info() -> dict:
        """What the dashboard needs to draw its controls."""
        return {
            "model": model_id,
            "n_layers": model.n_layers,
            "vectors": [d.describe() for d in registry.directions.values()],
            "caps": {name: {"layers": c.layers, "tau": c.tau, "kind": c.kind} for name, c in registry.caps.items()},
            "closed_loop": {
                "threshold": policy.threshold,
                "window": policy.window,
                "vector": policy.vector,
                "cap": policy.cap if policy.cap in registry.caps else None,
            },
            "limits": {"max_tokens": limits.max_tokens, "default_max_tokens": limits.default_max_tokens},
            "space": space is not None,
        }

    @app.get("/v1/personaxis/space")
    async def persona_space() -> dict:
        if space is None:
            raise ApiError(
                404,
                "this server has no persona-space view (start it with an axis build that has one)",
                "not_found_error",
            )
        return space

    def _prepare(body: bytes) -> tuple[ChatRequest, list[dict[str, str]], list[int]]:
        """Parse, validate (every limit that needs no tokenizer first), then tokenise; in the `prepare` thread."""
        req = _validate(body, limits)
        messages = req.chat()
        try:
            prompt = prompt_ids(model, messages)
        except PersonaxisError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        if len(prompt) > limits.max_prompt_tokens:
            raise ApiError(
                400,
                f"the prompt has {len(prompt)} tokens, above the limit of {limits.max_prompt_tokens}",
                param="messages",
            )
        return req, messages, prompt

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await _read_body(request, limits.max_body_bytes)
        req, messages, prompt = await asyncio.get_running_loop().run_in_executor(prepare, _prepare, body)
        max_tokens = req.reply_tokens(limits)
        ext = req.personaxis
        key = conversation_key(ext.conversation_id, messages)
        turn = sum(m["role"] == "assistant" for m in messages)
        looped = ext.closed_loop and policy.cap in registry.caps and conversations.capped(key)
        watch = policy.vector if ext.closed_loop and policy.vector in registry.directions else None
        try:
            plan = make_plan(registry, ext, model.n_layers, loop_cap=policy.cap if looped else None, also_monitor=watch)
            sampling = Sampling(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed)
        except PersonaxisError as exc:
            raise ApiError(400, str(exc), param="personaxis") from None
        job = Job(prompt, sampling, plan, asyncio.get_running_loop())
        try:
            worker.submit(job)
        except QueueFull as exc:
            raise ApiError(429, str(exc), "rate_limit_error") from None
        if plan.cap_source:
            metrics.capped.labels(plan.cap_source).inc()
        context = _Context(job, key, turn, watch, f"chatcmpl-{uuid.uuid4().hex}", int(time.time()))
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _stream(request, context, usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            return JSONResponse(await _complete(request, context))
        except ClientGone:
            return Response(status_code=499)

    def _summary(ctx: _Context, generation: Generation) -> dict:
        plan: Plan = ctx.job.plan
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
        if ctx.watch is not None:
            loop = conversations.record(
                ctx.key, ctx.turn, monitor[ctx.watch]["mean"], can_cap=policy.cap in registry.caps
            )
            for event in loop["events"]:
                (metrics.alarms if event["type"] == "alarm" else metrics.cap_activations).inc()
        return {
            "conversation_id": ctx.key,
            "turn": ctx.turn,
            "monitor": monitor,
            "steer": plan.steer,
            "cap": {"name": plan.cap, "source": plan.cap_source, "hits": generation.cap_hits},
            "closed_loop": loop,
            "events": loop["events"] if loop else [],
        }

    def _usage(ctx: _Context, generation: Generation) -> dict:
        n_prompt, n_reply = len(ctx.job.prompt), len(generation.token_ids)
        return {"prompt_tokens": n_prompt, "completion_tokens": n_reply, "total_tokens": n_prompt + n_reply}

    async def _next(request: Request, job: Job) -> tuple:
        """The job's next event; cancels the job if the client goes away while we wait."""
        while True:
            try:
                return await asyncio.wait_for(job.events.get(), timeout=0.5)
            except TimeoutError:
                if await request.is_disconnected():
                    job.cancelled = True
                    raise ClientGone from None

    async def _complete(request: Request, ctx: _Context) -> dict:
        first = True
        try:
            while True:
                event = await _next(request, ctx.job)
                if event[0] == "token" and first:
                    metrics.ttft.observe(time.perf_counter() - ctx.job.enqueued)
                    first = False
                elif event[0] == "error":
                    raise ApiError(500, event[1], "server_error")
                elif event[0] == "done":
                    generation: Generation = event[1]
                    return {
                        "id": ctx.id,
                        "object": "chat.completion",
                        "created": ctx.created,
                        "model": model_id,
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": generation.text},
                                "finish_reason": generation.finish_reason,
                                "logprobs": None,
                            }
                        ],
                        "usage": _usage(ctx, generation),
                        "personaxis": _summary(ctx, generation),
                    }
        finally:
            ctx.job.cancelled = True  # no-op when done; stops generation if this handler was cancelled

    async def _stream(request: Request, ctx: _Context, include_usage: bool) -> AsyncIterator[str]:
        def chunk(delta: dict, finish: str | None = None, extra: dict | None = None) -> str:
            body = {
                "id": ctx.id,
                "object": "chat.completion.chunk",
                "created": ctx.created,
                "model": model_id,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            }
            if extra is not None:
                body["personaxis"] = extra
            return f"data: {json.dumps(body)}\n\n"

        detok = Detokenizer(model.tokenizer)
        first = True
        try:
            plan = ctx.job.plan
            start = {
                "conversation_id": ctx.key,
                "turn": ctx.turn,
                "monitor": {name: {"layer": registry.directions[name].layer} for name in plan.monitor},
                "steer": plan.steer,
                "cap": {"name": plan.cap, "source": plan.cap_source},
            }
            yield chunk({"role": "assistant", "content": ""}, extra={"start": start})
            while True:
                event = await _next(request, ctx.job)
                if event[0] == "token":
                    if first:
                        metrics.ttft.observe(time.perf_counter() - ctx.job.enqueued)
                        first = False
                    _, token, values = event
                    text = detok.push(token)
                    projections = {k: _finite(v) for k, v in values.items()}
                    yield chunk({"content": text}, extra={"token": {"id": token, "projections": projections}})
                elif event[0] == "error":
                    yield _stream_error(event[1])
                    break
                else:
                    generation: Generation = event[1]
                    rest = detok.finish(generation.text)
                    summary = _summary(ctx, generation)
                    yield chunk({"content": rest} if rest else {}, generation.finish_reason, extra=summary)
                    if include_usage:
                        body = {
                            "id": ctx.id,
                            "object": "chat.completion.chunk",
                            "created": ctx.created,
                            "model": model_id,
                            "choices": [],
                            "usage": _usage(ctx, generation),
                        }
                        yield f"data: {json.dumps(body)}\n\n"
                    break
            yield "data: [DONE]\n\n"
        except ClientGone:
            return
        except Exception as exc:  # the headers are out: end this stream with an error event, not a reset connection
            log.exception("stream %s failed", ctx.id)
            yield _stream_error(f"internal error: {type(exc).__name__}")
        finally:
            ctx.job.cancelled = True

    return app


def _stream_error(message: str) -> str:
    body = {"error": {"message": " ".join(message.split()), "type": "server_error", "param": None, "code": 500}}
    return f"data: {json.dumps(body)}\n\n"


async def _read_body(request: Request, limit: int) -> bytes:
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


def _validate(body: bytes, limits: Limits | None = None) -> ChatRequest:
    payload = parse_body(body)
    try:
        return ChatRequest.model_validate(payload, context=limits)
    except RecursionError:
        raise ApiError(400, "the request is nested too deeply") from None
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        param = (where(errors[0]).split(".")[0] or None) if errors else None
        raise ApiError(400, explain(exc), param=param) from None

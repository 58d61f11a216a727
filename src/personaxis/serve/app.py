"""The OpenAI-compatible server as a FastAPI app: routes, the API key, metrics by route, and errors in one shape.

A chat completion's work is `serve.chat.ChatService`'s; this module only wires it, the dashboard and the read-only
routes into an app whose worker starts and stops with the app's lifespan.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from importlib import resources
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.routing import Match
from starlette.types import Scope

from personaxis.inference.plan import Registry
from personaxis.model import ChatModel
from personaxis.serve.chat import ChatService, default_policy
from personaxis.serve.http import ApiError, error_response
from personaxis.serve.loop import ClosedLoop
from personaxis.serve.metrics import Metrics
from personaxis.serve.schema import Limits
from personaxis.serve.worker import Worker
from personaxis.vectors.artifact import Vectors
from personaxis.vectors.cap import CapConfig

if TYPE_CHECKING:
    from personaxis.vllm import VLLMModel


__all__ = ["ApiError", "Limits", "create_app"]

UNMATCHED = "unmatched"  # the metrics label of every path that is no route


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
    a `personaxis.vllm.VLLMModel` is served by vLLM's engine (`serve.vllm_worker`), any other by our runtime.

    `axis` is named "axis"; `vectors` are named by their keys (`key:direction` for multi-direction files); a single
    `caps` is named "default". `space` (optional) is the persona-space view served to the dashboard, e.g.
    `{"points": [{"name": "pirate", "x": -1.2, "y": 0.3}, ...], "axis_x": [x0, x1]}`. `batch_invariant` (default: on
    a CPU with continuous batching) keeps greedy replies independent of the batch in bf16 too (`serve.worker`).
    """
    registry = Registry.build(axis=axis, vectors=vectors, caps=caps, model=model)
    policy = policy or default_policy(registry)
    metrics = Metrics()
    if model.runtime == "vllm":
        from personaxis.serve.vllm_worker import VLLMWorker

        worker = VLLMWorker(model, registry, max_queue=limits.max_queue, on_batch=metrics.batch)
    else:
        worker = Worker(model, registry, max_batch=limits.max_batch, max_queue=limits.max_queue,
                        on_batch=metrics.batch, batch_invariant=batch_invariant)  # fmt: skip
    metrics.queue.set_function(lambda: worker.waiting)
    service = ChatService(model, registry, worker, metrics, policy, limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            worker.stop()
            service.close()

    app = FastAPI(title="personaxis", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker, app.state.registry, app.state.metrics, app.state.policy = worker, registry, metrics, policy
    _errors(app)
    _guard(app, api_key, metrics)
    _routes(app, service, space)
    return app


def _errors(app: FastAPI) -> None:
    """Every answer that is not a reply in OpenAI's error shape, one line."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.kind, exc.param)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        """Starlette's own answers (404 for an unknown path, 405 for a wrong method) in the same shape."""
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        """A bug answers in the usual error shape, one line, and the connection stays up (the traceback is logged)."""
        return error_response(500, f"internal error: {type(exc).__name__}", "server_error")


def _guard(app: FastAPI, api_key: str | None, metrics: Metrics) -> None:
    """The API key on /v1 and /metrics, and the request counter labelled by route template."""

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
                response = error_response(
                    401, "missing or wrong API key (send 'Authorization: Bearer <key>')", "authentication_error"
                )
                metrics.requests.labels(route_of(request.scope), "401").inc()
                return response
        response = await call_next(request)
        if counted:
            metrics.requests.labels(route_of(request.scope), str(response.status_code)).inc()
        return response


def _routes(app: FastAPI, service: ChatService, space: dict | None) -> None:
    model, registry, policy, limits = service.model, service.registry, service.policy, service.limits

    @app.get("/", include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(resources.files("personaxis.serve").joinpath("static/index.html").read_text("utf-8"))

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict:
        return {"ok": True}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        entry = {"id": model.name, "object": "model", "created": service.created, "owned_by": "personaxis"}
        return {"object": "list", "data": [entry]}

    @app.get("/v1/personaxis/info")
    async def info() -> dict:
        """What the dashboard needs to draw its controls."""
        return {
            "model": model.name,
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

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await service.handle(request)

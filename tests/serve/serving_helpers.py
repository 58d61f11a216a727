"""Builders for the server tests: random vectors for a model, an app with small limits, a live loopback server."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import uvicorn
from fastapi import FastAPI

from personaxis.model import ChatModel
from personaxis.serve import ClosedLoop, Limits, create_app
from personaxis.vectors.artifact import VectorMeta, Vectors


def random_vectors(model: ChatModel, names: tuple[str, ...], seed: int) -> Vectors:
    """Random directions on every layer, with mean norms (so relative steering works) and layer 2 as their layer."""
    g = torch.Generator().manual_seed(seed)
    n, h = model.n_layers, model.hidden_size
    meta = VectorMeta(
        model_id=model.name,
        hidden_size=h,
        n_layers=n,
        method="random",
        points_toward="test",
        mean_norms={i: 5.0 for i in range(n)},
        extra={"layer": 2},
    )
    return Vectors(range(n), {name: torch.randn(n, h, generator=g) for name in names}, meta)


def make_app(model, artifacts, **kwargs) -> FastAPI:
    kwargs.setdefault("limits", Limits(max_tokens=64, default_max_tokens=16))
    kwargs.setdefault("policy", ClosedLoop(threshold=None))
    return create_app(model, axis=artifacts["axis"], caps=artifacts["caps"], vectors=artifacts["vectors"], **kwargs)


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """Run `app` on 127.0.0.1 at a free port in a thread; yield its base URL; stop it at the end."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()

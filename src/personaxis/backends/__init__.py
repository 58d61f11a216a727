"""Where rollouts are generated: locally, on a Ray cluster, or by an OpenAI-compatible server.

Every backend implements `personaxis.runs.Backend` (`identity` + `stream`), so the pipeline stages do not change
with the backend. In all of them the process running the stage is the only writer of the run store: results come
back to it and it writes them as they arrive. `backend_from_options` turns the command-line options into one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from personaxis.backends.openai_backend import OpenAIBackend, RequestStats
from personaxis.backends.ray_backend import RayBackend, RayJudge, RayStats
from personaxis.errors import PersonaxisError
from personaxis.model.loading import ChatModel, load_model
from personaxis.runs import Backend, LocalBackend

EXECUTORS = ("local", "ray")
GENERATORS = ("local", "openai")


def check_options(
    executor: str = "local",
    ray_address: str | None = None,
    workers: int | None = None,
    generator: str = "local",
    base_url: str | None = None,
    generator_model: str | None = None,
) -> None:
    """Refuse a wrong mix of backend options in one line, before anything is loaded."""
    if executor not in EXECUTORS:
        raise PersonaxisError(f"unknown executor {executor!r} (choose from {', '.join(EXECUTORS)})")
    if generator not in GENERATORS:
        raise PersonaxisError(f"unknown generator {generator!r} (choose from {', '.join(GENERATORS)})")
    if executor != "ray" and (ray_address is not None or workers is not None):
        raise PersonaxisError("--ray-address and --workers need --executor ray")
    if workers is not None and workers < 1:
        raise PersonaxisError(f"--workers must be at least 1, got {workers}")
    if generator != "openai" and (base_url is not None or generator_model is not None):
        raise PersonaxisError("--base-url and --generator-model need --generator openai")
    if generator == "openai":
        if executor == "ray":
            raise PersonaxisError("--generator openai generates on the server: use it with --executor local")
        if not base_url:
            raise PersonaxisError("--generator openai needs --base-url (e.g. http://localhost:8000/v1)")


def backend_from_options(
    model: str | os.PathLike[str] | ChatModel,
    layers: Sequence[int],
    captures: Sequence[str] = ("response",),
    executor: str = "local",
    ray_address: str | None = None,
    workers: int | None = None,
    generator: str = "local",
    base_url: str | None = None,
    generator_model: str | None = None,
    batch_size: int = 8,
    *,
    dtype: str = "auto",
    device: str | None = None,
    api_key: str | None = None,
    concurrency: int = 8,
) -> Backend:
    """The backend the options ask for (``--executor``, ``--ray-address``, ``--workers``, ``--generator``,
    ``--base-url``, ``--generator-model``, ``--batch-size``), checked together so a wrong mix fails before any work.

    `model` is a spec (`load_model` loads it, with `dtype` and `device`, when a local model is needed) or a loaded
    model. Ray workers load the model themselves, so `--executor ray` needs a spec every node can resolve; given a
    loaded model it uses its name, revision and dtype. `generator_model` defaults to the model spec, the name a
    vLLM or SGLang server gives a model it serves from the hub.
    """
    check_options(executor, ray_address, workers, generator, base_url, generator_model)
    if generator == "openai":
        assert base_url is not None
        name = generator_model or (model.name if isinstance(model, ChatModel) else os.fspath(model))
        capture = model if isinstance(model, ChatModel) else load_model(model, dtype=dtype, device=device)
        return OpenAIBackend(
            base_url, name, capture, layers, captures, api_key=api_key, concurrency=concurrency, batch_size=batch_size
        )
    if executor == "ray":
        if isinstance(model, ChatModel):
            return RayBackend(
                model.name, layers, captures, workers=workers, ray_address=ray_address, batch_size=batch_size,
                dtype=_dtype_name(model.dtype), revision=model.revision,
            )  # fmt: skip
        return RayBackend(
            model, layers, captures, workers=workers, ray_address=ray_address, batch_size=batch_size, dtype=dtype
        )
    local = model if isinstance(model, ChatModel) else load_model(model, dtype=dtype, device=device)
    return LocalBackend(local, layers, captures, batch_size=batch_size)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


__all__ = [
    "EXECUTORS",
    "GENERATORS",
    "OpenAIBackend",
    "RayBackend",
    "RayJudge",
    "RayStats",
    "RequestStats",
    "backend_from_options",
    "check_options",
]

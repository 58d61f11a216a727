"""Where rollouts are generated: locally (the HF runtime or vLLM), on a Ray cluster, or by an OpenAI-compatible server.

Every backend implements `personaxis.backends.runs.Backend` (`identity` + `stream`), so the pipeline stages do not
change with the backend. In all of them the process running the stage is the only writer of the run store: results come
back to it and it writes them as they arrive. `backend_from_options` turns the command-line options into one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch

from personaxis.backends.openai_backend import OpenAIBackend, RequestStats
from personaxis.backends.ray_backend import RayBackend, RayJudge, RayStats
from personaxis.backends.runs import Backend, LocalBackend
from personaxis.errors import PersonaxisError
from personaxis.model.loading import ChatModel, load_model

EXECUTORS = ("local", "ray")
GENERATORS = ("local", "openai", "vllm")


def check_options(
    executor: str = "local",
    ray_address: str | None = None,
    workers: int | None = None,
    generator: str = "local",
    base_url: str | None = None,
    generator_model: str | None = None,
    vllm_args: str | None = None,
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
    if generator == "vllm" and executor == "ray":
        raise PersonaxisError("--generator vllm runs vLLM in this process: use it with --executor local")
    if vllm_args is not None and generator != "vllm":
        raise PersonaxisError("--vllm-args needs --generator vllm")
    parse_vllm_args(vllm_args)
    if generator == "vllm":
        from personaxis.vllm import require_vllm

        require_vllm()


def parse_vllm_args(text: str | None) -> dict[str, Any]:
    """`--vllm-args`: a JSON object of vLLM engine arguments (`LLM(**args)`), e.g. '{"enforce_eager": true}'."""
    if not text:
        return {}
    try:
        args = json.loads(text)
    except json.JSONDecodeError as e:
        raise PersonaxisError(f"--vllm-args is not JSON ({e.msg}), e.g. '{{\"enforce_eager\": true}}'") from None
    if not isinstance(args, dict):
        raise PersonaxisError("--vllm-args must be a JSON object of vLLM engine arguments")
    return args


def open_vllm(model: ChatModel, batch_size: int = 8, vllm_args: str | None = None) -> Any:
    """vLLM (in this process) on the model `model` was loaded from, in its dtype, `batch_size` sequences at once."""
    from personaxis.vllm import VLLMModel

    args = {"dtype": _dtype_name(model.dtype), "max_num_seqs": batch_size} | parse_vllm_args(vllm_args)
    return VLLMModel(model.name, revision=model.revision, **args)


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
    vllm_args: str | None = None,
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
    check_options(executor, ray_address, workers, generator, base_url, generator_model, vllm_args)
    if generator == "vllm":
        local = model if isinstance(model, ChatModel) else load_model(model, dtype=dtype, device=device)
        return LocalBackend(open_vllm(local, batch_size, vllm_args), layers, captures, batch_size=batch_size)
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
    "open_vllm",
    "parse_vllm_args",
]

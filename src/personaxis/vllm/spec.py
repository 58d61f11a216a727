"""What a vLLM request asks of personaxis, carried in `SamplingParams.extra_args["personaxis"]`.

Two forms, both resolved to engine ops the same way the personaxis server resolves its requests:
- **A request extension** (the server's schema, `serve.schema.Extension`: `steer`, `cap`, `monitor`), as a dict or as
  a JSON string (what `vllm_xargs` can carry over HTTP). Names refer to the vectors and caps of the folder given in
  `PERSONAXIS_VECTORS` when vLLM starts (`*.safetensors`; cap files are caps, the others vectors).
- **In-process ops**: `{"ops": KEY}`, where KEY was registered with `register_ops` in the same process (the offline
  `VLLMModel` does this); the ops may be any engine ops, records with per-request weights included.

The prefix-cache salt of a request is a fingerprint of what it asks, so that requests with different ops never
share KV blocks, while requests with the same ops still do.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from personaxis.engine.ops import Op
from personaxis.errors import PersonaxisError

FIELD = "personaxis"
VECTORS_ENV = "PERSONAXIS_VECTORS"


@dataclass
class Resolved:
    ops: list[Op]
    key: str | None  # in-process requests are collected by key; others keep no telemetry past their end


_local: dict[str, list[Op]] = {}
_local_lock = threading.Lock()


def register_ops(key: str, ops: list[Op]) -> None:
    with _local_lock:
        _local[key] = ops


def forget_ops(key: str) -> None:
    with _local_lock:
        _local.pop(key, None)


def raw_spec(extra_args: dict[str, Any] | None) -> Any:
    """The personaxis field of a request's extra args, or None."""
    return (extra_args or {}).get(FIELD)


def parse(spec: Any) -> dict[str, Any]:
    """The spec as a dict; one-line error for anything else."""
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except (ValueError, RecursionError):
            raise PersonaxisError(f"'{FIELD}' is not valid JSON") from None
    if not isinstance(spec, dict):
        raise PersonaxisError(f"'{FIELD}' must be an object (steer / cap / monitor), got {type(spec).__name__}")
    return spec


def salt(spec: Any) -> str:
    """The prefix-cache salt of a request: a fingerprint of its spec (an in-process one names its own salt)."""
    parsed = parse(spec)
    if "ops" in parsed:
        return f"{FIELD}:{parsed.get('salt', parsed['ops'])}"
    canonical = json.dumps(parsed, sort_keys=True, separators=(",", ":"))
    return f"{FIELD}:{hashlib.sha256(canonical.encode()).hexdigest()[:32]}"


_names: Any = None  # the registry of PERSONAXIS_VECTORS, loaded once per process for `check`


def check(spec: Any) -> None:
    """What can be checked before a request is queued (in the API process): its form, and that every name exists.
    Layer ranges are checked against the model in the worker."""
    global _names
    parsed = parse(spec)
    if "ops" in parsed:
        with _local_lock:
            if parsed["ops"] not in _local:
                raise PersonaxisError(f"no ops registered under {parsed['ops']!r} in this process")
        return
    extension = _extension(parsed)
    folder = os.environ.get(VECTORS_ENV)
    if not folder:
        raise PersonaxisError(f"this vLLM server has no named vectors: start it with {VECTORS_ENV}=FOLDER")
    if _names is None:
        _names = _registry(folder, None)
    for item in extension.steer:
        _names.direction(item.vector)
    if isinstance(extension.cap, str):
        _names.cap(extension.cap)
    elif extension.cap is not None:
        _names.direction(extension.cap.vector)
    for name in extension.monitor or ():
        _names.direction(name)


def _extension(parsed: dict[str, Any]):  # noqa: ANN202 - serve.schema.Extension
    from personaxis.inference.requests import Extension, explain

    try:
        return Extension.model_validate(parsed)
    except ValidationError as exc:
        raise PersonaxisError(f"{FIELD}: {explain(exc)}") from None


class Resolver:
    """Turns specs into ops for one served model; the named vectors come from `PERSONAXIS_VECTORS` if set."""

    def __init__(self, model_info: Any, folder: str | os.PathLike[str] | None = None) -> None:
        self.model_info = model_info
        folder = folder if folder is not None else os.environ.get(VECTORS_ENV)
        self._registry = _registry(folder, model_info) if folder else None

    def resolve(self, spec: Any) -> Resolved:
        parsed = parse(spec)
        if "ops" in parsed:
            key = parsed["ops"]
            with _local_lock:
                ops = _local.get(key) if isinstance(key, str) else None
            if ops is None:
                raise PersonaxisError(f"no ops registered under {key!r} in this process")
            return Resolved(list(ops), key)
        from personaxis.inference.plan import make_plan

        extension = _extension(parsed)
        if self._registry is None:
            raise PersonaxisError(f"this vLLM server has no named vectors: start it with {VECTORS_ENV}=FOLDER")
        plan = make_plan(self._registry, extension, self.model_info.n_layers)
        return Resolved(plan.ops + [self._registry.monitor_op(name) for name in plan.monitor], None)


def _registry(folder: str | os.PathLike[str], model_info: Any):  # noqa: ANN202 - inference.plan.Registry
    from personaxis.inference.plan import Registry
    from personaxis.vectors import load_vectors_dir
    from personaxis.vectors.cap import CapConfig

    path = Path(folder)
    vectors = load_vectors_dir(path)
    caps = {}
    for file in sorted(path.glob("*.safetensors")):
        if file.stem not in vectors:
            caps[file.stem] = CapConfig.load(file)
    return Registry.build(vectors=vectors, caps=caps, model=model_info)

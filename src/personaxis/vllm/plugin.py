"""The `vllm.general_plugins` entry point: personaxis ops in an unmodified vLLM.

vLLM calls `register()` in every process it starts (API server, engine core, workers). It is switched on by
`PERSONAXIS_VLLM=1` or by `PERSONAXIS_VECTORS=FOLDER` (the named vectors and caps requests may use); otherwise it does
nothing, so installing personaxis never changes a vLLM deployment that does not ask for it. Once on, it:
- wraps the model runners' `load_model` (GPU and CPU; the CPU runner does not call its parent's) to `install` the
  layer hooks in the worker;
- gives every request that carries a personaxis spec a prefix-cache salt made from it (`spec.salt`), in the engine
  core where requests are made, so KV computed under other ops (or none) is never reused;
- checks each spec where vLLM checks sampling parameters, so that a malformed one is the request's own 400.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from personaxis.errors import PersonaxisError

ENABLE_ENV = "PERSONAXIS_VLLM"
TESTED = ((0, 32), (0, 32))  # vLLM minor versions this adapter is tested with (first, last)

_registered = False


def enabled() -> bool:
    return os.environ.get(ENABLE_ENV, "0") not in ("0", "", "false", "False") or bool(
        os.environ.get("PERSONAXIS_VECTORS")
    )


def check_version(version: str) -> None:
    """One line for a vLLM outside the tested range."""
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        raise PersonaxisError(f"cannot read the vLLM version {version!r}") from None
    (lo_major, lo_minor), (hi_major, hi_minor) = TESTED
    if not (lo_major, lo_minor) <= (major, minor) <= (hi_major, hi_minor):
        raise PersonaxisError(
            f"vLLM {version} is outside the versions personaxis is tested with "
            f"({lo_major}.{lo_minor}–{hi_major}.{hi_minor}.x)"
        )


def register() -> None:
    """Entry point; idempotent (vLLM may load plugins several times in one process)."""
    global _registered
    if _registered or not enabled():
        return
    import vllm
    from vllm.v1.request import Request
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    check_version(vllm.__version__)
    for runner_class in (GPUModelRunner, CPUModelRunner):
        runner_class.load_model = _after_load(runner_class.load_model)
    original = Request.from_engine_core_request.__func__

    def from_engine_core_request(cls: type, request: Any, *args: Any, **kwargs: Any) -> Any:
        from personaxis.vllm.spec import raw_spec, salt

        spec = raw_spec(getattr(request.sampling_params, "extra_args", None))
        if spec is not None and request.cache_salt is None:
            try:
                request.cache_salt = salt(spec)
            except PersonaxisError:
                pass  # refused in the worker, which logs it; the spec was checked before queuing
        return original(cls, request, *args, **kwargs)

    Request.from_engine_core_request = classmethod(from_engine_core_request)
    _check_specs_with_sampling_params()
    _registered = True


def _after_load(load_model: Any) -> Any:
    if getattr(load_model, "_personaxis", False):
        return load_model

    @functools.wraps(load_model)
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        from personaxis.vllm.worker import install

        out = load_model(self, *args, **kwargs)
        install(self)
        return out

    wrapped._personaxis = True  # type: ignore[attr-defined]
    return wrapped


def _check_specs_with_sampling_params() -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams

    verify = SamplingParams._verify_extra_args

    def verify_extra_args(self: SamplingParams) -> None:
        verify(self)
        from personaxis.vllm.spec import check, raw_spec

        spec = raw_spec(self.extra_args)
        if spec is not None:
            try:
                check(spec)
            except PersonaxisError as exc:
                raise VLLMValidationError(str(exc), parameter="extra_args") from None

    SamplingParams._verify_extra_args = verify_extra_args

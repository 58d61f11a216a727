"""The options and helpers every command shares, declared once: the model options, `load` (a model, with a line
while it loads), and the backend options of the pipeline commands (`axis build`, `trait extract`).

`@backend_options` adds ``--executor``, ``--ray-address``, ``--workers``, ``--generator``, ``--base-url``,
``--generator-model`` and ``--vllm-args`` to a typer command and hands the command one `BackendOptions` (its keyword
`backend_options`).
`BackendOptions.check` refuses a wrong mix before anything is loaded; `BackendOptions.open` makes the backend with one
call of `backend_from_options` and closes it afterwards (a Ray backend stops its actors). The server's key, if it
needs one, comes from ``OPENAI_API_KEY``: a key on the command line would show in the process list.

Kept free of heavy imports: the command line starts without torch.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from personaxis.backends.runs import Backend
    from personaxis.judge import Judge
    from personaxis.model import ChatModel
    from personaxis.vllm import VLLMModel

_OPTIONS: tuple[tuple[str, Any, Any, str], ...] = (  # name, type, default, help
    ("executor", str, "local", "local (this process) or ray (model replicas as Ray actors)"),
    ("ray_address", str | None, None, "Ray cluster: auto or HOST:PORT (default: $RAY_ADDRESS, else a local Ray)"),
    ("workers", int | None, None, "Ray actors, one model replica each (default: the cluster's GPUs, at least 1)"),
    ("generator", str, "local", "local; vllm (vLLM in this process, one pass); openai (a server writes replies)"),
    ("base_url", str | None, None, "the server for --generator openai, e.g. http://localhost:8000/v1"),
    ("generator_model", str | None, None, "the server's name for the model (default: --model)"),
    ("vllm_args", str | None, None, "vLLM engine arguments (with vllm), as JSON: '{\"enforce_eager\": true}'"),
)


@dataclass(frozen=True)
class BackendOptions:
    """Where rollouts run; see `personaxis.backends.backend_from_options` and docs/scale.md."""

    executor: str = "local"
    ray_address: str | None = None
    workers: int | None = None
    generator: str = "local"
    base_url: str | None = None
    generator_model: str | None = None
    vllm_args: str | None = None

    def check(self) -> None:
        from personaxis.backends import check_options

        check_options(**asdict(self))

    @contextmanager
    def open(
        self, model: ChatModel, layers: Sequence[int], captures: Sequence[str], batch_size: int
    ) -> Iterator[Backend]:
        from personaxis.backends import backend_from_options

        backend = backend_from_options(model, layers, captures, batch_size=batch_size, **asdict(self))
        try:
            yield backend
        finally:
            close = getattr(backend, "close", None)
            if close is not None:
                close()


ModelOpt = Annotated[str, typer.Option("--model", "-m", help="hub id, local folder, .gguf file, or an embedded name")]
DtypeOpt = Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16")]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1, mps... (default: where the model loads)")]


def load(spec: str, dtype: str = "auto", device: str | None = None) -> ChatModel:
    """The model a command names, loaded while a line says so (a spinner on a terminal, plain lines in a log)."""
    from personaxis.common.progress import working

    with working(f"loading {spec}"):  # torch and transformers are imported inside: they take seconds too
        from personaxis.model import load_model

        return load_model(spec, dtype=dtype, device=device)


GeneratorOpt = Annotated[str, typer.Option(help="local (the HF runtime) or vllm (vLLM in this process)")]
VLLMArgsOpt = Annotated[str | None, typer.Option(help=_OPTIONS[-1][3])]


def check_generator(generator: str, vllm_args: str | None) -> None:
    """`--generator local|vllm` and `--vllm-args` of the commands that generate on the local model only; checked
    before anything is loaded."""
    from personaxis.backends import check_options
    from personaxis.errors import PersonaxisError

    if generator not in ("local", "vllm"):
        raise PersonaxisError(f"unknown generator {generator!r} (choose from local, vllm)")
    check_options(generator=generator, vllm_args=vllm_args)


def open_generator(model: ChatModel, generator: str, vllm_args: str | None, batch_size: int) -> VLLMModel | None:
    """vLLM on `model`'s weights for `--generator vllm`, else None (the command generates with `model`)."""
    from personaxis.backends import open_vllm

    return open_vllm(model, batch_size, vllm_args) if generator == "vllm" else None


def judge_on(backend: Backend, spec: str, *, cache: Any, model: ChatModel) -> Judge | None:
    """The judge that runs on the backend's own workers, if the spec asks for one: `local:same` on Ray judges with
    the actors' replicas. None for every other case (the caller builds that judge as usual)."""
    from personaxis.backends import RayBackend, RayJudge

    if spec == "local:same" and isinstance(backend, RayBackend):
        return RayJudge(backend, judge_id=f"local:{model.name}", cache=cache)
    return None


def backend_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give a typer command the backend options; it receives them as one keyword, `backend_options`."""
    signature = inspect.signature(command, eval_str=True)
    kept = [p for p in signature.parameters.values() if p.name != "backend_options"]
    added = [
        inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, typer.Option(help=text)]
        )
        for name, kind, default, text in _OPTIONS
    ]

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        options = BackendOptions(**{name: kwargs.pop(name) for name, *_ in _OPTIONS})
        return command(*args, backend_options=options, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=[*kept, *added])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in [*kept, *added]}
    return wrapper

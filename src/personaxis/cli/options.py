"""The options and helpers every command shares, declared once: the model options, `load` (a model, with a line
while it loads), and the backend options of the pipeline commands (`axis build`, `trait extract`).

`@backend_options` adds ``--executor``, ``--ray-address``, ``--workers``, ``--generator``, ``--base-url``,
``--generator-model`` and ``--vllm-args`` to a typer command and hands the command one `BackendOptions` (its keyword
`backend_options`).
`BackendOptions.check` refuses a wrong mix before anything is loaded; `BackendOptions.open` makes the backend with one
call of `backend_from_options` and closes it afterwards (a Ray backend stops its actors). The server's key, if it
needs one, comes from ``OPENAI_API_KEY``: a key on the command line would show in the process list.

The checks at the command line's boundary live here too, once for every command: `number` and `real` (an
option's range; for a float also no NaN or infinity), the shared option types built on them (`BatchSizeOpt`,
`MaxTokensOpt`, `TemperatureOpt`, `SeedOpt`), and `check_output`, which every command that writes a file or a
folder calls before any work.

Kept free of heavy imports: the command line starts without torch.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
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


# -- numbers: ranges and finiteness -----------------------------------------------------------------------------------

SEED_MAX = 2**32 - 1  # what every generator takes: torch, numpy (via transformers' set_seed) and vLLM


def _finite(value: float | None) -> float | None:
    """An option's callback: NaN and the infinities are refused as what they are."""
    if isinstance(value, float) and math.isnan(value):
        raise typer.BadParameter(f"{value} is not a number")
    if isinstance(value, float) and math.isinf(value):
        raise typer.BadParameter(f"{value} is not finite")
    return value


def number(help: str, *, min: int | None = None, max: int | None = None, **kwargs: Any) -> Any:
    """An integer `typer.Option` within [min, max] (typer's own range check)."""
    return typer.Option(help=help, min=min, max=max, **kwargs)


def real(help: str, *, min: float | None = None, max: float | None = None, **kwargs: Any) -> Any:
    """A float `typer.Option` that is a finite number within [min, max]. The range is checked here, after NaN and
    inf, so that ``nan`` is called what it is rather than out of range."""

    def check(value: float | None) -> float | None:
        _finite(value)
        if value is not None and min is not None and value < min:
            raise typer.BadParameter(f"{value:g} is below the smallest allowed value, {min:g}")
        if value is not None and max is not None and value > max:
            raise typer.BadParameter(f"{value:g} is above the largest allowed value, {max:g}")
        return value

    return typer.Option(help=help, callback=check, **kwargs)


BatchSizeOpt = Annotated[int, number("sequences run through the model together", min=1)]
MaxTokensOpt = Annotated[int, number("the longest reply, in new tokens", min=1)]
TemperatureOpt = Annotated[float, real("sampling temperature; 0 is greedy", min=0.0)]
SeedOpt = Annotated[int, number(f"random seed (0 to {SEED_MAX})", min=0, max=SEED_MAX)]
OptionalSeedOpt = Annotated[
    int | None, number(f"random seed (0 to {SEED_MAX}) for sampled replies", min=0, max=SEED_MAX)
]


def finite_floats(text: str, what: str) -> tuple[float, ...]:
    """Comma-separated numbers typed by a user, each finite."""
    from personaxis.errors import PersonaxisError

    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise PersonaxisError(f"bad {what} {text!r}: give comma-separated numbers, e.g. -0.1,0,0.1,0.2") from None
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise PersonaxisError(f"bad {what} {text!r}: {bad[0]} is not a finite number")
    return values


# -- outputs: never an input, always writable -------------------------------------------------------------------------


def _real(path: Path) -> Path:
    """The path with `~`, `..` and every symlink resolved, whether or not it exists."""
    return Path(os.path.realpath(path.expanduser()))


def _same(a: Path, b: Path) -> bool:
    if _real(a) == _real(b):
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def check_output(
    path: Path | None,
    *,
    inputs: Iterable[Path | None] = (),
    force: bool | None = None,
    folder: bool = False,
    writes: Iterable[str] = (),
    suffixes: Sequence[str] = (),
    option: str = "--out",
) -> Path | None:
    """Refuse an output before any work is done, in one line: one that is (or links to) one of the command's
    `inputs`, a file where a folder is wanted or the other way round, an existing file when `force` is False (a
    command without ``--force`` passes None), and a place that cannot be written (the nearest existing folder is
    probed with a temporary file, which is removed at once). A missing parent folder is fine if it can be created:
    the writers create it. For a `folder`, `writes` names the files the command writes in it; none may be an input.
    No path (an option left to its default) passes.
    """
    if path is None:
        return None
    from personaxis.errors import PersonaxisError

    if suffixes and path.suffix not in suffixes:
        raise PersonaxisError(f"{option} {path}: the output must end in {' or '.join(suffixes)}")
    sources = [source for source in inputs if source is not None]
    for target in [path, *(path / name for name in writes)]:
        for source in sources:
            if _same(target, source):
                what = f"{option} {path}" if target == path else f"{target} (written in {option} {path})"
                raise PersonaxisError(
                    f"{what} is the input {source}: writing it would destroy the input; choose another output"
                )
    if folder and path.exists() and not path.is_dir():
        raise PersonaxisError(f"{option} {path} is a file, not a folder")
    if not folder and path.is_dir():
        raise PersonaxisError(f"{option} {path} is a folder, expected a file path")
    if not folder and force is False and path.exists():
        raise PersonaxisError(f"{path} exists: pass --force to replace it")
    target = _real(path)
    parent = target if folder else target.parent
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        why = "is a file, not a folder" if existing == parent else f"cannot be created: {existing} is a file"
        raise PersonaxisError(f"cannot write {path}: {parent} {why}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".personaxis-", suffix=".probe", dir=existing)
    except OSError as e:
        raise PersonaxisError(
            f"cannot write {path}: the folder {existing} is not writable ({e.strerror or e})"
        ) from None
    os.close(fd)
    os.unlink(probe)
    return path

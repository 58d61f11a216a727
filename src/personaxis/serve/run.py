"""`personaxis serve`: load the model and the artifacts named on the command line, then serve on loopback."""

from __future__ import annotations

import ipaddress
import socket

import uvicorn

from personaxis.common.datasets import read_json
from personaxis.common.progress import stderr_console, working
from personaxis.errors import PersonaxisError
from personaxis.serve.app import Limits, create_app
from personaxis.serve.loop import ClosedLoop
from personaxis.vectors import load_vectors_dir


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _check_can_listen(host: str, port: int) -> None:
    """Bind (host, port) once, as the server will (address reuse on), and say in one line why that fails."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, OverflowError) as err:
        raise PersonaxisError(f"cannot listen on {host}:{port}: {err}") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            raise PersonaxisError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None


def check_engine(engine: str, batch_invariant: bool | None) -> None:
    """`serve --engine hf|vllm`, checked before anything loads."""
    if engine not in ("hf", "vllm"):
        raise PersonaxisError(f"unknown engine {engine!r} (choose from hf, vllm)")
    if engine == "vllm" and batch_invariant:
        raise PersonaxisError("--batch-invariant is a setting of the HF engine; vLLM batches by itself")


def run_server(
    model_spec: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    axis_path: str | None = None,
    caps_path: str | None = None,
    vectors_dir: str | None = None,
    api_key: str | None = None,
    space_path: str | None = None,
    threshold: float | None = None,
    window: int = 2,
    dtype: str = "auto",
    limits: Limits = Limits(),
    batch_invariant: bool | None = None,
    engine: str = "hf",
    vllm_args: str | None = None,
) -> None:
    """Serve until interrupted. Binding beyond loopback without an API key is refused: the model would be open."""
    from personaxis.model import load_model
    from personaxis.vectors.artifact import Vectors
    from personaxis.vectors.cap import CapConfig

    check_engine(engine, batch_invariant)
    if vllm_args is not None and engine != "vllm":
        raise PersonaxisError("--vllm-args needs --engine vllm")
    if engine == "vllm":
        from personaxis.backends import parse_vllm_args
        from personaxis.vllm import require_vllm

        parse_vllm_args(vllm_args)
        require_vllm()
    if not _loopback(host) and not api_key:
        raise PersonaxisError(f"refusing to serve on {host} without --api-key (only loopback may go without one)")
    # every file and setting is checked before the model loads: a mistake costs seconds, not a model's load time
    _check_can_listen(host, port)
    axis = Vectors.load(axis_path) if axis_path else None
    caps = CapConfig.load(caps_path) if caps_path else None
    vectors = load_vectors_dir(vectors_dir) if vectors_dir else None
    space = read_json(space_path) if space_path else None
    if space is not None and not isinstance(space, dict):
        raise PersonaxisError(f"{space_path}: expected a JSON object (the space.json of an axis build)")
    try:
        policy = ClosedLoop(threshold=threshold, window=window) if threshold is not None else None
    except ValueError as err:
        raise PersonaxisError(f"closed loop: {err}") from None
    with working(f"loading {model_spec}" + (" in vLLM" if engine == "vllm" else "")):
        if engine == "vllm":
            from personaxis.backends import parse_vllm_args
            from personaxis.vllm import VLLMModel

            args = {"max_num_seqs": limits.max_batch} | parse_vllm_args(vllm_args)
            model = VLLMModel(model_spec, dtype=dtype, **args)
        else:
            model = load_model(model_spec, dtype=dtype)
    app = create_app(
        model, axis=axis, caps=caps, vectors=vectors, api_key=api_key, limits=limits, policy=policy, space=space,
        batch_invariant=batch_invariant,
    )  # fmt: skip
    _Server(uvicorn.Config(app, host=host, port=port, log_level="info")).run()


class _Server(uvicorn.Server):
    """uvicorn's server, saying in one line where to go once it listens."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            config = self.config
            shown = f"[{config.host}]" if ":" in config.host else config.host
            url = f"http://{shown}:{config.port}"
            stderr_console().print(
                f"serving on {url} (dashboard: {url}/, OpenAI API: {url}/v1; Ctrl-C stops)", markup=False,
                highlight=False, soft_wrap=True,
            )  # fmt: skip

"""`personaxis serve`: load the model and the artifacts named on the command line, then serve on loopback."""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path

from personaxis.errors import PersonaxisError
from personaxis.serve.app import Limits, create_app
from personaxis.serve.loop import ClosedLoop


def load_vectors_dir(path: str | os.PathLike[str]) -> dict:
    """Every `*.safetensors` vector artifact in a folder, named by file stem (cap files are skipped)."""
    from personaxis.vectors.artifact import Vectors

    folder = Path(path)
    if not folder.is_dir():
        raise PersonaxisError(f"no vectors folder at {folder}")
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        try:
            out[file.stem] = Vectors.load(file)
        except PersonaxisError as exc:
            if "cap artifact" not in str(exc):
                raise
    return out


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


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
) -> None:
    """Serve until interrupted. Binding beyond loopback without an API key is refused: the model would be open."""
    import uvicorn

    from personaxis.model import load_model
    from personaxis.vectors.artifact import Vectors
    from personaxis.vectors.cap import CapConfig

    if not _loopback(host) and not api_key:
        raise PersonaxisError(f"refusing to serve on {host} without --api-key (only loopback may go without one)")
    model = load_model(model_spec, dtype=dtype)
    axis = Vectors.load(axis_path) if axis_path else None
    caps = CapConfig.load(caps_path) if caps_path else None
    vectors = load_vectors_dir(vectors_dir) if vectors_dir else None
    space = json.loads(Path(space_path).read_text()) if space_path else None
    policy = ClosedLoop(threshold=threshold, window=window) if threshold is not None else None
    app = create_app(
        model, axis=axis, caps=caps, vectors=vectors, api_key=api_key, limits=limits, policy=policy, space=space,
        batch_invariant=batch_invariant,
    )  # fmt: skip
    uvicorn.run(app, host=host, port=port, log_level="info")

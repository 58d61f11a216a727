"""Plumbing shared by the vector artifacts: atomic writes, one-file safetensors with JSON metadata, checks.

Every artifact is ONE `.safetensors` file: the tensors plus, in the header's string metadata, the artifact kind and
its metadata as JSON. One self-contained file cannot lose its sidecar, and safetensors cannot execute code on load.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from personaxis.errors import PersonaxisError

KIND_KEY = "personaxis.kind"
META_KEY = "personaxis.meta"
_UMASK = os.umask(0)  # read once, at import: the umask can only be read by setting it
os.umask(_UMASK)


class ModelInfo(Protocol):
    """What `validate` needs to know about a model; any object with these attributes will do."""

    name: str
    n_layers: int
    hidden_size: int


def one_line(text: object) -> str:
    """Error messages are printed on one line by the CLI."""
    return " ".join(str(text).split())


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path` and move it into place only if the block succeeds.

    A failure mid-write leaves the previous file (or none), never half a file that a later run would trust.
    The temporary file lives in the same folder so that `os.replace` is an atomic rename; it gets the usual
    permissions rather than mkstemp's private ones. A folder that cannot be written is one line
    (`PersonaxisError`), as is any other failure of the file system.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise PersonaxisError(f"cannot write {path}: {e.strerror or one_line(e)}") from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise PersonaxisError(f"cannot write {path}: {e.strerror or one_line(e)}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_finite(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor]) -> None:
    """No artifact is ever written with a NaN or an infinity in it: refuse the file in one line instead."""
    for name in sorted(tensors):
        value = tensors[name]
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise PersonaxisError(f"refusing to write {path}: tensor {name!r} holds NaN or infinite values")


def save_canonical(tensors: dict[str, torch.Tensor], filename: str, metadata: dict[str, str]) -> None:
    """A safetensors file whose bytes depend only on the tensors and the metadata, not on dict or hash-map order.

    safetensors already lays the tensor data out in a fixed order (by dtype alignment, then name), but it writes
    the header's string metadata in hash-map order, which changes from process to process. The header is therefore
    written again as JSON with sorted keys, padded with spaces to 8 bytes as safetensors pads it; the data, and
    the offsets (relative to the end of the header), are unchanged.
    """
    data = save({k: tensors[k] for k in sorted(tensors)}, metadata=metadata)
    size = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    with open(filename, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        f.write(memoryview(data)[8 + size :])


def write_artifact(
    path: str | os.PathLike[str],
    tensors: dict[str, torch.Tensor],
    kind: str,
    meta: str,
    header: dict[str, str] | None = None,
) -> None:
    """Write tensors and JSON metadata (plus any other header strings) as one safetensors file, atomically.

    The same tensors and metadata give the same bytes, whatever order they were built in (`save_canonical`).
    """
    check_finite(path, tensors)
    with atomic_path(path) as tmp:
        save_canonical(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
            str(tmp),
            {**(header or {}), KIND_KEY: kind, META_KEY: meta},
        )


def read_artifact(path: str | os.PathLike[str], kind: str) -> tuple[dict[str, torch.Tensor], str, dict[str, str]]:
    """Read back what `write_artifact` wrote (tensors, metadata JSON, header); refuse other files in one line."""
    path = Path(path)
    if not path.is_file():
        raise PersonaxisError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise PersonaxisError(f"{path} is not a readable safetensors file: {one_line(e)}") from None
    found = header.get(KIND_KEY)
    if found is None or META_KEY not in header:
        raise PersonaxisError(f"{path} is not a personaxis artifact (no personaxis metadata in its header)")
    if found != kind:
        raise PersonaxisError(f"{path} holds a {found} artifact, not {kind}")
    return tensors, header[META_KEY], header


def check_layers(layers: Sequence[int], n_layers: int) -> list[int]:
    """Layers are distinct block indices in increasing order, each inside the model."""
    out = [int(i) for i in layers]
    if not out:
        raise PersonaxisError("no layers given")
    if any(b <= a for a, b in zip(out, out[1:], strict=False)):
        raise PersonaxisError(f"layers must be distinct and increasing, got {out}")
    if out[0] < 0 or out[-1] >= n_layers:
        raise PersonaxisError(
            f"layers {out[0]}..{out[-1]} do not fit a model with {n_layers} layers (0..{n_layers - 1})"
        )
    return out


def as_rows(name: str, value: torch.Tensor, layers: Sequence[int], hidden_size: int) -> torch.Tensor:
    """A float32 CPU copy of `value` shaped [len(layers), hidden_size], with every row a finite non-zero direction."""
    if not isinstance(value, torch.Tensor):
        raise PersonaxisError(f"direction {name!r} must be a tensor, got {type(value).__name__}")
    shape = (len(layers), hidden_size)
    if tuple(value.shape) != shape:
        raise PersonaxisError(f"direction {name!r} has shape {tuple(value.shape)}, expected {shape}")
    rows = value.detach().to(device="cpu", dtype=torch.float32).clone().contiguous()
    finite = torch.isfinite(rows).all(dim=1).tolist()
    norms = rows.norm(dim=1).tolist()
    for layer, ok, norm in zip(layers, finite, norms, strict=True):
        if not ok:
            raise PersonaxisError(f"direction {name!r} at layer {layer} is not finite (NaN or inf)")
        if norm == 0.0:
            raise PersonaxisError(f"direction {name!r} at layer {layer} has zero norm")
    return rows


def fit_model(
    what: str, model_id: str, n_layers: int, hidden_size: int, layers: Sequence[int], model: ModelInfo
) -> list[str]:
    """Raise if the artifact cannot be applied to `model`; return warnings for what is merely suspicious."""
    if hidden_size != model.hidden_size:
        raise PersonaxisError(f"{what} has hidden size {hidden_size} but model {model.name} has {model.hidden_size}")
    outside = [i for i in layers if not 0 <= i < model.n_layers]
    if outside:
        raise PersonaxisError(
            f"{what} uses layers {outside} but model {model.name} has {model.n_layers} layers (0..{model.n_layers - 1})"
        )
    warnings = []
    if model_id != model.name:
        warnings.append(f"{what} was made for {model_id}, not {model.name}")
    if n_layers != model.n_layers:
        warnings.append(f"{what} was made for a model with {n_layers} layers, {model.name} has {model.n_layers}")
    return warnings

"""Import the vectors and capping configs published with the two papers' reference code.

Both reference projects store `.pt` pickles. They are read here ONLY with `torch.load(..., weights_only=True)`: a
pickle that would build anything beyond tensors, plain containers and numpy numbers is refused, and its code never
runs. (numpy scalars and numeric arrays are allowed because they are plain data, and configs often hold them.)

What the formats are, as found by reading the reference code (not its documentation alone):

**assistant-axis** (Lu et al.). Activations are recorded with forward hooks on the decoder layers, one row per
block, so row i of every `(n_layers, hidden)` tensor is the output of block i: the same convention as personaxis,
no shift. The axis file is either a bare tensor (the published per-model files, in bf16) or a dict whose "axis"
entry is the tensor (what their pipeline writes, beside "default_mean", "role_mean", "n_default", "n_roles"). A
role vector is either a bare tensor (published `role_vectors/<role>.pt`) or a dict {"vector", "type", "role"}
where type "pos_3" means the mean over fully-played replies and "mean" the unfiltered default mean. Role vectors
are means (positions), not differences; the axis is mean(default) − mean(roles) and points toward the Assistant.

Their capping config is a dict {"vectors": {name: {"layer", "vector"}}, "experiments": [{"id", "interventions":
[{"vector", "cap"}, ...]}]}, with ids such as "layers_46:54-p0.25" (blocks 46..53, threshold at the 25th
percentile). Interventions without "cap" are not caps and are skipped. Their steering code normalises the stored
vector (v / (‖v‖ + 1e-8)) and applies a CEILING at every position: `h ← h − v̂ · max(h·v̂ − cap, 0)`. The stored
vectors are not unit-norm; in the published configs they are the negated Assistant Axis (role-ward), so the
ceiling is the paper's floor on the axis. Each experiment becomes one `CapConfig(kind="ceiling")` here, with the
vectors kept as stored (only their direction matters); `as_floor()` gives the paper's form.

**persona_vectors** (Chen et al.). Vectors are computed from `output_hidden_states`, so a file is `[L+1, hidden]`:
row 0 is the embeddings and row i+1 the output of block i; their steering code then hooks block `layer - 1` for
vector row `layer`. Their "layer 20" is our layer 19. The last row is `hidden_states[L]`, which Hugging Face takes
after the final norm: it is not block L−1's raw output, so it is dropped along with row 0, and the artifact holds
blocks 0..L−2. Files are named `<trait>_response_avg_diff.pt`, `<trait>_prompt_avg_diff.pt` and
`<trait>_prompt_last_diff.pt` (response mean, prompt mean, last prompt token).

Both kinds of file are bare `(rows, hidden)` tensors, so a bare tensor is recognised by its file name or by
`n_layers` (rows == n_layers: block-indexed; rows == n_layers + 1: hidden_states-indexed); `format=` overrides.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from personaxis.errors import PersonaxisError
from personaxis.vectors._io import one_line
from personaxis.vectors.artifact import VectorMeta, Vectors, config_hash
from personaxis.vectors.cap import CapConfig, CapMeta

Format = Literal["auto", "assistant_axis", "role_vectors", "persona_vectors"]

_PERSONA_FILE = re.compile(r"(?P<trait>.+)_(?P<kind>response_avg|prompt_avg|prompt_last)_diff")
_PERSONA_AGGREGATION = {"response_avg": "response_mean", "prompt_avg": "prompt_mean", "prompt_last": "last_prompt"}
_PERCENTILE = re.compile(r"p(\d*\.?\d+)$")


def _numpy_data_globals() -> list[Any]:
    """numpy scalars, dtypes and numeric arrays: plain data that pickles reference by name, under both module paths."""
    import numpy as np

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    numeric = [np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]
    numeric += [np.float16, np.float32, np.float64]
    allowed: list[Any] = [np.dtype, np.ndarray, *{type(np.dtype(t)) for t in numeric}]
    for fn in (multiarray.scalar, multiarray._reconstruct):
        allowed += [(fn, f"numpy._core.multiarray.{fn.__name__}"), (fn, f"numpy.core.multiarray.{fn.__name__}")]
    return allowed


def load_pt(path: str | os.PathLike[str]) -> Any:
    """Load a `.pt` file without ever running code from it (tensors, containers and numpy numbers only)."""
    path = Path(path)
    if not path.is_file():
        raise PersonaxisError(f"no such file: {path}")
    _check_torch_file(path)
    try:
        with torch.serialization.safe_globals(_numpy_data_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a torch.load of a foreign file can fail in many ways; all are the user's file
        if "weights only load failed" not in str(e).lower():
            raise PersonaxisError(f"{path} is not a readable torch file: {one_line(e)}") from None
        opcode = re.search(r"Unsupported operand (\d+)", str(e))
        if opcode:  # a pickle protocol (4 or 5) the safe unpickler cannot read: what it builds is unknown
            raise PersonaxisError(
                f"refusing to load {path}: it was pickled with a protocol the weights-only loader does not read "
                f"(pickle opcode {opcode[1]}), so what it builds cannot be checked; re-save its tensors with "
                "torch.save's default protocol or as safetensors where you trust it"
            ) from None
        culprit = re.search(r"GLOBAL (\S+)|got <class '([^']+)'>", str(e))
        needs = f" (it needs {culprit[1] or culprit[2]})" if culprit else ""
        raise PersonaxisError(
            f"refusing to load {path}: it is a pickle that executes code or builds objects beyond tensors and plain "
            f"data{needs}; re-save its tensors with torch.save or safetensors where you trust it"
        ) from None


def _check_torch_file(path: Path) -> None:
    """A torch file is a zip archive (`torch.save` since torch 1.6) or a pickle (the legacy format, protocol 2 or
    later); anything else is refused for what it is, before the unpickler sees it."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise PersonaxisError(f"cannot read {path}: {e.strerror or one_line(e)}") from None
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return
    if not head:
        raise PersonaxisError(f"{path} is empty, not a torch file")
    try:
        head.decode("utf-8")
        looks = "it looks like text"
    except UnicodeDecodeError as e:
        looks = "it looks like text" if e.start > len(head) - 4 else f"it starts with bytes {head[:8].hex(' ')}"
    raise PersonaxisError(f"{path} is not a torch file (neither a zip archive from torch.save nor a pickle): {looks}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _provenance(fmt: str, *paths: Path) -> tuple[str, dict[str, Any]]:
    """config_hash and extra for an import: the 'configuration' of an import is its format and source bytes."""
    sources = {str(p): _sha256(p) for p in paths}
    return config_hash({"import": fmt, "sources": sorted(sources.values())}), {"sources": sources}


def _matrix(path: Path, value: Any, what: str = "tensor") -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.ndim != 2:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise PersonaxisError(f"{path}: expected a (rows, hidden) {what}, got {shape}")
    if 0 in value.shape:
        raise PersonaxisError(f"{path}: the {what} is empty (shape {tuple(value.shape)})")
    return value.detach().to(torch.float32)


def _vector(path: Path, name: object, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.ndim != 1 or value.numel() == 0:
        raise PersonaxisError(f"{path}: vector {name!r} is not a non-empty 1-D tensor")
    return value.detach().to(torch.float32)


def _detect(path: Path, obj: Any, n_layers: int | None) -> Format:
    if isinstance(obj, dict):
        if _is_capping(obj):
            raise PersonaxisError(f"{path} is a capping config: use import_capping_config")
        if "axis" in obj:
            return "assistant_axis"
        if "vector" in obj:
            return "role_vectors"
    if isinstance(obj, torch.Tensor) and obj.ndim == 2:
        if _PERSONA_FILE.fullmatch(path.stem):
            return "persona_vectors"
        if "axis" in path.stem:
            return "assistant_axis"
        if path.parent.name == "role_vectors":
            return "role_vectors"
        if n_layers is not None and obj.shape[0] == n_layers:
            return "assistant_axis"
        if n_layers is not None and obj.shape[0] == n_layers + 1:
            return "persona_vectors"
        raise PersonaxisError(
            f"cannot tell whether {path} ({obj.shape[0]} rows) has one row per block (assistant-axis) or per "
            "hidden state (persona_vectors, row 0 = embeddings): say which with format= (--format) or the "
            "model's block count n_layers= (--n-layers)"
        )
    raise PersonaxisError(f"{path} holds {type(obj).__name__}, which is not a known vector layout")


def _axis(path: Path, obj: Any, model_id: str | None, n_layers: int | None, name: str | None) -> Vectors:
    raw = obj["axis"] if isinstance(obj, dict) else obj
    rows = _matrix(path, raw, "axis")
    if n_layers is not None and rows.shape[0] != n_layers:
        raise PersonaxisError(
            f"{path} has {rows.shape[0]} rows but the model has {n_layers} layers: "
            "an assistant-axis file has one row per block"
        )
    counts = {k: _count(path, k, obj[k]) for k in ("n_default", "n_roles") if isinstance(obj, dict) and k in obj}
    digest, extra = _provenance("assistant_axis", path)
    meta = VectorMeta(
        model_id=model_id or "unknown",
        hidden_size=rows.shape[1],
        n_layers=rows.shape[0],
        method="import:assistant_axis",
        points_toward="the default Assistant, away from role-play (mean of default replies minus mean of roles)",
        aggregation="response_mean",
        counts=counts,
        config_hash=digest,
        extra={**extra, "source_dtype": str(raw.dtype)},
    )
    return Vectors(range(rows.shape[0]), {name or "axis": rows}, meta)


def _count(path: Path, key: str, value: Any) -> int:
    try:
        count = int(value.item() if isinstance(value, torch.Tensor) else value)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise PersonaxisError(f"{path}: {key!r} is not a count ({type(value).__name__})") from None
    if not 0 <= count < 2**63 or count != value:
        raise PersonaxisError(f"{path}: {key!r} is not a count (got {value!r:.40})")
    return count


def _role_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(path.glob("*.pt"))
        if not files:
            raise PersonaxisError(f"no .pt files in {path}")
        return files
    return [path]


def _roles(path: Path, model_id: str | None, n_layers: int | None, name: str | None) -> Vectors:
    files = _role_files(path)
    data: dict[str, torch.Tensor] = {}
    types: dict[str, str] = {}
    for file in files:
        obj = load_pt(file)
        raw = obj.get("vector") if isinstance(obj, dict) else obj
        role = str(obj.get("role", file.stem)) if isinstance(obj, dict) else file.stem
        if len(files) == 1 and name:
            role = name
        data[role] = _matrix(file, raw, "role vector")
        if isinstance(obj, dict) and "type" in obj:
            types[role] = str(obj["type"])
    shapes = {tuple(v.shape) for v in data.values()}
    if len(shapes) != 1:
        raise PersonaxisError(f"role vectors in {path} have different shapes {sorted(shapes)}")
    n_rows, hidden = shapes.pop()
    if n_layers is not None and n_rows != n_layers:
        raise PersonaxisError(f"role vectors in {path} have {n_rows} rows but the model has {n_layers} layers")
    digest, extra = _provenance("role_vectors", *files)
    meta = VectorMeta(
        model_id=model_id or "unknown",
        hidden_size=hidden,
        n_layers=n_rows,
        method="role_mean",
        points_toward="the mean response activation of each role: a position in activation space, not a difference",
        aggregation="response_mean",
        config_hash=digest,
        extra={**extra, "types": types} if types else extra,
    )
    return Vectors(range(n_rows), data, meta)


def _persona(path: Path, obj: Any, model_id: str | None, n_layers: int | None, name: str | None) -> Vectors:
    rows = _matrix(path, obj, "persona vector")
    n_states = rows.shape[0]
    if n_states < 3:
        raise PersonaxisError(f"{path} has {n_states} rows: too few for a persona_vectors file [n_layers + 1, hidden]")
    blocks = n_states - 1
    if n_layers is not None and n_layers != blocks:
        raise PersonaxisError(
            f"{path} has {n_states} rows but a persona_vectors file for {n_layers} layers has {n_layers + 1}"
        )
    match = _PERSONA_FILE.fullmatch(path.stem)
    trait = name or (match["trait"] if match else path.stem)
    digest, extra = _provenance("persona_vectors", path)
    meta = VectorMeta(
        model_id=model_id or "unknown",
        hidden_size=rows.shape[1],
        n_layers=blocks,
        method="import:persona_vectors",
        points_toward=f"more {trait} (trait-eliciting minus trait-suppressing system prompts)",
        aggregation=_PERSONA_AGGREGATION[match["kind"]] if match else "response_mean",
        config_hash=digest,
        extra={
            **extra,
            "source_rows": n_states,
            "dropped_rows": {"0": "embeddings", str(blocks): "after the final norm, not block output"},
        },
    )
    # Row i + 1 of the file is the output of block i; the last block's row is post-norm and is left out.
    return Vectors(range(blocks - 1), {trait: rows[1:blocks]}, meta)


def import_vectors(
    path: str | os.PathLike[str],
    *,
    format: Format = "auto",
    model_id: str | None = None,
    n_layers: int | None = None,
    name: str | None = None,
) -> Vectors:
    """Import an assistant-axis axis or role vector(s), or a persona_vectors file, as block-indexed `Vectors`.

    A folder is read as assistant-axis role vectors, one name per file. `n_layers` (the model's block count) both
    checks the file and settles a bare tensor's layout; `model_id` is recorded since the files do not carry it.
    """
    format = _checked(format)
    path = Path(path)
    if path.is_dir():
        if format not in ("auto", "role_vectors"):
            raise PersonaxisError(f"{path} is a folder: only role_vectors are imported from a folder")
        return _roles(path, model_id, n_layers, name)
    return _vectors(path, load_pt(path), format, model_id, n_layers, name)


def _checked(format: str) -> Format:
    if format not in get_args(Format):
        raise PersonaxisError(f"unknown format {format!r}: use one of {', '.join(get_args(Format))}")
    return format  # type: ignore[return-value]


def _vectors(
    path: Path, obj: Any, format: Format, model_id: str | None, n_layers: int | None, name: str | None
) -> Vectors:
    fmt = _detect(path, obj, n_layers) if format == "auto" else format
    if fmt == "assistant_axis":
        return _axis(path, obj, model_id, n_layers, name)
    if fmt == "role_vectors":
        return _roles(path, model_id, n_layers, name)
    return _persona(path, obj, model_id, n_layers, name)


def _percentile(experiment_id: str) -> float | None:
    match = _PERCENTILE.search(experiment_id)
    if not match:
        return None
    value = float(match[1])
    return value * 100 if value <= 1 else value


def import_capping_config(
    path: str | os.PathLike[str], *, model_id: str | None = None, n_layers: int | None = None
) -> dict[str, CapConfig]:
    """One ceiling `CapConfig` per experiment id of an assistant-axis capping config (experiments without caps are
    skipped). `n_layers` defaults to one past the highest layer the config names."""
    path = Path(path)
    return _capping(path, load_pt(path), model_id, n_layers)


def _is_capping(obj: Any) -> bool:
    return isinstance(obj, dict) and "vectors" in obj and "experiments" in obj


def _capping(path: Path, obj: Any, model_id: str | None, n_layers: int | None) -> dict[str, CapConfig]:
    if not _is_capping(obj):
        raise PersonaxisError(f"{path} is not a capping config (a dict with 'vectors' and 'experiments')")
    try:
        stored = {str(k): (int(v["layer"]), _vector(path, k, v["vector"])) for k, v in obj["vectors"].items()}
        plans: dict[str, dict[int, tuple[torch.Tensor, float]]] = {}
        for experiment in obj["experiments"]:
            eid = str(experiment["id"])
            plan: dict[int, tuple[torch.Tensor, float]] = {}
            for intervention in experiment["interventions"]:
                if "cap" not in intervention:
                    continue
                layer, vector = stored[str(intervention["vector"])]
                if layer in plan:
                    raise PersonaxisError(f"{path}: experiment {eid} caps layer {layer} twice; a CapConfig holds one")
                plan[layer] = (vector, float(intervention["cap"]))
            if plan:
                plans[eid] = plan
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise PersonaxisError(f"{path} is not a capping config as the assistant-axis code writes it: {e!r}") from None
    if not plans:
        raise PersonaxisError(f"{path} has no experiment with caps")
    total = n_layers or 1 + max(layer for layer, _ in stored.values())
    digest, extra = _provenance("assistant_axis_capping", path)
    out: dict[str, CapConfig] = {}
    for eid, plan in plans.items():
        layers = sorted(plan)
        directions = torch.stack([plan[i][0] for i in layers])
        meta = CapMeta(
            model_id=model_id or "unknown",
            hidden_size=directions.shape[1],
            n_layers=total,
            method="import:assistant_axis_capping",
            points_toward="the capped direction (in the published configs: the negated Assistant Axis, role-ward)",
            aggregation="response_mean",
            config_hash=digest,
            extra={**extra, "experiment": eid},
            percentile=_percentile(eid),
            calibration_source="assistant-axis capping config",
        )
        out[eid] = CapConfig(layers, directions, [plan[i][1] for i in layers], "ceiling", meta)
    return out


def import_reference(
    path: str | os.PathLike[str],
    *,
    format: Format = "auto",
    model_id: str | None = None,
    n_layers: int | None = None,
    experiment: str | None = None,
) -> Vectors | CapConfig:
    """Whatever reference file `path` is: vectors, or one experiment of a capping config (`experiment`, which may be
    left out when the config holds only one)."""
    format, path = _checked(format), Path(path)
    obj = None if path.is_dir() else load_pt(path)
    if not _is_capping(obj):
        if experiment is not None:
            raise PersonaxisError(f"{path} is not a capping config: it has no experiments to choose from")
        if obj is None:  # a folder of role vectors
            return import_vectors(path, format=format, model_id=model_id, n_layers=n_layers)
        return _vectors(path, obj, format, model_id, n_layers, None)
    caps = _capping(path, obj, model_id, n_layers)
    if experiment is None and len(caps) == 1:
        return next(iter(caps.values()))
    if experiment not in caps:
        shown = ", ".join(list(caps)[:8]) + (f", ... ({len(caps)} in all)" if len(caps) > 8 else "")
        asked = "name one" if experiment is None else f"it has no experiment {experiment!r}"
        raise PersonaxisError(f"{path} is a capping config: {asked} with --experiment ({shown})")
    return caps[experiment]

"""The vector artifact: named per-layer directions in one model's residual stream, and what they mean.

A `Vectors` holds one or more named directions (a trait vector, the Assistant Axis, role means...) on one shared list
of layers. Layer i is the output of decoder block i (0-based), i.e. Hugging Face `hidden_states[i + 1]` and
llama.cpp's `direction.i`; the metadata says so explicitly so that a file read years later cannot be off by one.

Every constructor checks its input: a NaN, an infinity or a zero-norm row is refused at once, naming the direction
and the layer, instead of surfacing later as a silently broken steering run.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from personaxis import __version__
from personaxis.common.canonical import content_hash
from personaxis.errors import PersonaxisError
from personaxis.vectors._io import (
    ModelInfo,
    as_rows,
    check_layers,
    fit_model,
    one_line,
    read_artifact,
    write_artifact,
)

FORMAT_VERSION = 1
LAYER_CONVENTION = "output of block i"
KIND = "vectors"
_RESERVED = "layers"  # the tensor that stores the layer list in a saved file


def config_hash(config: Any) -> str:
    """sha256 hex of the canonical JSON of a configuration: two artifacts with equal hashes were produced the same
    way."""
    return content_hash(config)


class VectorMeta(BaseModel):
    """What a set of directions means and where it came from; saved inside the artifact."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_id: str
    model_revision: str | None = None
    hidden_size: int = Field(gt=0)
    n_layers: int = Field(gt=0, description="decoder blocks in the model, not rows in the artifact")
    layer_convention: Literal["output of block i"] = LAYER_CONVENTION
    method: str
    points_toward: str = Field(description="what the + sign of the directions means")
    aggregation: str = "response_mean"
    counts: dict[str, int] = Field(default_factory=dict)
    mean_norms: dict[int, float] | None = Field(
        default=None, description="mean residual norm per layer on neutral text: the unit of relative steering"
    )
    library_version: str = __version__
    config_hash: str | None = None
    extra: dict[str, Any] = Field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @field_validator("mean_norms")
    @classmethod
    def _positive_norms(cls, value: dict[int, float] | None) -> dict[int, float] | None:
        for layer, norm in (value or {}).items():
            if not (norm > 0 and norm != float("inf")):
                raise ValueError(f"mean norm at layer {layer} must be finite and positive, got {norm}")
        return value


M = TypeVar("M", bound=VectorMeta)


def parse_meta(cls: type[M], text: str, path: str | os.PathLike[str]) -> M:
    """Metadata from a file, with one-line errors and a clear word when the file is newer than this library."""
    from personaxis.common.datasets import loads

    raw = loads(text, f"{path}: metadata")
    version = raw.get("format_version", FORMAT_VERSION) if isinstance(raw, dict) else FORMAT_VERSION
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise PersonaxisError(
            f"{path} has format version {version}, this personaxis {__version__} reads up to {FORMAT_VERSION}: upgrade"
        )
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "metadata"
        raise PersonaxisError(f"{path}: invalid metadata at {where}: {one_line(first['msg'])}") from None


def opposite(points_toward: str) -> str:
    """Describe the negated direction, without stacking 'opposite of' twice."""
    prefix = "opposite of: "
    return points_toward[len(prefix) :] if points_toward.startswith(prefix) else prefix + points_toward


def compact_layers(layers: Sequence[int]) -> str:
    """'12..19' for a contiguous window, the list otherwise: reprs and messages stay short."""
    if len(layers) > 2 and list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}..{layers[-1]}"
    return str(list(layers))


class Vectors:
    """Named per-layer directions for one model, sharing one list of layers.

    `data[name]` is float32 `[len(layers), hidden]`; row k is the direction at block `layers[k]`. Names are kept
    sorted so that a file's content never depends on the order in which directions were added.

    Indexing: `v["evil"]` keeps one name, `v[20]` is the direction at layer 20 (when there is one name), and
    `v["evil", 20]` is both. Arithmetic (`a + b`, `a - b`, `c * a`, `-a`, `a / c`) needs the same model, layers and
    names on both sides, and like every constructor refuses a result with a zero-norm row (`a - a`).
    """

    def __init__(self, layers: Iterable[int], data: Mapping[str, torch.Tensor], meta: VectorMeta) -> None:
        self.meta = meta
        self.layers: list[int] = check_layers(list(layers), meta.n_layers)
        if not data:
            raise PersonaxisError("vectors need at least one named direction")
        for name in data:
            if not isinstance(name, str) or not name or name == _RESERVED:
                raise PersonaxisError(f"invalid direction name {name!r}: use a non-empty string other than 'layers'")
        self.data: dict[str, torch.Tensor] = {
            name: as_rows(name, data[name], self.layers, meta.hidden_size) for name in sorted(data)
        }

    # -- access -------------------------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self.data)

    @property
    def hidden_size(self) -> int:
        return self.meta.hidden_size

    def resolve(self, name: str | None = None) -> str:
        """The name to use: `name` itself if present; when omitted, the only one, or the file's declared primary."""
        if name is None:
            if len(self.data) == 1:
                return next(iter(self.data))
            primary = self.meta.extra.get("primary")
            if primary in self.data:
                return primary
            raise PersonaxisError(f"these vectors hold several directions {self.names}: name one")
        if name not in self.data:
            raise PersonaxisError(f"no direction named {name!r} (have {self.names})")
        return name

    def row(self, layer: int) -> int:
        """Row of `layer` in the data tensors."""
        try:
            return self.layers.index(int(layer))
        except ValueError:
            have = compact_layers(self.layers)
            raise PersonaxisError(f"layer {layer} is not in these vectors (layers {have})") from None

    def direction(self, layer: int, name: str | None = None) -> torch.Tensor:
        """The raw direction `[hidden]` at `layer` (a copy: editing it does not change the artifact)."""
        return self.data[self.resolve(name)][self.row(layer)].clone()

    def unit(self, layer: int, name: str | None = None) -> torch.Tensor:
        """The direction at `layer` scaled to norm 1: projections `h · v̂` are in the residual stream's units."""
        v = self.direction(layer, name)
        return v / v.norm()

    def units(self, name: str | None = None) -> torch.Tensor:
        """All layers' unit directions `[len(layers), hidden]`."""
        v = self.data[self.resolve(name)]
        return v / v.norm(dim=1, keepdim=True)

    def __getitem__(self, key: str | int | tuple[str, int]) -> Vectors | torch.Tensor:
        if isinstance(key, tuple):
            name, layer = key
            return self.direction(layer, name)
        if isinstance(key, str):
            return Vectors(self.layers, {key: self.data[self.resolve(key)]}, self.meta.model_copy(deep=True))
        return self.direction(key)

    def select(self, layers: Iterable[int]) -> Vectors:
        """The same directions on a subset of layers."""
        wanted = sorted({int(i) for i in layers})
        rows = [self.row(i) for i in wanted]
        return Vectors(wanted, {n: v[rows] for n, v in self.data.items()}, self.meta.model_copy(deep=True))

    def __repr__(self) -> str:
        return (
            f"Vectors({self.names}, layers={compact_layers(self.layers)}, hidden={self.hidden_size}, "
            f"model={self.meta.model_id!r}, method={self.meta.method!r})"
        )

    # -- arithmetic ---------------------------------------------------------------------------------------------

    def _combine(self, other: object, op: str) -> Vectors:
        if not isinstance(other, Vectors):
            return NotImplemented
        if other.meta.model_id != self.meta.model_id or other.hidden_size != self.hidden_size:
            raise PersonaxisError(
                f"cannot combine vectors of {self.meta.model_id} and {other.meta.model_id}: "
                "they live in different spaces"
            )
        if other.layers != self.layers:
            raise PersonaxisError(
                f"cannot combine vectors on layers {compact_layers(self.layers)} and {compact_layers(other.layers)}: "
                "select the same layers first"
            )
        if other.names != self.names:
            raise PersonaxisError(f"cannot combine vectors named {self.names} and {other.names}")
        fn = torch.add if op == "+" else torch.sub
        meta = self.meta.model_copy(
            deep=True,
            update={
                "method": f"({self.meta.method}) {op} ({other.meta.method})",
                "points_toward": f"({self.meta.points_toward}) {op} ({other.meta.points_toward})",
                "counts": {},
                "config_hash": config_hash({"op": op, "a": self.meta.config_hash, "b": other.meta.config_hash}),
            },
        )
        return Vectors(self.layers, {n: fn(self.data[n], other.data[n]) for n in self.names}, meta)

    def __add__(self, other: object) -> Vectors:
        return self._combine(other, "+")

    def __sub__(self, other: object) -> Vectors:
        return self._combine(other, "-")

    def __mul__(self, c: object) -> Vectors:
        if isinstance(c, bool) or not isinstance(c, int | float):
            return NotImplemented
        c = float(c)
        meta = self.meta.model_copy(
            deep=True,
            update={
                "method": f"{c:g} * ({self.meta.method})",
                "points_toward": self.meta.points_toward if c > 0 else opposite(self.meta.points_toward),
                "config_hash": config_hash({"op": "*", "c": c, "a": self.meta.config_hash}),
            },
        )
        return Vectors(self.layers, {n: v * c for n, v in self.data.items()}, meta)

    __rmul__ = __mul__

    def __neg__(self) -> Vectors:
        return self * -1.0

    def __truediv__(self, c: object) -> Vectors:
        if isinstance(c, bool) or not isinstance(c, int | float):
            return NotImplemented
        return self * (1.0 / c)

    # -- files and models ---------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write one self-contained `.safetensors` file (tensors per name, `layers`, JSON metadata), atomically."""
        try:  # the rows may have been edited since the constructor checked them
            tensors = {name: as_rows(name, v, self.layers, self.hidden_size) for name, v in self.data.items()}
        except PersonaxisError as e:
            raise PersonaxisError(f"refusing to write {path}: {e}") from None
        tensors[_RESERVED] = torch.tensor(self.layers, dtype=torch.int64)
        write_artifact(path, tensors, KIND, self.meta.model_dump_json())
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Vectors:
        """Read a file written by `save`; the same checks as the constructor apply."""
        tensors, text, _ = read_artifact(path, KIND)
        meta = parse_meta(VectorMeta, text, path)
        layers = tensors.pop(_RESERVED, None)
        if layers is None or layers.ndim != 1:
            raise PersonaxisError(f"{path} has no valid 'layers' tensor")
        try:
            return cls(layers.tolist(), tensors, meta)
        except PersonaxisError as e:
            raise PersonaxisError(f"{path}: {e}") from None

    def validate(self, model: ModelInfo) -> list[str]:
        """Raise if these vectors cannot be applied to `model`; return warnings (e.g. another model's name)."""
        return fit_model(
            f"vectors {self.names}", self.meta.model_id, self.meta.n_layers, self.hidden_size, self.layers, model
        )


def load_vectors_dir(path: str | os.PathLike[str]) -> dict[str, Vectors]:
    """Every `*.safetensors` vector artifact in a folder, named by file stem (cap files are skipped)."""
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
    if not out:
        raise PersonaxisError(f"{folder} holds no vector files (*.safetensors)")
    return out

"""Activation capping: keep the projection of the residual stream on one direction per layer within a bound.

Two equivalent conventions exist, and both are kept because both appear in the wild:

- **floor** (the Assistant Axis paper): `h ← h + â · max(τ − h·â, 0)` with â pointing toward the Assistant.
  Activations already Assistant-like enough are untouched; the others are lifted to the threshold.
- **ceiling** (the reference code's): `h ← h − û · max(h·û − τ, 0)`, a cap from above on the projection on û.

A ceiling on û at τ is exactly a floor on −û at −τ (`as_floor`). Only the direction of a stored vector matters:
it is normalised when applied, and τ is always in units of the projection `h · v̂` on the unit vector.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch

from personaxis.errors import PersonaxisError
from personaxis.vectors._io import ModelInfo, as_rows, check_layers, fit_model, read_artifact, write_artifact
from personaxis.vectors.artifact import VectorMeta, Vectors, compact_layers, opposite, parse_meta

CapKind = Literal["floor", "ceiling"]
KIND = "cap"


class CapMeta(VectorMeta):
    """VectorMeta plus how the thresholds were calibrated."""

    percentile: float | None = None
    calibration_source: str | None = None


class CapConfig:
    """One capping direction and one threshold τ per layer over a window of layers, as a floor or a ceiling."""

    def __init__(
        self,
        layers: Iterable[int],
        directions: torch.Tensor,
        tau: Sequence[float] | torch.Tensor,
        kind: CapKind,
        meta: CapMeta,
    ) -> None:
        if kind not in ("floor", "ceiling"):
            raise PersonaxisError(f"cap kind must be 'floor' or 'ceiling', got {kind!r}")
        self.kind: CapKind = kind
        self.meta = meta
        self.layers: list[int] = check_layers(list(layers), meta.n_layers)
        self.directions = as_rows("cap", directions, self.layers, meta.hidden_size)
        values = tau.tolist() if isinstance(tau, torch.Tensor) else list(tau)
        if len(values) != len(self.layers):
            raise PersonaxisError(f"{len(values)} thresholds for {len(self.layers)} layers")
        self.tau: list[float] = [float(t) for t in values]
        for layer, t in zip(self.layers, self.tau, strict=True):
            if not math.isfinite(t):
                raise PersonaxisError(f"cap threshold at layer {layer} is not finite ({t})")

    @classmethod
    def from_vectors(
        cls,
        vectors: Vectors,
        tau: Mapping[int, float],
        *,
        name: str | None = None,
        kind: CapKind = "floor",
        percentile: float | None = None,
        calibration_source: str | None = None,
    ) -> CapConfig:
        """Cap along one direction of `vectors` on the layers of `tau` (layer → threshold), keeping its metadata."""
        name = vectors.resolve(name)
        layers = sorted(tau)
        meta = CapMeta(
            **vectors.meta.model_dump(),
            percentile=percentile,
            calibration_source=calibration_source,
        )
        meta.extra = {**meta.extra, "direction_name": name}
        directions = torch.stack([vectors.direction(i, name) for i in layers])
        return cls(layers, directions, [tau[i] for i in layers], kind, meta)

    # -- access -------------------------------------------------------------------------------------------------

    def row(self, layer: int) -> int:
        try:
            return self.layers.index(int(layer))
        except ValueError:
            raise PersonaxisError(f"layer {layer} is not capped (layers {compact_layers(self.layers)})") from None

    def unit(self, layer: int) -> torch.Tensor:
        """The unit direction at `layer`: the vector the threshold is measured on."""
        v = self.directions[self.row(layer)]
        return v / v.norm()

    def threshold(self, layer: int) -> float:
        return self.tau[self.row(layer)]

    def apply(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """Cap activations `h [..., hidden]` at `layer`; the math runs in fp32 and the result has h's dtype."""
        u = self.unit(layer).to(h.device)
        tau = self.threshold(layer)
        x = h.float()
        proj = x @ u
        if self.kind == "floor":
            x = x + (tau - proj).clamp(min=0.0).unsqueeze(-1) * u
        else:
            x = x - (proj - tau).clamp(min=0.0).unsqueeze(-1) * u
        return x.to(h.dtype)

    def _flipped(self, kind: CapKind) -> CapConfig:
        meta = self.meta.model_copy(deep=True, update={"points_toward": opposite(self.meta.points_toward)})
        return CapConfig(self.layers, -self.directions, [-t for t in self.tau], kind, meta)

    def as_floor(self) -> CapConfig:
        """The same cap as a floor: a ceiling on û at τ is a floor on −û at −τ."""
        return self if self.kind == "floor" else self._flipped("floor")

    def as_ceiling(self) -> CapConfig:
        """The same cap as a ceiling: a floor on â at τ is a ceiling on −â at −τ."""
        return self if self.kind == "ceiling" else self._flipped("ceiling")

    def __repr__(self) -> str:
        return (
            f"CapConfig({self.kind}, layers={compact_layers(self.layers)}, hidden={self.meta.hidden_size}, "
            f"model={self.meta.model_id!r}, percentile={self.meta.percentile})"
        )

    # -- files and models ---------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write one self-contained `.safetensors` file, atomically (τ kept in float64, exactly as given)."""
        try:  # the rows and thresholds may have been edited since the constructor checked them
            directions = as_rows("cap", self.directions, self.layers, self.meta.hidden_size)
            bad = [layer for layer, t in zip(self.layers, self.tau, strict=True) if not math.isfinite(t)]
            if bad:
                raise PersonaxisError(f"cap threshold at layer {bad[0]} is not finite ({self.threshold(bad[0])})")
        except (PersonaxisError, ValueError) as e:
            raise PersonaxisError(f"refusing to write {path}: {e}") from None
        tensors = {
            "directions": directions,
            "tau": torch.tensor(self.tau, dtype=torch.float64),
            "layers": torch.tensor(self.layers, dtype=torch.int64),
        }
        write_artifact(path, tensors, KIND, self.meta.model_dump_json(), header={"personaxis.cap_kind": self.kind})
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CapConfig:
        tensors, text, header = read_artifact(path, KIND)
        meta = parse_meta(CapMeta, text, path)
        if set(tensors) != {"directions", "tau", "layers"}:
            raise PersonaxisError(f"{path} does not hold the tensors of a cap config")
        try:
            kind = header.get("personaxis.cap_kind")
            return cls(tensors["layers"].tolist(), tensors["directions"], tensors["tau"], kind, meta)
        except PersonaxisError as e:
            raise PersonaxisError(f"{path}: {e}") from None

    def validate(self, model: ModelInfo) -> list[str]:
        """Raise if this cap cannot be applied to `model`; return warnings (e.g. another model's name)."""
        return fit_model(
            "cap config", self.meta.model_id, self.meta.n_layers, self.meta.hidden_size, self.layers, model
        )

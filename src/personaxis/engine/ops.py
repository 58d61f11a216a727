"""The intervention and readout ops, as plain validated specs.

An op says *what* to do at which layers, for which batch rows and at which token positions; the `Engine` does it.
Directions are given per layer (`{layer: tensor[H]}`) because persona directions differ from layer to layer; builders
such as `Add.from_vectors` take them from a vector artifact. All math is done in float32.

Positions (`when`):
- "all": every real (non-padding) token;
- "prompt": the tokens of the prompt (everything present when the sequence was first run);
- "response": the positions whose output predicts a reply token: the last prompt token and every generated token.
  This is what "steer the reply" means under a KV cache, where the first reply token comes from the last prompt
  position.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from personaxis.errors import PersonaxisError

When = Literal["all", "prompt", "response"]
WHEN = ("all", "prompt", "response")


def _directions(directions: Mapping[int, torch.Tensor], what: str, unit: bool = False) -> dict[int, torch.Tensor]:
    if not directions:
        raise PersonaxisError(f"{what}: no layers given")
    out = {}
    for layer, vector in directions.items():
        v = torch.as_tensor(vector).detach().to(torch.float32).flatten().cpu()
        if not torch.isfinite(v).all():
            raise PersonaxisError(f"{what}: the vector at layer {layer} has NaN or infinite values")
        norm = float(v.norm())
        if unit and norm == 0.0:
            raise PersonaxisError(f"{what}: the vector at layer {layer} has zero norm")
        out[int(layer)] = v / norm if unit else v
    return out


def _per_layer(value: float | Mapping[int, float] | None, layers: Sequence[int], what: str) -> dict[int, float] | None:
    if value is None:
        return None
    values = dict(value) if isinstance(value, Mapping) else {layer: float(value) for layer in layers}
    missing = [layer for layer in layers if layer not in values]
    if missing:
        raise PersonaxisError(f"{what}: no threshold for layer(s) {missing}")
    for layer, v in values.items():
        if not math.isfinite(float(v)):
            raise PersonaxisError(f"{what}: threshold at layer {layer} is not finite")
    return {int(k): float(v) for k, v in values.items()}


@dataclass(eq=False)
class Op:
    """Common fields: the rows of the batch it applies to (None: all) and the token positions."""

    rows: tuple[int, ...] | None = field(default=None, kw_only=True)
    when: When = field(default="all", kw_only=True)

    def __post_init__(self) -> None:
        if self.when not in WHEN:
            raise PersonaxisError(f"{type(self).__name__}: 'when' must be one of {', '.join(WHEN)}")
        if self.rows is not None:
            self.rows = tuple(int(r) for r in self.rows)


@dataclass(eq=False)
class Add(Op):
    """h ← h + delta_i at each layer i (delta already scaled: α·v, or c·mean_norm·v̂)."""

    deltas: Mapping[int, torch.Tensor]

    def __post_init__(self) -> None:
        super().__post_init__()
        self.deltas = _directions(self.deltas, "add")

    @property
    def layers(self) -> list[int]:
        return sorted(self.deltas)

    @classmethod
    def scaled(
        cls,
        directions: Mapping[int, torch.Tensor],
        coef: float,
        *,
        mean_norms: Mapping[int, float] | None = None,
        **kwargs,
    ) -> Add:
        """α·v in raw units, or, given the layers' mean residual norms, c·mean_norm_i·v̂_i (portable across models)."""
        if not math.isfinite(coef):
            raise PersonaxisError("add: the coefficient must be finite")
        units = _directions(directions, "add", unit=mean_norms is not None)
        if mean_norms is None:
            return cls({layer: coef * v for layer, v in units.items()}, **kwargs)
        missing = [layer for layer in units if layer not in mean_norms]
        if missing:
            raise PersonaxisError(f"add: no mean residual norm for layer(s) {missing}; pass raw units instead")
        return cls({layer: coef * float(mean_norms[layer]) * v for layer, v in units.items()}, **kwargs)


@dataclass(eq=False)
class Ablate(Op):
    """h ← h − (h·v̂) v̂: remove the direction entirely (directional ablation, as in CAFT)."""

    directions: Mapping[int, torch.Tensor]

    def __post_init__(self) -> None:
        super().__post_init__()
        self.directions = _directions(self.directions, "ablate", unit=True)

    @property
    def layers(self) -> list[int]:
        return sorted(self.directions)


@dataclass(eq=False)
class Cap(Op):
    """Clamp the projection h·v̂ into [floor_i, ceiling_i], moving h only along v̂.

    A floor with â = the Assistant Axis is the paper's activation capping: h ← h + â·max(τ − h·â, 0).
    Activations already inside the bounds are untouched.
    """

    directions: Mapping[int, torch.Tensor]
    floor: float | Mapping[int, float] | None = None
    ceiling: float | Mapping[int, float] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.directions = _directions(self.directions, "cap", unit=True)
        if self.floor is None and self.ceiling is None:
            raise PersonaxisError("cap: give a floor, a ceiling or both")
        self.floor = _per_layer(self.floor, self.layers, "cap floor")
        self.ceiling = _per_layer(self.ceiling, self.layers, "cap ceiling")
        if self.floor and self.ceiling:
            bad = [layer for layer in self.layers if self.floor[layer] > self.ceiling[layer]]
            if bad:
                raise PersonaxisError(f"cap: floor above ceiling at layer(s) {bad}")

    @property
    def layers(self) -> list[int]:
        return sorted(self.directions)


@dataclass(eq=False)
class Project(Op):
    """Per-token readout of h·v̂ (the projection, in the units of the residual stream) under `name`."""

    name: str
    directions: Mapping[int, torch.Tensor]

    def __post_init__(self) -> None:
        super().__post_init__()
        self.directions = _directions(self.directions, f"project '{self.name}'", unit=True)

    @property
    def layers(self) -> list[int]:
        return sorted(self.directions)


@dataclass(eq=False)
class Record(Op):
    """Streaming weighted means of activations at `layers`, per row and per segment, never holding activations.

    `weights[b, s, k]` is the weight of absolute position s of row b in segment k (0/1 for plain means; pads are
    excluded automatically). Positions past the weight tensor (tokens generated later) use `generated[k]`.
    `stat="norm"` records the mean L2 norm of the residual instead of the mean vector.
    """

    name: str
    layer_list: Sequence[int]
    weights: torch.Tensor | None = None  # [B, S, K]
    generated: torch.Tensor | None = None  # [K]
    stat: Literal["mean", "norm"] = "mean"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.layer_list = sorted({int(layer) for layer in self.layer_list})
        if not self.layer_list:
            raise PersonaxisError(f"record '{self.name}': no layers given")
        if self.weights is None and self.generated is None:
            raise PersonaxisError(f"record '{self.name}': give weights, generated weights, or both")
        if self.weights is not None and self.weights.dim() != 3:
            raise PersonaxisError(f"record '{self.name}': weights must be [batch, positions, segments]")
        if self.stat not in ("mean", "norm"):
            raise PersonaxisError(f"record '{self.name}': stat must be 'mean' or 'norm'")

    @property
    def layers(self) -> list[int]:
        return list(self.layer_list)

    @property
    def n_segments(self) -> int:
        return int(self.weights.shape[-1] if self.weights is not None else self.generated.numel())


def validate_ops(ops: Sequence[Op], n_layers: int, hidden: int) -> None:
    """Raise, in one line, if an op names a layer the model lacks or carries a vector of another size."""
    for op in ops:
        bad = [layer for layer in op.layers if not 0 <= layer < n_layers]
        if bad:
            raise PersonaxisError(f"{type(op).__name__}: layer(s) {bad} out of range for a {n_layers}-layer model")
        for table in ("deltas", "directions"):
            for layer, vector in getattr(op, table, {}).items():
                if vector.numel() != hidden:
                    raise PersonaxisError(
                        f"{type(op).__name__}: vector at layer {layer} has size {vector.numel()}, "
                        f"the model's hidden size is {hidden}"
                    )

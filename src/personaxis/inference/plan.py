"""From a validated request to engine ops: the named vectors and caps a server knows, and per-request plans.

Requests name vectors; they never carry tensors or paths. Everything a name can refer to is loaded when the server
starts, so a request can only pick among what the operator put there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from personaxis.engine import Add, Cap, Op, Project
from personaxis.errors import PersonaxisError
from personaxis.inference.requests import Extension, InlineCap, Steer
from personaxis.inference.steering import cap_op, default_layer, project_op, steer_op
from personaxis.vectors.artifact import Vectors
from personaxis.vectors.cap import CapConfig

PROJECTION_BUCKETS = (
    -200,
    -100,
    -50,
    -20,
    -10,
    -5,
    -2,
    -1,
    0,
    1,
    2,
    5,
    10,
    20,
    50,
    100,
    200,
)  # a reply's mean, in metrics


class SpecError(PersonaxisError):
    """A request that names something the server does not have, or uses it wrongly (answered with 400)."""


@dataclass(frozen=True)
class Direction:
    """One named direction: its artifact, its name inside it, and the layer it is monitored (and steered) at."""

    name: str
    vectors: Vectors
    key: str
    layer: int

    def unit(self, layer: int) -> torch.Tensor:
        return self.vectors.unit(self._check(layer), self.key)

    def raw(self, layer: int) -> torch.Tensor:
        return self.vectors.direction(self._check(layer), self.key)

    def _check(self, layer: int) -> int:
        if layer not in self.vectors.layers:
            raise SpecError(f"vector '{self.name}' has no direction at layer {layer} (layers {self.vectors.layers})")
        return layer

    def describe(self) -> dict:
        return {
            "name": self.name,
            "layer": self.layer,
            "layers": self.vectors.layers,
            "relative": self.vectors.meta.mean_norms is not None,
            "points_toward": self.vectors.meta.points_toward,
        }


@dataclass
class Registry:
    """Every vector and cap a request may name."""

    directions: dict[str, Direction] = field(default_factory=dict)
    caps: dict[str, CapConfig] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        axis: Vectors | None = None,
        vectors: Mapping[str, Vectors] | None = None,
        caps: CapConfig | Mapping[str, CapConfig] | None = None,
        model: object | None = None,
    ) -> Registry:
        """Name every direction: a one-direction artifact by its key, the others as `key:direction`."""
        out = cls()
        sources = {**({"axis": axis} if axis is not None else {}), **dict(vectors or {})}
        for key, vec in sources.items():
            if model is not None:
                vec.validate(model)
            for inner in vec.names:
                name = key if len(vec.names) == 1 else f"{key}:{inner}"
                out.directions[name] = Direction(name, vec, inner, default_layer(vec))
        if isinstance(caps, CapConfig):
            caps = {"default": caps}
        for name, cap in dict(caps or {}).items():
            if model is not None:
                cap.validate(model)
            out.caps[name] = cap
        return out

    def direction(self, name: str) -> Direction:
        if name not in self.directions:
            known = ", ".join(sorted(self.directions)) or "none"
            raise SpecError(f"unknown vector '{name}' (this server has: {known})")
        return self.directions[name]

    def cap(self, name: str) -> CapConfig:
        if name not in self.caps:
            known = ", ".join(sorted(self.caps)) or "none"
            raise SpecError(f"unknown cap '{name}' (this server has: {known})")
        return self.caps[name]

    # -- ops ------------------------------------------------------------------------------------------------------

    def steer_op(self, spec: Steer) -> Add:
        """The request's steering, through the one path from an artifact to an op (`inference.steering`)."""
        d = self.direction(spec.vector)
        layers = spec.layers or [spec.layer if spec.layer is not None else d.layer]
        for layer in layers:
            d.raw(layer)  # a layer the artifact lacks is the request's mistake, named as such
        if spec.units == "relative" and d.vectors.meta.mean_norms is None:
            raise SpecError(f'vector \'{spec.vector}\' has no mean residual norms: use "units": "raw"')
        return steer_op(d.vectors, spec.coef, layers, name=d.key, units=spec.units)

    def cap_op(self, spec: str | InlineCap) -> Cap:
        if isinstance(spec, str):
            return cap_op(self.cap(spec))
        else:
            d = self.direction(spec.vector)
            units = {layer: d.unit(layer) for layer in spec.layers}
            taus = spec.tau if isinstance(spec.tau, list) else [spec.tau] * len(spec.layers)
            tau = dict(zip(spec.layers, taus, strict=True))
            kind = spec.kind
        return Cap(units, floor=tau if kind == "floor" else None, ceiling=tau if kind == "ceiling" else None)

    def monitor_op(self, name: str) -> Project:
        """A monitor reads the reply only: what the server reports, with no prompt positions kept per request."""
        d = self.direction(name)
        return project_op(d.vectors, d.layer, name=d.key, label=f"monitor:{name}", when="response")


@dataclass
class Plan:
    """What one request asks of the model, resolved to ops (rows are set when its batch is formed)."""

    ops: list[Op]
    monitor: list[str]
    cap: str | None  # "name", "inline" or None
    cap_source: str | None  # "request", "closed_loop" or None
    steer: list[dict]

    def ops_for_row(self, row: int) -> list[Op]:
        return [dataclasses.replace(op, rows=(row,)) for op in self.ops]


def make_plan(
    registry: Registry, ext: Extension, n_layers: int, *, loop_cap: str | None = None, also_monitor: str | None = None
) -> Plan:
    """Resolve the extension; `loop_cap` is a cap the closed loop switched on for this conversation."""
    ops: list[Op] = []
    steer = []
    for spec in ext.steer:
        op = registry.steer_op(spec)
        _check_layers(op.layers, n_layers, spec.vector)
        ops.append(op)
        steer.append({"vector": spec.vector, "layers": op.layers, "coef": spec.coef, "units": spec.units})
    cap_name, source = None, None
    if ext.cap is not None:
        op = registry.cap_op(ext.cap)
        cap_name, source = (ext.cap if isinstance(ext.cap, str) else "inline"), "request"
    elif loop_cap is not None:
        op = registry.cap_op(loop_cap)
        cap_name, source = loop_cap, "closed_loop"
    if source is not None:
        _check_layers(op.layers, n_layers, cap_name)
        ops.append(op)
    monitor = list(
        dict.fromkeys(ext.monitor if ext.monitor is not None else (["axis"] if "axis" in registry.directions else []))
    )
    if also_monitor and also_monitor not in monitor:
        monitor.append(also_monitor)
    for name in monitor:
        registry.direction(name)
    return Plan(ops=ops, monitor=monitor, cap=cap_name, cap_source=source, steer=steer)


def _check_layers(layers: list[int], n_layers: int, what: str) -> None:
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise SpecError(f"'{what}': layer(s) {bad} out of range for a {n_layers}-layer model")

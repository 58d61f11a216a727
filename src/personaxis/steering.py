"""From artifacts to engine ops: steer with a vector, cap with a configuration, monitor projections.

These are the few lines every pipeline, the CLI and the server share, so that "coefficient 4 at layer 12" means the
same thing everywhere. `units="relative"` scales by the layer's mean residual norm stored in the artifact
(c · mean_norm_i · v̂_i, portable across models); `units="raw"` adds c · v_i as the persona-vectors paper does.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

from personaxis.engine import Ablate, Add, Cap, Op, Project
from personaxis.engine.ops import When
from personaxis.errors import PersonaxisError
from personaxis.model.loading import ChatModel
from personaxis.vectors import CapConfig, Vectors

Units = Literal["raw", "relative"]


def _layers(vectors: Vectors, layers: int | Iterable[int] | None) -> list[int]:
    chosen = vectors.layers if layers is None else [layers] if isinstance(layers, int) else list(layers)
    missing = [layer for layer in chosen if layer not in vectors.layers]
    if missing:
        raise PersonaxisError(f"the vectors have no direction at layer(s) {missing} (they cover {vectors.layers})")
    return chosen


def steer_op(
    vectors: Vectors,
    coef: float,
    layers: int | Iterable[int] | None = None,
    *,
    name: str | None = None,
    units: Units = "raw",
    when: When = "all",
    rows: Sequence[int] | None = None,
) -> Add:
    """Add coef·v (raw) or coef·mean_norm·v̂ (relative) at `layers`."""
    chosen = _layers(vectors, layers)
    directions = {layer: vectors.direction(layer, name) for layer in chosen}
    if units == "raw":
        return Add.scaled(directions, coef, when=when, rows=rows)
    if units != "relative":
        raise PersonaxisError(f"units must be 'raw' or 'relative', got {units!r}")
    if not vectors.meta.mean_norms:
        raise PersonaxisError("these vectors carry no mean residual norms; use raw units")
    return Add.scaled(directions, coef, mean_norms=vectors.meta.mean_norms, when=when, rows=rows)


def ablate_op(vectors: Vectors, layers: int | Iterable[int] | None = None, *, name: str | None = None, **kw) -> Ablate:
    return Ablate({layer: vectors.direction(layer, name) for layer in _layers(vectors, layers)}, **kw)


def cap_op(config: CapConfig, *, when: When = "all", rows: Sequence[int] | None = None) -> Cap:
    """The capping configuration as one engine op (every token position of its window of layers)."""
    directions = {layer: config.unit(layer) for layer in config.layers}
    bounds = {layer: config.threshold(layer) for layer in config.layers}
    if config.kind == "floor":
        return Cap(directions, floor=bounds, when=when, rows=rows)
    return Cap(directions, ceiling=bounds, when=when, rows=rows)


def project_op(
    vectors: Vectors, layers: int | Iterable[int] | None = None, *, name: str | None = None, label: str | None = None
) -> Project:
    chosen = _layers(vectors, layers)
    return Project(label or vectors.resolve(name), {layer: vectors.direction(layer, name) for layer in chosen})


@contextmanager
def steering(model: ChatModel, *ops: Op) -> Iterator[None]:
    """`with steering(model, steer_op(v, 4.0, 12)): model.model.generate(...)`: every forward inside is steered."""
    with model.engine.apply(list(ops)):
        yield

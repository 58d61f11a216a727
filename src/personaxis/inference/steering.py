"""From artifacts to engine ops: steer with a vector, cap with a configuration, monitor projections.

These are the few lines every pipeline, the CLI and the server share, so that "strength 0.15 at layer 12" means the
same thing everywhere. The default unit, in Python, on the command line, in the server and on the dashboard, is
`relative`: c · mean_norm_i · v̂_i, a fraction of the layer's mean residual norm stored in the artifact (portable across
layers and models; useful strengths are about 0.05–0.3). `units="raw"` adds c · v_i as the persona-vectors paper does.

Where an artifact is used when the caller does not say (one rule, here, for the CLI, the pipelines and the server):
- the layer, `default_layer`: the layer its calibration chose (`trait calibrate`), else the layer it names
  (`meta.extra["layer"]`: the axis build's layer, the demo's chosen one), else the one nearest the network's middle;
- the phase: steering acts on the reply (`STEER_WHEN = "response"`: from the last prompt token on, as the
  persona-vectors paper steers), a cap on every position (`CAP_WHEN = "all"`: a jailbreak lives in the prompt), a
  readout on every position it is given (`READ_WHEN = "all"`; a reply's mean is taken over the reply's tokens).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Literal

from torch import nn

from personaxis.engine import Ablate, Add, Cap, Op, Project, Trace, engine_for
from personaxis.engine.ops import When
from personaxis.errors import PersonaxisError
from personaxis.model.loading import ChatModel, wrap_model
from personaxis.vectors import CapConfig, Vectors

Units = Literal["raw", "relative"]
UNITS: tuple[Units, ...] = ("relative", "raw")
DEFAULT_UNITS: Units = "relative"
_SUFFIXES: dict[str, Units] = {"rel": "relative", "relative": "relative", "raw": "raw"}
STEER_WHEN: When = "response"
CAP_WHEN: When = "all"
READ_WHEN: When = "all"


def default_layer(vectors: Vectors) -> int:
    """The layer an artifact is used at when none is given (the module's rule)."""
    choice = (vectors.meta.extra.get("calibration") or {}).get("choice")
    if choice is not None:
        layer = choice.get("layer")
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise PersonaxisError("the vectors' calibration choice has no integer 'layer'")
        if layer not in vectors.layers:
            raise PersonaxisError(f"the vectors were calibrated at layer {layer} but hold no direction there")
        return layer
    named = vectors.meta.extra.get("layer")
    if isinstance(named, int) and not isinstance(named, bool) and named in vectors.layers:
        return named
    middle = vectors.meta.n_layers // 2
    return min(vectors.layers, key=lambda layer: (abs(layer - middle), layer))


def check_units(units: str) -> Units:
    """`units` if it is one of the two, else a user error."""
    if units not in UNITS:
        raise PersonaxisError(f"units must be 'relative' or 'raw', got {units!r}")
    return units  # type: ignore[return-value]


def parse_strength(text: str, default_units: Units = DEFAULT_UNITS) -> tuple[float, Units]:
    """A strength as typed by a user: a number, optionally followed by its unit (`0.15`, `0.15rel`, `4.0raw`).

    A suffix that is not a unit (`4.0x`) is refused rather than dropped.
    """
    body = text.strip()
    number, units = body, default_units
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if body.lower().endswith(suffix) and body[: -len(suffix)].strip():
            number, units = body[: -len(suffix)].strip(), _SUFFIXES[suffix]
            break
    try:
        value = float(number)
    except ValueError:
        raise PersonaxisError(
            f"bad strength {text!r}: give a number, optionally followed by a unit: rel (× the layer's mean residual "
            "norm, the default) or raw (× the vector as stored), e.g. 0.15 or 0.15rel or 4raw"
        ) from None
    if not math.isfinite(value):
        raise PersonaxisError(f"bad strength {text!r}: it must be finite")
    return value, units


def describe_strength(coef: float, units: str) -> str:
    """A strength with its unit, as every output prints it: `+0.15 × mean norm (relative)` or `+4 (raw)`."""
    return f"{coef:+g} × mean norm (relative)" if units == "relative" else f"{coef:+g} × v (raw)"


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
    units: Units = DEFAULT_UNITS,
    when: When = STEER_WHEN,
    rows: Sequence[int] | None = None,
) -> Add:
    """Add coef·mean_norm·v̂ (relative, the default) or coef·v (raw) at `layers`."""
    chosen = _layers(vectors, layers)
    directions = {layer: vectors.direction(layer, name) for layer in chosen}
    if check_units(units) == "raw":
        return Add.scaled(directions, coef, when=when, rows=rows)
    if not vectors.meta.mean_norms:
        raise PersonaxisError("these vectors carry no mean residual norms; give the strength in raw units")
    return Add.scaled(directions, coef, mean_norms=vectors.meta.mean_norms, when=when, rows=rows)


def ablate_op(vectors: Vectors, layers: int | Iterable[int] | None = None, *, name: str | None = None, **kw) -> Ablate:
    return Ablate({layer: vectors.direction(layer, name) for layer in _layers(vectors, layers)}, **kw)


def cap_op(config: CapConfig, *, when: When = CAP_WHEN, rows: Sequence[int] | None = None) -> Cap:
    """The capping configuration as one engine op (every token position of its window of layers)."""
    directions = {layer: config.unit(layer) for layer in config.layers}
    bounds = {layer: config.threshold(layer) for layer in config.layers}
    if config.kind == "floor":
        return Cap(directions, floor=bounds, when=when, rows=rows)
    return Cap(directions, ceiling=bounds, when=when, rows=rows)


def project_op(
    vectors: Vectors,
    layers: int | Iterable[int] | None = None,
    *,
    name: str | None = None,
    label: str | None = None,
    when: When = READ_WHEN,
) -> Project:
    """Read the projection on the direction (its unit vector) at `layers`, per token, under `label` (default: the
    direction's name)."""
    chosen = _layers(vectors, layers)
    directions = {layer: vectors.direction(layer, name) for layer in chosen}
    return Project(label or vectors.resolve(name), directions, when=when)


@contextmanager
def steering(model: ChatModel | nn.Module, *ops: Op) -> Iterator[Trace]:
    """`with steering(model, steer_op(v, 0.15, 12)): model.model.generate(...)`: every forward inside runs the ops
    (on a `ChatModel` or a plain Hugging Face model); the trace holds what they read out. Blocks nest."""
    with engine_for(wrap_model(model)).apply(list(ops)) as trace:
        yield trace


# The notebook face (`px.steer`, `px.cap`, ...): one op each, for any forward or `generate` call inside the block.


def steer(
    model: ChatModel | nn.Module,
    vectors: Vectors,
    coef: float,
    layers: int | Iterable[int] | None = None,
    *,
    name: str | None = None,
    units: Units = DEFAULT_UNITS,
    when: When = STEER_WHEN,
) -> AbstractContextManager[Trace]:
    """`with px.steer(model, vectors, 0.15, 14): ...`: add `steer_op(vectors, coef, layers)` (relative units by
    default) to every forward inside the block."""
    return steering(model, steer_op(vectors, coef, layers, name=name, units=units, when=when))


def ablate(
    model: ChatModel | nn.Module,
    vectors: Vectors,
    layers: int | Iterable[int] | None = None,
    *,
    name: str | None = None,
) -> AbstractContextManager[Trace]:
    """`with px.ablate(model, vectors, 14): ...`: remove the direction's component at `layers`."""
    return steering(model, ablate_op(vectors, layers, name=name))


def cap(model: ChatModel | nn.Module, config: CapConfig, *, when: When = CAP_WHEN) -> AbstractContextManager[Trace]:
    """`with px.cap(model, CapConfig.load(...)): ...`: hold the projection on the config's window at its bound;
    `trace.cap_hits` counts per row how often it bit."""
    return steering(model, cap_op(config, when=when))


def monitor(
    model: ChatModel | nn.Module,
    vectors: Vectors,
    layers: int | Iterable[int] | None = None,
    *,
    name: str | None = None,
) -> AbstractContextManager[Trace]:
    """`with px.monitor(model, vectors, 14) as trace: ...`, then `trace.projections(vectors.resolve(name))`: the
    per-token projections `[B, S, L]` of every forward inside the block (NaN at padding)."""
    return steering(model, project_op(vectors, layers, name=name))

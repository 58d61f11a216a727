"""Steering with a trait's vectors, by default at the layer and strength its calibration chose.

`calibrate` stores its choice in the artifact (``meta.extra["calibration"]["choice"]``: layer, coef, units), so the
file alone says how to use it: ``with trait_steering(model, vectors): ...`` elicits the trait at the calibrated
strength, ``coef=-c`` suppresses it, and any explicit `coef` or `layer` overrides the calibration.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from personaxis.engine import Add
from personaxis.engine.ops import When
from personaxis.errors import PersonaxisError
from personaxis.inference.steering import STEER_WHEN, Units, steer_op, steering
from personaxis.model.loading import ChatModel
from personaxis.vectors import Vectors


def primary(vectors: Vectors) -> str:
    """The trait's own direction (the response-mean persona vector) among the artifact's directions."""
    return vectors.resolve()  # the only direction, else the one the file declares primary


def named_trait(vectors: Vectors) -> str | None:
    """The trait the file says it is for (extraction records {"name", "version", "description"}), if any."""
    trait = vectors.meta.extra.get("trait")
    return trait.get("name") if isinstance(trait, dict) else None


def calibration_choice(vectors: Vectors) -> dict[str, Any] | None:
    return (vectors.meta.extra.get("calibration") or {}).get("choice")


def trait_steer_op(
    vectors: Vectors,
    coef: float | None = None,
    layer: int | None = None,
    *,
    name: str | None = None,
    units: Units | None = None,
    when: When = STEER_WHEN,
) -> Add:
    """The steering op for a trait: calibrated layer/strength/units unless given."""
    choice = calibration_choice(vectors) or {}
    if layer is None:
        layer = choice.get("layer")
    if coef is None:
        coef = choice.get("coef")
    if layer is None or coef is None:
        raise PersonaxisError(
            "these vectors carry no calibration: run `personaxis trait calibrate` or give the layer and coefficient"
        )
    units = units or choice.get("units", "relative")
    return steer_op(vectors, float(coef), int(layer), name=name or primary(vectors), units=units, when=when)


@contextmanager
def trait_steering(
    model: ChatModel,
    vectors: Vectors,
    coef: float | None = None,
    layer: int | None = None,
    *,
    name: str | None = None,
    units: Units | None = None,
    when: When = STEER_WHEN,
) -> Iterator[Add]:
    """`with trait_steering(model, vectors): generate(model, chats)`: every reply inside is steered."""
    vectors.validate(model)
    op = trait_steer_op(vectors, coef, layer, name=name, units=units, when=when)
    with steering(model, op):
        yield op

"""Strengths as users type them, the default unit, and the one rule for the default layer and phase."""

from __future__ import annotations

import pytest
import torch

from personaxis.errors import PersonaxisError
from personaxis.inference.steering import default_layer, describe_strength, parse_strength, project_op, steer_op
from personaxis.vectors import VectorMeta, Vectors


def test_strengths_carry_their_unit_or_take_the_default():
    assert parse_strength("0.15") == (0.15, "relative")
    assert parse_strength("0.15", "raw") == (0.15, "raw")
    assert parse_strength("-0.2rel") == (-0.2, "relative")
    assert parse_strength("4raw", "relative") == (4.0, "raw")
    assert parse_strength("1e-1relative") == (0.1, "relative")
    for bad in ("4.0x", "rel", "", "abc", "nan", "inf"):
        with pytest.raises(PersonaxisError, match="bad strength"):
            parse_strength(bad)
    assert describe_strength(0.15, "relative") == "+0.15 × mean norm (relative)"
    assert describe_strength(-4, "raw") == "-4 × v (raw)"


def test_steer_op_is_relative_by_default():
    meta = VectorMeta(model_id="m", hidden_size=8, n_layers=2, method="mean_diff", points_toward="x",
                      mean_norms={0: 3.0, 1: 10.0})  # fmt: skip
    v = torch.randn(2, 8)
    vectors = Vectors([0, 1], {"d": v}, meta)
    op = steer_op(vectors, 0.5, 1)
    torch.testing.assert_close(op.deltas[1], 0.5 * 10.0 * v[1] / v[1].norm())
    torch.testing.assert_close(steer_op(vectors, 0.5, 1, units="raw").deltas[1], 0.5 * v[1])
    with pytest.raises(PersonaxisError, match="units must be"):
        steer_op(vectors, 0.5, 1, units="percent")  # type: ignore[arg-type]
    meta.mean_norms = None
    with pytest.raises(PersonaxisError, match="raw units"):
        steer_op(Vectors([0, 1], {"d": v}, meta), 0.5, 1)


def _vectors_for(layers, n_layers=4, **extra):
    meta = VectorMeta(model_id="tiny-llama", hidden_size=8, n_layers=n_layers, method="test",
                      points_toward="a random direction", extra=extra)  # fmt: skip
    return Vectors(list(layers), {"trait": torch.randn(len(layers), 8)}, meta)


def test_default_layer():
    """The one rule: the calibrated layer, else the layer the artifact names, else the nearest the middle."""
    assert default_layer(_vectors_for(layers=(0, 1, 2, 3))) == 2  # the middle of 4 blocks
    assert default_layer(_vectors_for(layers=(0, 3))) == 3  # the nearest the vectors have
    assert default_layer(_vectors_for(layers=(0, 1, 2, 3), calibration={"choice": {"layer": 1, "coef": 4.0}})) == 1
    assert default_layer(_vectors_for(layers=(0, 1, 2, 3), layer=3)) == 3  # named by the artifact (axis, demo)
    assert default_layer(_vectors_for(layers=(0, 1, 2), layer=3)) == 2  # named but absent: the rule goes on
    assert default_layer(_vectors_for(layers=(0, 1, 2, 3), layer=3, calibration={"choice": {"layer": 1}})) == 1
    with pytest.raises(PersonaxisError, match="calibrated at layer 3"):
        default_layer(_vectors_for(layers=(1, 2), calibration={"choice": {"layer": 3}}))
    with pytest.raises(PersonaxisError, match="integer 'layer'"):
        default_layer(_vectors_for(layers=(1, 2), calibration={"choice": {"best": 2}}))


def test_the_default_phases():
    """Steering acts on the reply, a cap on every position, a readout wherever it is given."""
    vectors = _vectors_for(layers=(0, 1))
    assert steer_op(vectors, 1.0, 1, units="raw").when == "response"
    assert project_op(vectors, 1).when == "all"

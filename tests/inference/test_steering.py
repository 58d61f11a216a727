"""Strengths as users type them, and the default unit."""

from __future__ import annotations

import pytest
import torch

from personaxis.errors import PersonaxisError
from personaxis.inference.steering import describe_strength, parse_strength, steer_op
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

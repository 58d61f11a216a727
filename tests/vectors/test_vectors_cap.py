import math

import pytest
import torch

from personaxis.errors import PersonaxisError
from personaxis.vectors import CapConfig, CapMeta

HIDDEN, N_LAYERS = 8, 6  # what conftest builds


def slow_cap(h: torch.Tensor, v: torch.Tensor, tau: float, kind: str) -> torch.Tensor:
    """Obviously-correct reference: one token at a time, one element at a time, in float64."""
    norm = math.sqrt(sum(float(x) ** 2 for x in v))
    u = [float(x) / norm for x in v]
    flat = h.reshape(-1, h.shape[-1]).tolist()
    out = []
    for row in flat:
        proj = sum(a * b for a, b in zip(row, u, strict=True))
        if kind == "floor":
            lift = max(tau - proj, 0.0)
            out.append([a + lift * b for a, b in zip(row, u, strict=True)])
        else:
            cut = max(proj - tau, 0.0)
            out.append([a - cut * b for a, b in zip(row, u, strict=True)])
    return torch.tensor(out, dtype=torch.float64).reshape(h.shape)


@pytest.fixture
def cap(make_vectors) -> CapConfig:
    """A ceiling on non-unit vectors at layers 2 and 3, thresholds near the middle of the projections."""
    v = make_vectors(layers=(2, 3), seed=3)
    meta = CapMeta(**v.meta.model_dump(), percentile=25.0, calibration_source="test")
    return CapConfig([2, 3], 3.0 * v.data["evil"], [0.5, -0.25], "ceiling", meta)


def activations(seed: int = 0) -> torch.Tensor:
    return 2 * torch.randn(2, 7, HIDDEN, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layer", [2, 3])
def test_ceiling_matches_reference(cap, layer):
    h = activations()
    want = slow_cap(h, cap.directions[cap.row(layer)], cap.threshold(layer), "ceiling")
    got = cap.apply(h, layer)
    assert torch.allclose(got.double(), want, atol=1e-5)
    assert (got @ cap.unit(layer) <= cap.threshold(layer) + 1e-5).all()


@pytest.mark.parametrize("layer", [2, 3])
def test_floor_equals_ceiling_on_the_opposite_direction(cap, layer):
    floor = cap.as_floor()
    assert floor.kind == "floor"
    assert torch.equal(floor.directions, -cap.directions)
    assert floor.tau == [-t for t in cap.tau]
    h = activations(1)
    want = slow_cap(h, floor.directions[floor.row(layer)], floor.threshold(layer), "floor")
    assert torch.allclose(floor.apply(h, layer).double(), want, atol=1e-5)
    assert torch.allclose(floor.apply(h, layer), cap.apply(h, layer), atol=1e-6)
    assert (floor.apply(h, layer) @ floor.unit(layer) >= floor.threshold(layer) - 1e-5).all()


def test_floor_leaves_activations_above_the_threshold_untouched(cap):
    floor = cap.as_floor()
    h = activations(2)
    proj = h @ floor.unit(2)
    untouched = proj >= floor.threshold(2)
    assert untouched.any() and (~untouched).any()
    assert torch.equal(floor.apply(h, 2)[untouched], h[untouched])


def test_conversions(cap):
    assert cap.as_ceiling() is cap
    floor = cap.as_floor()
    assert floor.as_floor() is floor
    back = floor.as_ceiling()
    assert torch.equal(back.directions, cap.directions) and back.tau == cap.tau
    assert floor.meta.points_toward == "opposite of: more evil"
    assert back.meta.points_toward == "more evil"


def test_apply_keeps_dtype_and_computes_in_fp32(cap):
    h = activations(3).to(torch.bfloat16)
    out = cap.apply(h, 2)
    assert out.dtype == torch.bfloat16
    want = cap.apply(h.float(), 2).to(torch.bfloat16)
    assert torch.equal(out, want)


def test_round_trip_is_bit_exact(tmp_path, cap):
    cap.tau = [0.1, 1 / 3]  # not exact in float32: must survive as given
    path = cap.save(tmp_path / "cap.safetensors")
    back = CapConfig.load(path)
    assert back.kind == "ceiling"
    assert back.layers == cap.layers
    assert torch.equal(back.directions, cap.directions)
    assert back.tau == [0.1, 1 / 3]
    assert back.meta == cap.meta
    assert back.meta.percentile == 25.0


def test_from_vectors(make_vectors):
    v = make_vectors(names=("axis", "other"), layers=(1, 2, 3, 4))
    floor = CapConfig.from_vectors(v, {3: 1.5, 2: -1.0}, name="axis", percentile=25.0, calibration_source="roles")
    assert floor.kind == "floor" and floor.layers == [2, 3]
    assert floor.tau == [-1.0, 1.5]
    assert torch.equal(floor.directions[1], v.direction(3, "axis"))
    assert floor.meta.extra["direction_name"] == "axis"
    assert floor.meta.calibration_source == "roles"


@pytest.mark.parametrize(
    ("tau", "kind", "message"),
    [
        ([float("nan"), 0.0], "floor", "threshold at layer 2 is not finite"),
        ([0.0, float("inf")], "floor", "threshold at layer 3 is not finite"),
        ([0.0], "floor", "1 thresholds for 2 layers"),
        ([0.0, 0.0], "both", "'floor' or 'ceiling'"),
    ],
)
def test_constructor_refuses_bad_input(cap, tau, kind, message):
    with pytest.raises(PersonaxisError, match=message):
        CapConfig(cap.layers, cap.directions, tau, kind, cap.meta)


def test_constructor_refuses_zero_and_nan_directions(cap):
    zero = cap.directions.clone()
    zero[0] = 0
    with pytest.raises(PersonaxisError, match="layer 2 has zero norm"):
        CapConfig(cap.layers, zero, cap.tau, "floor", cap.meta)
    nan = cap.directions.clone()
    nan[1, 1] = float("nan")
    with pytest.raises(PersonaxisError, match="layer 3 is not finite"):
        CapConfig(cap.layers, nan, cap.tau, "floor", cap.meta)


def test_validate(cap, model_info):
    assert cap.validate(model_info) == []
    model_info.hidden_size = 4
    with pytest.raises(PersonaxisError, match="hidden size"):
        cap.validate(model_info)


def test_unknown_layer(cap):
    with pytest.raises(PersonaxisError, match=r"layer 4 is not capped \(layers \[2, 3\]\)"):
        cap.apply(activations(), 4)

"""τ calibration from a build's pooled rollouts, and the cap configs made from it."""

import numpy as np
import pytest
import torch
from axis.axis_helpers import axis_of

from personaxis.axis.calibration import calibrate, cap_config, pooled_projections
from personaxis.axis.rollouts import ROLLOUT_STAGE
from personaxis.engine import Project
from personaxis.errors import PersonaxisError
from personaxis.inference.generation import Sampling, generate
from personaxis.inference.steering import cap_op
from personaxis.store import RunStore
from personaxis.vectors import CapConfig


def put(store, i, kind, mean):
    store.put(ROLLOUT_STAGE, f"k{i:03d}", {"id": f"r{i}", "text": "x", "labels": {"kind": kind}}, {"response": mean})


def test_tau_is_the_percentile_of_pooled_projections(tiny, tmp_path):
    axis = axis_of(tiny)
    store = RunStore(tmp_path)
    means = torch.randn(12, tiny.n_layers, tiny.hidden_size)
    kinds = ["role", "trait", "default", "sweep"] * 3
    for i, (kind, mean) in enumerate(zip(kinds, means, strict=True)):
        put(store, i, kind, mean)
    put(store, 99, "role", torch.full((tiny.n_layers, tiny.hidden_size), float("nan")))  # an empty reply
    got = pooled_projections(store, axis)
    pooled = means[[i for i, k in enumerate(kinds) if k != "sweep"]].double().numpy()
    units = axis.units().double().numpy()
    want = np.einsum("nlh,lh->nl", pooled, units)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
    for q in (1, 25, 50, 75):
        tau = calibrate(got, axis.layers, q)
        np.testing.assert_allclose([tau[i] for i in axis.layers], np.percentile(got.double().numpy(), q, axis=0))
    with pytest.raises(PersonaxisError, match="between 0 and 100"):
        calibrate(got, axis.layers, 101)


def test_no_rollouts_to_calibrate_on(tiny, tmp_path):
    with pytest.raises(PersonaxisError, match="no role, trait or default rollouts"):
        pooled_projections(RunStore(tmp_path), axis_of(tiny))


def test_cap_config_is_a_floor_on_the_axis(tiny):
    axis = axis_of(tiny)
    tau = {i: 0.5 for i in axis.layers}
    config = cap_config(axis, tau, [1, 2], 25.0, "test-run")
    assert config.kind == "floor" and config.layers == [1, 2] and config.meta.percentile == 25.0
    assert "h·â" in config.meta.extra["convention"] and config.meta.calibration_source == "test-run"
    torch.testing.assert_close(config.unit(1), axis.unit(1))
    # read out after the cap: every token's projection at a capped layer is at least τ
    chat = [{"role": "user", "content": "Hello there, tell me about the sea"}]
    monitor = Project("axis", {i: axis.direction(i) for i in (1, 2)})
    out = generate(tiny, [chat], Sampling(max_new_tokens=4), ops=[cap_op(config), monitor])[0]
    assert (out.projections["axis"] >= 0.5 - 1e-4).all()


def test_cap_configs_that_do_not_fit_the_model_are_refused(tiny):
    config = cap_config(axis_of(tiny), {i: 0.0 for i in range(tiny.n_layers)}, [1, 2], 25.0, "x")
    other_hidden = type("M", (), {"name": "m", "n_layers": tiny.n_layers, "hidden_size": tiny.hidden_size * 2})()
    with pytest.raises(PersonaxisError, match="hidden size"):
        config.validate(other_hidden)
    too_shallow = type("M", (), {"name": "m", "n_layers": 2, "hidden_size": tiny.hidden_size})()
    with pytest.raises(PersonaxisError, match="layers"):
        config.validate(too_shallow)
    with pytest.raises(PersonaxisError, match="no τ for layer"):
        cap_config(axis_of(tiny), {i: 0.0 for i in range(tiny.n_layers)}, [tiny.n_layers], 25.0, "x")


def test_cap_config_round_trips_through_a_file(tiny, tmp_path):
    config = cap_config(axis_of(tiny), {i: float(i) for i in range(tiny.n_layers)}, [1, 2, 3], 25.0, "x")
    loaded = CapConfig.load(config.save(tmp_path / "cap.safetensors"))
    assert loaded.kind == "floor" and loaded.tau == [1.0, 2.0, 3.0]
    assert loaded.meta.extra["convention"] == config.meta.extra["convention"]

"""The whole loop on the real embedded default model, at toy scale: build, drift, calibrate, cap, replay."""

import pytest
import torch

from personaxis.axis.build import BuildConfig, build_axis
from personaxis.axis.calibration import calibrate, cap_config, pooled_projections
from personaxis.axis.drift import drift_stats, run_scripted
from personaxis.axis.evals.conversations import load_conversations
from personaxis.axis.library import load_roles
from personaxis.axis.replay import replay
from personaxis.inference.generation import Sampling
from personaxis.store import RunStore

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model():
    from personaxis.model import load_model

    return load_model("default")


def test_axis_loop_on_the_default_model(model, tmp_path):
    roles = [r for r in load_roles() if r.name in ("pirate", "librarian", "demon")]
    config = BuildConfig(questions=1, max_tokens=8, judge="none", min_count=1, traits=0, batch_size=16)
    result = build_axis(model, tmp_path, config, roles=roles, questions=["Who are you?"], progress=False)
    summary = result.summary
    assert summary["roles"]["kept"] == ["demon", "librarian", "pirate"]
    assert summary["counts"]["role_replies"] == 15 and summary["counts"]["default_replies"] >= 4
    assert 0 < summary["pca"]["pc1_variance"] <= 1
    layer = summary["target_layer"]
    unit = result.axis.unit(layer)

    store = RunStore(tmp_path)
    therapy = next(c for c in load_conversations().conversations if c.domain == "therapy")
    short = [therapy.model_copy(update={"turns": therapy.turns[:2]})]
    drift = run_scripted(model, short, unit, layer, store, Sampling(max_new_tokens=8), progress=False)
    assert len(drift[0].projections) == 2
    assert set(drift_stats(drift)["domains"]) == {c.domain for c in short}

    projections = pooled_projections(store, result.axis)
    assert projections.shape == (summary["counts"]["rollouts"] - summary["counts"]["empty_replies"], model.n_layers)
    tau = calibrate(projections, result.axis.layers, 25)
    window = list(range(model.n_layers - 8, model.n_layers - 4))
    cap = cap_config(result.axis, tau, window, 25, str(tmp_path))
    assert cap.validate(model) == []
    chat = [{"role": "user", "content": short[0].turns[0]}]
    unit = result.axis.unit(window[0])
    replayed = replay(model, [chat], cap, unit, window[0], Sampling(max_new_tokens=8))[0]
    capped = [v for v in replayed["capped"] if v is not None]
    floor = tau[window[0]]
    assert all(v >= floor - 1e-3 * max(1.0, abs(floor)) for v in capped)  # every token was lifted to the floor
    assert torch.isfinite(torch.tensor(capped)).all()

"""Importers, on files written here in the reference projects' layouts."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from personaxis.errors import PersonaxisError
from personaxis.vectors import import_capping_config, import_vectors, load_pt

L, H = 5, 8  # a 5-block model of width 8


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# -- refusing code ----------------------------------------------------------------------------------------------


def _touch(path: str) -> None:
    Path(path).write_text("the pickle ran code")


class Payload:
    """Unpickling this calls _touch: what a hostile .pt file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_touch, (str(self.marker),))


def test_pickle_that_runs_code_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "ran.txt"
    path = tmp_path / "assistant_axis.pt"
    torch.save({"axis": rand(L, H), "hook": Payload(marker)}, path)
    with pytest.raises(PersonaxisError, match="refusing to load .*pickle that executes code") as e:
        import_vectors(path)
    assert "\n" not in str(e.value)
    assert "_touch" in str(e.value)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_legacy_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "ran.txt"
    path = tmp_path / "config.pt"
    with open(path, "wb") as f:
        pickle.dump({"vectors": {}, "experiments": [], "x": Payload(marker)}, f)
    with pytest.raises(PersonaxisError, match="refusing to load"):
        load_pt(path)
    assert not marker.exists()


def test_not_a_torch_file(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello")
    with pytest.raises(PersonaxisError, match="is not a torch file .*: it looks like text"):
        load_pt(path)
    with pytest.raises(PersonaxisError, match="no such file"):
        load_pt(tmp_path / "missing.pt")


def test_numpy_numbers_are_plain_data(tmp_path):
    path = tmp_path / "np.pt"
    torch.save({"cap": np.float64(1.5), "n": np.int64(3), "arr": np.arange(3.0)}, path)
    loaded = load_pt(path)
    assert loaded["cap"] == 1.5 and loaded["n"] == 3 and loaded["arr"].tolist() == [0.0, 1.0, 2.0]


# -- assistant-axis ---------------------------------------------------------------------------------------------


def test_assistant_axis_bare_tensor_is_block_indexed(tmp_path):
    axis = rand(L, H).to(torch.bfloat16)  # the published files are bf16
    torch.save(axis, tmp_path / "assistant_axis.pt")
    v = import_vectors(tmp_path / "assistant_axis.pt", model_id="org/model")
    assert v.names == ["axis"]
    assert v.layers == list(range(L))
    assert v.meta.n_layers == L and v.hidden_size == H
    for i in range(L):
        assert torch.equal(v.direction(i), axis[i].float())  # row i = block i, no shift
    assert v.meta.method == "import:assistant_axis"
    assert "Assistant" in v.meta.points_toward
    assert v.meta.model_id == "org/model"
    assert v.meta.extra["source_dtype"] == "torch.bfloat16"
    assert len(v.meta.config_hash) == 64


def test_assistant_axis_pipeline_dict(tmp_path):
    axis = rand(L, H)
    data = {"axis": axis, "default_mean": rand(L, H, seed=1), "role_mean": rand(L, H, seed=2), "n_default": 1}
    torch.save(data | {"n_roles": 3}, tmp_path / "axis_out.pt")
    v = import_vectors(tmp_path / "axis_out.pt")
    assert torch.equal(v.data["axis"], axis)
    assert v.meta.counts == {"n_default": 1, "n_roles": 3}


def test_role_vectors_folder(tmp_path):
    folder = tmp_path / "role_vectors"
    folder.mkdir()
    pirate = rand(L, H, seed=1)
    torch.save(pirate, folder / "pirate.pt")  # published layout: bare tensor
    torch.save({"vector": rand(L, H, seed=2), "type": "mean", "role": "default"}, folder / "default.pt")  # pipeline
    v = import_vectors(folder, model_id="org/model")
    assert v.names == ["default", "pirate"]
    assert torch.equal(v.data["pirate"], pirate)
    assert v.meta.method == "role_mean"
    assert v.meta.extra["types"] == {"default": "mean"}
    one = import_vectors(folder / "pirate.pt")  # a bare tensor inside a role_vectors folder
    assert one.names == ["pirate"]


def test_role_vectors_of_different_shapes(tmp_path):
    torch.save(rand(L, H), tmp_path / "a.pt")
    torch.save(rand(L + 1, H), tmp_path / "b.pt")
    with pytest.raises(PersonaxisError, match="different shapes"):
        import_vectors(tmp_path)


# -- persona_vectors --------------------------------------------------------------------------------------------


def test_persona_vectors_off_by_one(tmp_path):
    states = rand(L + 1, H)  # row 0 = embeddings, row i + 1 = output of block i, last row after the final norm
    path = tmp_path / "evil_response_avg_diff.pt"
    torch.save(states, path)
    v = import_vectors(path, model_id="org/model")
    assert v.names == ["evil"]
    assert v.meta.n_layers == L
    assert v.layers == list(range(L - 1))  # block L-1's row is post-norm: left out
    for i in v.layers:
        assert torch.equal(v.direction(i), states[i + 1])
        assert not torch.equal(v.direction(i), states[i])
    assert v.meta.aggregation == "response_mean"
    assert v.meta.method == "import:persona_vectors"
    assert v.meta.extra["source_rows"] == L + 1


@pytest.mark.parametrize(("kind", "aggregation"), [("prompt_avg", "prompt_mean"), ("prompt_last", "last_prompt")])
def test_persona_vectors_aggregations(tmp_path, kind, aggregation):
    path = tmp_path / f"sycophantic_{kind}_diff.pt"
    torch.save(rand(L + 1, H), path)
    v = import_vectors(path)
    assert v.names == ["sycophantic"] and v.meta.aggregation == aggregation


def test_bare_tensor_layout_needs_a_hint(tmp_path):
    states = rand(L + 1, H)
    path = tmp_path / "mystery.pt"
    torch.save(states, path)
    with pytest.raises(PersonaxisError, match=r"say which with format= \(--format\)"):
        import_vectors(path)
    by_count = import_vectors(path, n_layers=L)
    assert by_count.meta.method == "import:persona_vectors"
    assert torch.equal(by_count.direction(0), states[1])
    as_blocks = import_vectors(path, n_layers=L + 1)
    assert as_blocks.meta.method == "import:assistant_axis"
    assert torch.equal(as_blocks.direction(0), states[0])
    forced = import_vectors(path, format="persona_vectors", name="trait")
    assert forced.names == ["trait"] and torch.equal(forced.direction(2), states[3])


def test_layer_count_is_checked(tmp_path):
    torch.save(rand(L + 1, H), tmp_path / "evil_response_avg_diff.pt")
    with pytest.raises(PersonaxisError, match="has 6 rows but a persona_vectors file for 6 layers has 7"):
        import_vectors(tmp_path / "evil_response_avg_diff.pt", n_layers=6)
    torch.save(rand(L, H), tmp_path / "assistant_axis.pt")
    with pytest.raises(PersonaxisError, match="one row per block"):
        import_vectors(tmp_path / "assistant_axis.pt", n_layers=4)


def test_unknown_layouts(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(PersonaxisError, match="not a known vector layout"):
        import_vectors(tmp_path / "list.pt")
    torch.save({"vectors": {}, "experiments": []}, tmp_path / "capping_config.pt")
    with pytest.raises(PersonaxisError, match="use import_capping_config"):
        import_vectors(tmp_path / "capping_config.pt")


# -- capping config ---------------------------------------------------------------------------------------------


@pytest.fixture
def capping(tmp_path) -> tuple[Path, torch.Tensor, dict]:
    """A config in the reference layout: per-layer vectors = the negated axis, not unit-norm."""
    axis = rand(L, H, seed=7)
    vectors = {f"neg_axis_layer_{i}": {"layer": i, "vector": -axis[i] * (i + 2)} for i in range(L)}
    experiments = [
        {
            "id": "layers_2:4-p0.25",
            "interventions": [
                {"vector": "neg_axis_layer_3", "cap": np.float64(-1.5)},
                {"vector": "neg_axis_layer_2", "cap": 0.5},
                {"vector": "neg_axis_layer_2", "coeff": 1.0},  # not a cap: skipped
            ],
        },
        {"id": "layers_1:2-p0.5", "interventions": [{"vector": "neg_axis_layer_1", "cap": 2.0}]},
        {"id": "steer_only", "interventions": [{"vector": "neg_axis_layer_1", "coeff": 3.0}]},
    ]
    config = {"vectors": vectors, "experiments": experiments}
    path = tmp_path / "capping_config.pt"
    torch.save(config, path)
    return path, axis, config


def reference_cap(h: torch.Tensor, vector: torch.Tensor, cap: float) -> torch.Tensor:
    """The reference steering code's cap: a ceiling on the projection onto the normalised stored vector."""
    v = vector / (vector.norm() + 1e-8)
    excess = (h @ v - cap).clamp(min=0.0)
    return h - excess.unsqueeze(-1) * v


def test_capping_config_becomes_one_ceiling_per_experiment(capping):
    path, axis, config = capping
    caps = import_capping_config(path, model_id="org/model")
    assert sorted(caps) == ["layers_1:2-p0.5", "layers_2:4-p0.25"]
    cap = caps["layers_2:4-p0.25"]
    assert cap.kind == "ceiling"
    assert cap.layers == [2, 3]
    assert cap.tau == [0.5, -1.5]
    assert cap.meta.percentile == 25.0 and caps["layers_1:2-p0.5"].meta.percentile == 50.0
    assert cap.meta.n_layers == L and cap.meta.hidden_size == H
    assert cap.meta.extra["experiment"] == "layers_2:4-p0.25"
    h = 3 * rand(4, H, seed=9)
    for layer, tau in zip(cap.layers, cap.tau, strict=True):
        stored = config["vectors"][f"neg_axis_layer_{layer}"]["vector"]
        assert torch.equal(cap.directions[cap.row(layer)], stored)
        assert torch.allclose(cap.apply(h, layer), reference_cap(h, stored, tau), atol=1e-5)
        # ... which is the paper's floor on the Assistant Axis at -tau
        floor = cap.as_floor()
        assert torch.allclose(floor.unit(layer), axis[layer] / axis[layer].norm(), atol=1e-6)
        assert floor.threshold(layer) == -tau
        assert torch.allclose(floor.apply(h, layer), reference_cap(h, stored, tau), atol=1e-5)


def test_capping_config_refusals(tmp_path, capping):
    path, _, config = capping
    config["experiments"][0]["interventions"].append({"vector": "neg_axis_layer_3", "cap": 0.0})
    torch.save(config, tmp_path / "twice.pt")
    with pytest.raises(PersonaxisError, match="caps layer 3 twice"):
        import_capping_config(tmp_path / "twice.pt")
    torch.save({"vectors": {"a": {"layer": 0}}, "experiments": []}, tmp_path / "broken.pt")
    with pytest.raises(PersonaxisError, match="not a capping config as the assistant-axis code writes it"):
        import_capping_config(tmp_path / "broken.pt")
    torch.save(rand(L, H), tmp_path / "tensor.pt")
    with pytest.raises(PersonaxisError, match="not a capping config"):
        import_capping_config(tmp_path / "tensor.pt")
    config["vectors"]["neg_axis_layer_2"]["vector"] = rand(2, H)
    torch.save(config, tmp_path / "matrix.pt")
    with pytest.raises(PersonaxisError, match="is not a non-empty 1-D tensor"):
        import_capping_config(tmp_path / "matrix.pt")

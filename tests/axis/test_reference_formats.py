"""Files in the assistant-axis project's published layouts (axis (L, H), role vectors, capping config) import and work
here: projecting and capping with them gives exactly what the native artifacts give."""

import torch

from personaxis.axis.calibration import cap_config
from personaxis.engine import Project
from personaxis.inference.generation import Sampling, generate
from personaxis.inference.steering import cap_op, project_op
from personaxis.vectors import import_capping_config, import_vectors

CHAT = [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Tell me about the sea"}]


def reference_files(tiny, folder):
    """An axis (bare bf16 tensor and the pipeline's dict), role vectors, and a capping config, as the reference writes
    them: row i = block i; the capping vectors are the negated axis (role-ward) under a ceiling at −τ."""
    torch.manual_seed(0)
    n, h = tiny.n_layers, tiny.hidden_size
    default, roles = torch.randn(n, h), {name: torch.randn(n, h) for name in ("pirate", "ghost")}
    axis = default - torch.stack(list(roles.values())).mean(0)
    torch.save(axis.to(torch.bfloat16), folder / "axis.pt")
    torch.save({"axis": axis, "default_mean": default, "n_default": 5, "n_roles": 2}, folder / "axis_full.pt")
    (folder / "role_vectors").mkdir()
    for name, vector in roles.items():
        torch.save({"vector": vector, "type": "pos_3", "role": name}, folder / "role_vectors" / f"{name}.pt")
    tau = {1: 0.3, 2: -0.2}
    vectors = {f"axis_layer_{i}": {"layer": i, "vector": -axis[i] * 7.0} for i in tau}
    experiments = [
        {"id": "layers_1:3-p0.25", "interventions": [{"vector": f"axis_layer_{i}", "cap": -t} for i, t in tau.items()]},
        {"id": "baseline", "interventions": []},
    ]
    torch.save({"vectors": vectors, "experiments": experiments}, folder / "capping_config.pt")
    return axis, roles, tau


def test_reference_layouts_import_and_cap_like_native_artifacts(tiny, tmp_path):
    axis, roles, tau = reference_files(tiny, tmp_path)
    imported = import_vectors(tmp_path / "axis.pt", model_id=tiny.name, n_layers=tiny.n_layers)
    full = import_vectors(tmp_path / "axis_full.pt", model_id=tiny.name, n_layers=tiny.n_layers)
    assert imported.layers == list(range(tiny.n_layers)) and imported.names == ["axis"]
    assert full.meta.counts == {"n_default": 5, "n_roles": 2}
    torch.testing.assert_close(full.data["axis"], axis)
    torch.testing.assert_close(imported.data["axis"], axis.to(torch.bfloat16).float())
    role_vectors = import_vectors(tmp_path / "role_vectors", model_id=tiny.name, n_layers=tiny.n_layers)
    assert role_vectors.names == ["ghost", "pirate"]
    torch.testing.assert_close(role_vectors.data["pirate"], roles["pirate"])
    assert imported.validate(tiny) == [] and role_vectors.validate(tiny) == []

    configs = import_capping_config(tmp_path / "capping_config.pt", model_id=tiny.name, n_layers=tiny.n_layers)
    assert list(configs) == ["layers_1:3-p0.25"] and configs["layers_1:3-p0.25"].meta.percentile == 25.0
    reference = configs["layers_1:3-p0.25"]
    assert reference.kind == "ceiling" and reference.validate(tiny) == []
    native = cap_config(full, tau, [1, 2], 25.0, "native")
    floor = reference.as_floor()
    for layer in (1, 2):
        torch.testing.assert_close(floor.unit(layer), native.unit(layer))
        assert abs(floor.threshold(layer) - native.threshold(layer)) < 1e-6

    # the reference ceiling and the native floor steer generation identically, and the axis reads the same
    sampling = Sampling(max_new_tokens=6)
    monitor = project_op(full, [1, 2, 3], label="axis")
    got = generate(tiny, [CHAT], sampling, ops=[cap_op(reference), monitor])[0]
    want = generate(tiny, [CHAT], sampling, ops=[cap_op(native), Project("axis", {i: axis[i] for i in (1, 2, 3)})])[0]
    assert got.token_ids == want.token_ids
    assert got.cap_hits == want.cap_hits and got.cap_hits > 0
    torch.testing.assert_close(got.projections["axis"], want.projections["axis"], equal_nan=True)
    for j, layer in enumerate((1, 2)):
        assert (got.projections["axis"][:, j] >= tau[layer] - 1e-3).all()

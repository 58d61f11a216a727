import json

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFWriter

from personaxis.errors import PersonaxisError
from personaxis.vectors import export_gguf, import_gguf


def write_gguf(path, arch: str, tensors: dict[str, np.ndarray], **strings: str) -> None:
    writer = GGUFWriter(path, arch)
    for key, value in strings.items():
        writer.add_string(key.replace("__", "."), value)
    for name, value in tensors.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_round_trip(tmp_path, make_vectors):
    v = make_vectors(layers=(1, 3, 5))
    path = export_gguf(v, tmp_path / "evil.gguf")
    back = import_gguf(path)
    assert back.layers == v.layers and back.names == ["evil"]
    for i in v.layers:
        assert torch.equal(back.direction(i), v.direction(i))
    assert back.meta.model_dump(exclude={"extra"}) == v.meta.model_dump(exclude={"extra"})
    assert back.meta.extra == v.meta.extra | {"gguf_scale": 1.0}


def test_direction_n_is_layer_n(tmp_path, make_vectors):
    v = make_vectors(layers=(1, 3, 5), model_id="meta-llama/Llama-3.1-8B-Instruct")
    export_gguf(v, tmp_path / "evil.gguf")
    reader = GGUFReader(tmp_path / "evil.gguf")
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.architecture"] == "controlvector"
    assert fields["controlvector.model_hint"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert fields["controlvector.layer_count"] == 3
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    assert sorted(tensors) == ["direction.1", "direction.3", "direction.5"]
    for i in v.layers:
        assert tensors[f"direction.{i}"].dtype == np.float32
        assert np.array_equal(tensors[f"direction.{i}"], v.direction(i).numpy())


def test_model_type_hint_and_scale(tmp_path, make_vectors):
    v = make_vectors(names=("evil", "humor"), layers=(2, 3), extra={"model_type": "llama"})
    export_gguf(v, tmp_path / "humor.gguf", name="humor", scale=-2.0)
    reader = GGUFReader(tmp_path / "humor.gguf")
    assert reader.fields["controlvector.model_hint"].contents() == "llama"
    back = import_gguf(tmp_path / "humor.gguf")
    assert back.names == ["humor"]
    assert torch.equal(back.direction(3), -2.0 * v.direction(3, "humor"))
    assert back.meta.extra["gguf_scale"] == -2.0
    assert back.meta.points_toward == "opposite of: more evil"
    with pytest.raises(PersonaxisError, match="several directions"):
        export_gguf(v, tmp_path / "x.gguf")
    with pytest.raises(PersonaxisError, match="scale"):
        export_gguf(v, tmp_path / "x.gguf", name="humor", scale=0.0)


def test_layer_zero_is_skipped_with_a_warning(tmp_path, make_vectors):
    v = make_vectors(layers=(0, 1, 2))
    with pytest.warns(UserWarning, match="cannot hold layer 0"):
        export_gguf(v, tmp_path / "v.gguf")
    assert import_gguf(tmp_path / "v.gguf").layers == [1, 2]
    with pytest.warns(UserWarning), pytest.raises(PersonaxisError, match="nothing to export"):
        export_gguf(make_vectors(layers=(0,)), tmp_path / "zero.gguf")
    assert not (tmp_path / "zero.gguf").exists()


def test_foreign_control_vector(tmp_path):
    directions = {f"direction.{i}": np.full(4, float(i), dtype=np.float32) for i in (1, 2, 3)}
    directions["direction.2"] = np.zeros(4, dtype=np.float32)  # e.g. an unsteered layer
    write_gguf(tmp_path / "cv.gguf", "controlvector", directions, controlvector__model_hint="llama")
    with pytest.warns(UserWarning, match=r"all-zero directions at layers \[2\]"):
        v = import_gguf(tmp_path / "cv.gguf", name="happy")
    assert v.layers == [1, 3] and v.names == ["happy"]
    assert torch.equal(v.direction(3), torch.full((4,), 3.0))
    assert v.meta.model_id == "llama" and v.meta.n_layers == 4 and v.meta.hidden_size == 4
    with pytest.warns(UserWarning):
        named = import_gguf(tmp_path / "cv.gguf", model_id="org/model", n_layers=32)
    assert named.meta.model_id == "org/model" and named.meta.n_layers == 32


def test_not_a_control_vector_is_refused(tmp_path):
    write_gguf(tmp_path / "model.gguf", "llama", {"token_embd.weight": np.ones((2, 4), dtype=np.float32)})
    with pytest.raises(PersonaxisError, match="architecture 'llama', not a llama.cpp control vector") as e:
        import_gguf(tmp_path / "model.gguf")
    assert "\n" not in str(e.value)
    (tmp_path / "junk.gguf").write_bytes(b"definitely not gguf")
    with pytest.raises(PersonaxisError, match="not a readable GGUF file"):
        import_gguf(tmp_path / "junk.gguf")
    write_gguf(tmp_path / "odd.gguf", "controlvector", {"steer.1": np.ones(4, dtype=np.float32)})
    with pytest.raises(PersonaxisError, match="unexpected tensor 'steer.1'"):
        import_gguf(tmp_path / "odd.gguf")


def test_failed_export_leaves_no_file(tmp_path, make_vectors, monkeypatch):
    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(GGUFWriter, "write_tensors_to_file", broken)
    with pytest.raises(PersonaxisError, match="cannot write .*v.gguf: disk full"):
        export_gguf(make_vectors(), tmp_path / "v.gguf")
    assert list(tmp_path.iterdir()) == []


def test_prescaled_export_is_our_steering_shift(tmp_path, make_vectors):
    from personaxis.inference.steering import steer_op

    v = make_vectors(layers=(0, 1, 2, 4))
    for units, strength in (("relative", 0.2), ("raw", 3.0)):
        path = export_gguf(v, tmp_path / f"{units}.gguf", layers=[2, 4], strength=strength, units=units)
        reader = GGUFReader(path)
        tensors = {t.name: np.array(t.data) for t in reader.tensors}
        assert sorted(tensors) == ["direction.2", "direction.4"]
        expected = steer_op(v, strength, [2, 4], units=units).deltas
        for layer in (2, 4):
            np.testing.assert_allclose(tensors[f"direction.{layer}"], expected[layer].numpy(), rtol=1e-6)
        scaling = json.loads(reader.fields["personaxis.scaling"].contents())
        assert scaling["mode"] == "prescaled" and scaling["strength"] == strength and scaling["units"] == units
        assert scaling["layers"] == [2, 4]
        assert import_gguf(path).meta.extra["gguf_scaling"] == scaling
    with pytest.raises(PersonaxisError, match=r"no direction at layer\(s\) \[3\]"):
        export_gguf(v, tmp_path / "x.gguf", layers=[2, 3])
    with pytest.raises(PersonaxisError, match="cannot hold layer 0"):
        export_gguf(v, tmp_path / "x.gguf", layers=[0, 1])
    with pytest.raises(PersonaxisError, match="--units raw"):
        export_gguf(make_vectors(mean_norms=None), tmp_path / "x.gguf", layers=[1], strength=0.1)
    assert not (tmp_path / "x.gguf").exists()


def test_export_gguf_command(monkeypatch, capsys, tmp_path, make_vectors):
    from cli_runner import invoke as run

    calibration = {"choice": {"layer": 2, "coef": 0.25, "units": "relative"}}
    v = make_vectors(layers=(0, 1, 2, 4), extra={"calibration": calibration})
    src = v.save(tmp_path / "v.safetensors")
    out = tmp_path / "v.gguf"

    code, stdout, err = run(monkeypatch, capsys, "export-gguf", src, "--out", out)
    assert code == 0, err
    assert err.strip() == "note: layer 0 left out (llama.cpp control vectors cannot hold direction.0)"
    assert "unscaled" not in stdout and "0.25" in stdout and "--control-vector-scaled" in stdout  # calibrated strength
    assert import_gguf(out).layers == [1, 2, 4]

    before = out.read_bytes()
    code, _, err = run(monkeypatch, capsys, "export-gguf", src, "--out", out, "--layers", "calibrated")
    assert code == 2 and err.count("\n") == 1 and "--force" in err, err
    assert out.read_bytes() == before  # the old file intact
    for layers, message in (("1,3", "no direction at layer(s) [3]"), ("7", "out of range"), ("0,1", "layer 0")):
        code, _, err = run(monkeypatch, capsys, "export-gguf", src, "--out", tmp_path / "x.gguf", "--layers", layers)
        assert code == 2 and err.count("\n") == 1 and message in err, (layers, err)
    code, _, err = run(monkeypatch, capsys, "export-gguf", src, "--out", tmp_path / "x.gguf", "--strength", "4.0x")
    assert code == 2 and err.count("\n") == 1, err
    assert not (tmp_path / "x.gguf").exists()

    code, stdout, err = run(
        monkeypatch, capsys, "export-gguf", src, "--out", out, "--layers", "calibrated", "--strength", "2raw", "--force"
    )
    assert code == 0, err
    back = import_gguf(out)
    assert back.layers == [2]
    torch.testing.assert_close(back.direction(2), 2.0 * v.direction(2))
    assert back.meta.extra["gguf_scaling"]["units"] == "raw" and "2" in stdout

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
    with pytest.raises(OSError, match="disk full"):
        export_gguf(make_vectors(), tmp_path / "v.gguf")
    assert list(tmp_path.iterdir()) == []

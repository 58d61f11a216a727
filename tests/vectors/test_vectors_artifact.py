import json
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import personaxis
from personaxis.errors import PersonaxisError
from personaxis.vectors import CapConfig, CapMeta, VectorMeta, Vectors, _io, config_hash

HIDDEN, N_LAYERS, MODEL_ID = 8, 6, "tiny/model"  # what conftest builds


def assert_same(a: Vectors, b: Vectors) -> None:
    assert a.layers == b.layers
    assert a.names == b.names
    for name in a.names:
        assert a.data[name].dtype == torch.float32
        assert torch.equal(a.data[name], b.data[name])
    assert a.meta == b.meta


# -- files ----------------------------------------------------------------------------------------------------


def test_round_trip_is_bit_exact(tmp_path, make_vectors):
    v = make_vectors(names=("evil", "humor"), layers=(0, 3, 5))
    path = v.save(tmp_path / "v.safetensors")
    back = Vectors.load(path)
    assert_same(v, back)
    assert back.meta.mean_norms == {i: 10.0 + i for i in range(N_LAYERS)}
    assert back.meta.library_version == personaxis.__version__
    assert back.meta.layer_convention == "output of block i"


def test_saved_file_is_one_self_contained_safetensors(tmp_path, make_vectors):
    v = make_vectors()
    v.save(tmp_path / "v.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["v.safetensors"]
    with safe_open(str(tmp_path / "v.safetensors"), framework="pt") as f:
        header = f.metadata()
        assert sorted(f.keys()) == ["evil", "layers"]
        assert f.get_tensor("layers").tolist() == [1, 2, 4]
        assert f.get_tensor("evil").shape == (3, HIDDEN)
    assert json.loads(header["personaxis.meta"])["model_id"] == MODEL_ID


def test_equal_artifacts_are_equal_bytes(tmp_path, make_vectors):
    """Directions and header strings added in another order, in two processes or one: the same file, byte for byte
    (safetensors alone writes its header metadata in hash-map order, which varies)."""
    v = make_vectors(names=("evil", "humor", "calm"))
    reordered = Vectors(v.layers, dict(reversed(list(v.data.items()))), v.meta)
    a, b = v.save(tmp_path / "a.safetensors"), reordered.save(tmp_path / "b.safetensors")
    assert a.read_bytes() == b.read_bytes()
    strings = {f"note{i}": str(i) for i in range(12)}
    tensors = {"x": torch.ones(3, dtype=torch.bfloat16), "y": torch.arange(5), "z": torch.zeros(2)}
    _io.write_artifact(tmp_path / "c.safetensors", tensors, "k", "{}", header=strings)
    _io.write_artifact(
        tmp_path / "d.safetensors", dict(reversed(tensors.items())), "k", "{}", dict(reversed(strings.items()))
    )
    assert (tmp_path / "c.safetensors").read_bytes() == (tmp_path / "d.safetensors").read_bytes()
    tensors_back, meta, header = _io.read_artifact(tmp_path / "d.safetensors", "k")
    assert meta == "{}" and {k: header[k] for k in strings} == strings
    assert all(torch.equal(tensors_back[k], t) for k, t in tensors.items())
    assert_same(Vectors.load(b), Vectors.load(a))


def test_failed_write_leaves_no_partial_file(tmp_path, make_vectors, monkeypatch):
    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(_io, "save_canonical", broken)
    with pytest.raises(PersonaxisError, match="cannot write .*v.safetensors: disk full"):  # one line, no traceback
        make_vectors().save(tmp_path / "v.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_previous_file(tmp_path, make_vectors, monkeypatch):
    old = make_vectors(seed=1)
    path = old.save(tmp_path / "v.safetensors")

    def broken(tensors, filename, metadata=None):
        raise OSError("disk full")

    monkeypatch.setattr(_io, "save_canonical", broken)
    with pytest.raises(PersonaxisError, match="disk full"):
        make_vectors(seed=2).save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["v.safetensors"]
    assert_same(Vectors.load(path), old)


def test_load_refuses_nan_in_file_naming_direction_and_layer(tmp_path, make_meta):
    data = torch.randn(2, HIDDEN)
    data[1, 3] = float("nan")
    path = tmp_path / "bad.safetensors"
    header = {"personaxis.kind": "vectors", "personaxis.meta": make_meta().model_dump_json()}
    save_file({"evil": data, "layers": torch.tensor([2, 3])}, str(path), metadata=header)
    with pytest.raises(PersonaxisError, match=r"bad.safetensors: direction 'evil' at layer 3 is not finite"):
        Vectors.load(path)


def test_load_refuses_foreign_files(tmp_path, make_vectors):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(PersonaxisError, match="not a readable safetensors file") as e:
        Vectors.load(junk)
    assert "\n" not in str(e.value)

    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.ones(2)}, str(plain))
    with pytest.raises(PersonaxisError, match="not a personaxis artifact"):
        Vectors.load(plain)

    with pytest.raises(PersonaxisError, match="no such file"):
        Vectors.load(tmp_path / "missing.safetensors")

    v = make_vectors()
    cap = CapConfig(v.layers, v.data["evil"], [0.0, 1.0, 2.0], "floor", CapMeta(**v.meta.model_dump()))
    cap.save(tmp_path / "cap.safetensors")
    with pytest.raises(PersonaxisError, match="holds a cap artifact, not vectors"):
        Vectors.load(tmp_path / "cap.safetensors")


def test_load_refuses_newer_format(tmp_path, make_vectors, make_meta):
    newer = make_meta().model_dump() | {"format_version": 99}
    path = tmp_path / "new.safetensors"
    header = {"personaxis.kind": "vectors", "personaxis.meta": json.dumps(newer)}
    save_file({"evil": torch.randn(1, HIDDEN), "layers": torch.tensor([0])}, str(path), metadata=header)
    with pytest.raises(PersonaxisError, match="format version 99.*upgrade"):
        Vectors.load(path)


# -- checks ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layers", "data", "message"),
    [
        ((1, 2), {"evil": torch.randn(2, HIDDEN + 1)}, r"shape \(2, 9\), expected \(2, 8\)"),
        ((1, 6), {"evil": torch.randn(2, HIDDEN)}, "do not fit a model with 6 layers"),
        ((-1, 2), {"evil": torch.randn(2, HIDDEN)}, "do not fit"),
        ((2, 1), {"evil": torch.randn(2, HIDDEN)}, "distinct and increasing"),
        ((2, 2), {"evil": torch.randn(2, HIDDEN)}, "distinct and increasing"),
        ((), {"evil": torch.randn(0, HIDDEN)}, "no layers"),
        ((1,), {}, "at least one named direction"),
        ((1,), {"layers": torch.randn(1, HIDDEN)}, "invalid direction name"),
        ((1,), {"evil": [1.0] * HIDDEN}, "must be a tensor"),
    ],
)
def test_constructor_refuses_bad_input(layers, data, message, make_meta):
    with pytest.raises(PersonaxisError, match=message) as e:
        Vectors(layers, data, make_meta())
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_constructor_refuses_non_finite(bad, make_meta):
    data = torch.randn(3, HIDDEN)
    data[2, 0] = bad
    with pytest.raises(PersonaxisError, match=r"direction 'evil' at layer 4 is not finite"):
        Vectors([1, 2, 4], {"evil": data}, make_meta())


def test_constructor_refuses_zero_norm(make_meta):
    data = torch.randn(3, HIDDEN)
    data[1] = 0.0
    with pytest.raises(PersonaxisError, match=r"direction 'evil' at layer 2 has zero norm"):
        Vectors([1, 2, 4], {"evil": data}, make_meta())


def test_constructor_copies_to_float32(make_meta):
    data = torch.randn(1, HIDDEN, dtype=torch.bfloat16)
    v = Vectors([0], {"evil": data}, make_meta())
    assert v.data["evil"].dtype == torch.float32
    data.zero_()
    assert v.data["evil"].norm() > 0


def test_meta_refuses_bad_mean_norms(make_meta):
    with pytest.raises(ValueError, match="finite and positive"):
        make_meta(mean_norms={0: 0.0})


def test_validate_against_model(make_vectors, model_info):
    v = make_vectors()
    assert v.validate(model_info) == []
    other = SimpleNamespace(name="other/model", n_layers=N_LAYERS, hidden_size=HIDDEN)
    assert any("other/model" in w for w in v.validate(other))
    deeper = SimpleNamespace(name=MODEL_ID, n_layers=N_LAYERS + 2, hidden_size=HIDDEN)
    assert any("layers" in w for w in v.validate(deeper))
    with pytest.raises(PersonaxisError, match="hidden size 8 but model tiny/model has 16"):
        v.validate(SimpleNamespace(name=MODEL_ID, n_layers=N_LAYERS, hidden_size=16))
    with pytest.raises(PersonaxisError, match=r"uses layers \[4\] but model tiny/model has 4 layers"):
        v.validate(SimpleNamespace(name=MODEL_ID, n_layers=4, hidden_size=HIDDEN))


# -- access ---------------------------------------------------------------------------------------------------


def test_access(make_vectors):
    v = make_vectors(names=("evil", "humor"))
    assert v.names == ["evil", "humor"]
    assert v.hidden_size == HIDDEN
    assert torch.equal(v.direction(2, "humor"), v.data["humor"][1])
    assert torch.equal(v["humor", 2], v.data["humor"][1])
    unit = v.unit(4, "evil")
    assert torch.allclose(unit.norm(), torch.tensor(1.0))
    assert torch.allclose(unit * v.direction(4, "evil").norm(), v.direction(4, "evil"))
    assert torch.allclose(v.units("evil")[2], unit)
    one = v["evil"]
    assert isinstance(one, Vectors) and one.names == ["evil"]
    assert torch.equal(one[4], v.direction(4, "evil"))
    with pytest.raises(PersonaxisError, match="several directions"):
        v.direction(2)
    with pytest.raises(PersonaxisError, match="no direction named 'sad'"):
        v.direction(2, "sad")
    with pytest.raises(PersonaxisError, match=r"layer 3 is not in these vectors \(layers \[1, 2, 4\]\)"):
        v.direction(3, "evil")


def test_direction_is_a_copy(make_vectors):
    v = make_vectors()
    v.direction(1).zero_()
    assert v.data["evil"][0].norm() > 0


def test_select(make_vectors):
    v = make_vectors(layers=(0, 1, 2, 3))
    s = v.select([3, 1])
    assert s.layers == [1, 3]
    assert torch.equal(s.direction(3), v.direction(3))
    assert s.meta == v.meta
    with pytest.raises(PersonaxisError, match="layer 5 is not in these vectors"):
        v.select([5])


def test_names_are_sorted_whatever_the_insertion_order(make_meta):
    a = Vectors([0], {"b": torch.ones(1, HIDDEN), "a": torch.ones(1, HIDDEN)}, make_meta())
    assert a.names == ["a", "b"]


# -- arithmetic -----------------------------------------------------------------------------------------------


def test_arithmetic(make_vectors):
    a = make_vectors(names=("x", "y"), seed=1)
    b = make_vectors(names=("x", "y"), seed=2)
    for name in ("x", "y"):
        assert torch.equal((a + b).data[name], a.data[name] + b.data[name])
        assert torch.equal((a - b).data[name], a.data[name] - b.data[name])
        assert torch.equal((2.5 * a).data[name], 2.5 * a.data[name])
        assert torch.equal((a * 2).data[name], 2 * a.data[name])
        assert torch.equal((-a).data[name], -a.data[name])
        assert torch.allclose((a / 4).data[name], a.data[name] / 4)
    assert (-a).meta.points_toward == "opposite of: more evil"
    assert (-1 * -a).meta.points_toward == "more evil"
    assert (a - b).meta.config_hash != a.meta.config_hash


def test_arithmetic_refuses_mismatches(make_vectors):
    a = make_vectors()
    with pytest.raises(PersonaxisError, match="select the same layers"):
        a + make_vectors(layers=(1, 2, 3))
    with pytest.raises(PersonaxisError, match="named"):
        a - make_vectors(names=("humor",))
    with pytest.raises(PersonaxisError, match="different spaces"):
        a + make_vectors(model_id="other/model")
    with pytest.raises(PersonaxisError, match="zero norm"):
        a - a
    with pytest.raises(TypeError):
        a + 1.0


# -- config hash ----------------------------------------------------------------------------------------------


def test_config_hash_is_canonical(make_meta):
    h = config_hash({"b": 1, "a": [1, 2], "c": {"y": 1.5, "x": None}})
    assert h == config_hash({"c": {"x": None, "y": 1.5}, "a": [1, 2], "b": 1})
    assert len(h) == 64 and int(h, 16) >= 0
    assert h != config_hash({"b": 2, "a": [1, 2], "c": {"y": 1.5, "x": None}})
    assert config_hash(make_meta()) == config_hash(make_meta().model_dump(mode="json"))
    assert config_hash({"m": make_meta()}) == config_hash({"m": json.loads(make_meta().model_dump_json())})
    with pytest.raises(TypeError):
        config_hash({"t": object()})


def test_vector_meta_is_strict():
    with pytest.raises(ValueError):
        VectorMeta(model_id="m", hidden_size=4, n_layers=2, method="x", points_toward="y", colour="red")

"""No artifact with a NaN or an infinity is ever written; unwritable places and foreign files are one line."""

from __future__ import annotations

import math

import pytest
import torch

from personaxis.errors import PersonaxisError
from personaxis.vectors import CapConfig, Vectors, export_gguf, load_pt
from personaxis.vectors._io import KIND_KEY, META_KEY, check_finite


def _one_line(info: pytest.ExceptionInfo) -> str:
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_vectors_edited_to_non_finite_are_not_saved(tmp_path, make_vectors, bad):
    v = make_vectors()
    v.data["evil"][1, 3] = bad  # after the constructor's check
    path = tmp_path / "v.safetensors"
    with pytest.raises(PersonaxisError) as info:
        v.save(path)
    assert _one_line(info) == f"refusing to write {path}: direction 'evil' at layer 2 is not finite (NaN or inf)"
    assert list(tmp_path.iterdir()) == []


def test_a_cap_edited_to_non_finite_is_not_saved(tmp_path, make_vectors):
    cap = CapConfig.from_vectors(make_vectors(), {1: 0.5, 2: 1.0})
    old = cap.save(tmp_path / "cap.safetensors").read_bytes()
    cap.tau[1] = math.nan
    with pytest.raises(PersonaxisError, match="refusing to write .*cap threshold at layer 2 is not finite"):
        cap.save(tmp_path / "cap.safetensors")
    cap.tau[1] = 1.0
    cap.directions[0, 0] = math.inf
    with pytest.raises(PersonaxisError, match="refusing to write .*direction 'cap' at layer 1 is not finite"):
        cap.save(tmp_path / "cap.safetensors")
    assert (tmp_path / "cap.safetensors").read_bytes() == old  # the previous file is left as it was


def test_check_finite_guards_every_artifact(tmp_path):
    check_finite(tmp_path / "a", {"x": torch.ones(2), "layers": torch.tensor([1, 2])})
    with pytest.raises(PersonaxisError, match="tensor 'x' holds NaN or infinite values"):
        check_finite(tmp_path / "a", {"x": torch.tensor([1.0, math.inf], dtype=torch.float64)})


@pytest.mark.parametrize(("scale", "strength"), [(1e39, None), (1.0, 1e39), (-1e30, 1e30)])
def test_gguf_export_that_overflows_float32_writes_nothing(tmp_path, make_vectors, scale, strength):
    path = tmp_path / "v.gguf"
    with pytest.raises(PersonaxisError) as info:
        export_gguf(make_vectors(), path, scale=scale, strength=strength, units="raw", layers=[1, 2])
    assert "is not finite in float32" in _one_line(info) and str(path) in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_gguf_export_that_underflows_float32_writes_nothing(tmp_path, make_vectors):
    with pytest.raises(PersonaxisError, match="times 1e-60 is zero in float32: use a larger scale"):
        export_gguf(make_vectors(), tmp_path / "v.gguf", scale=1e-60, layers=[1])
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_place_is_one_line(make_vectors):
    with pytest.raises(PersonaxisError, match="cannot write /proc/v.safetensors: "):
        make_vectors().save("/proc/v.safetensors")
    with pytest.raises(PersonaxisError, match="cannot write /proc/nope/v.gguf: "):
        export_gguf(make_vectors(), "/proc/nope/v.gguf", layers=[1])


def test_metadata_nested_too_deeply_is_one_line(tmp_path, make_vectors):
    from safetensors.torch import save_file

    path = tmp_path / "deep.safetensors"
    v = make_vectors()
    tensors = {**v.data, "layers": torch.tensor(v.layers)}
    save_file(tensors, str(path), metadata={KIND_KEY: "vectors", META_KEY: "[" * 100_000})
    with pytest.raises(PersonaxisError) as info:
        Vectors.load(path)
    assert _one_line(info).startswith(f"{path}: metadata: line 1, column 100000: JSON nested too deeply")


@pytest.mark.parametrize(
    ("data", "looks"),
    [
        (b"layer,value\n1,2\n", "it looks like text"),
        ('{"axis": "é"}'.encode(), "it looks like text"),
        (b"\x00\x01\x02\x03\xfe\xff\x00\x00\x00", "it starts with bytes 00 01 02 03 fe ff 00 00"),
    ],
)
def test_a_file_that_is_not_torch_is_called_what_it_is(tmp_path, data, looks):
    """Not 'a pickle that executes code': neither a zip archive nor a pickle, and what it looks like."""
    path = tmp_path / "axis.pt"
    path.write_bytes(data)
    with pytest.raises(PersonaxisError) as info:
        load_pt(path)
    message = _one_line(info)
    assert message == f"{path} is not a torch file (neither a zip archive from torch.save nor a pickle): {looks}"
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(PersonaxisError, match="is empty, not a torch file"):
        load_pt(empty)


def test_a_legacy_pickle_still_loads(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"axis": torch.ones(2, 3)}, path, _use_new_zipfile_serialization=False)
    assert path.read_bytes()[:1] == b"\x80"
    assert torch.equal(load_pt(path)["axis"], torch.ones(2, 3))


def test_a_newer_pickle_protocol_is_not_called_code(tmp_path):
    """Tensors pickled with protocol 4 are refused for what is true: the safe loader cannot read them."""
    path = tmp_path / "p4.pt"
    torch.save({"axis": torch.ones(2, 3)}, path, pickle_protocol=4)
    with pytest.raises(PersonaxisError) as info, pytest.warns(UserWarning, match="pickle protocol 4"):
        load_pt(path)
    assert "pickled with a protocol the weights-only loader does not read" in _one_line(info)
    assert str(info.value).startswith(f"refusing to load {path}")
    assert "executes code" not in str(info.value)


@pytest.mark.parametrize("bad", [torch.ones(2, 2), "abc", 3.5, -1, math.inf, 10**400])
def test_a_reference_count_that_is_not_one_is_one_line(tmp_path, bad):
    from personaxis.vectors import import_reference

    path = tmp_path / "axis.pt"
    torch.save({"axis": torch.randn(4, 8), "n_roles": bad}, path)
    with pytest.raises(PersonaxisError) as info:
        import_reference(path)
    assert _one_line(info).startswith(f"{path}: 'n_roles' is not a count")
    torch.save({"axis": torch.randn(4, 8), "n_roles": torch.tensor(7)}, path)
    assert import_reference(path).meta.counts == {"n_roles": 7}

"""Commands fuzzed through the real entry point: whatever the files and option values, a command succeeds or exits
with code 2 and one line, never a traceback, and never changes an input. No model is loaded: `-m` names none."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from cli_runner import invoke as run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from personaxis.vectors import VectorMeta, Vectors, import_gguf

FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
NO_MODEL = "/nonexistent/model"  # extract reads its chats before the model: valid chats end in "no model at"

chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
lines = st.one_of(
    st.just(json.dumps(chat)),
    st.text(max_size=30),
    st.integers(1, 30_000).map(lambda n: "[" * n),
    st.integers(4290, 4400).map(lambda n: '{"messages": ' + "9" * n + "}"),
    st.just('{"messages": [{"role": "user", "content": "\\udc80"}, {"role": "assistant", "content": "x"}]}'),
)
chats_bytes = st.one_of(
    st.lists(lines, max_size=4).map(lambda ls: "\n".join(ls).encode("utf-8", "surrogatepass")),
    st.binary(max_size=200),
    st.builds(lambda b: json.dumps(chat).encode() + b"\n" + b, st.binary(min_size=1, max_size=20)),
)
# what --out may be: a new file, the input itself, a folder, a place that cannot be written, a file below a file
outs = st.sampled_from(["new", "input", "folder", "/proc/out.safetensors", "file/below", "sub/../input"])


def _out(kind: str, tmp: Path, source: Path, suffix: str) -> Path:
    return {
        "new": tmp / f"out{suffix}",
        "input": source,
        "folder": tmp,
        "file/below": source / f"out{suffix}",
        "sub/../input": tmp / "sub" / ".." / source.name,
    }.get(kind, Path(kind))


def _check(code: int, err: str, before: dict[str, bytes], folder: Path, out: Path) -> None:
    """Success, or code 2 with one line and nothing written; inputs unchanged either way."""
    assert "Traceback" not in err, err
    after = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    assert {name: after.get(name) for name in before} == before  # no input changed
    if code == 0:
        assert out.is_file()
        return
    assert code == 2 and err.startswith("error: ") and err.strip().count("\n") == 0, (code, err)
    assert set(after) == set(before)  # nothing written


def _fresh(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            p.unlink()


@FUZZ
@given(data=chats_bytes, out=outs, batch=st.sampled_from(["8", "0", "-1", "1e3", "nan"]))
def test_extract_never_tracebacks_nor_changes_its_input(monkeypatch, capsys, tmp_path, data, out, batch):
    _fresh(tmp_path)
    source = tmp_path / "pc.jsonl"
    source.write_bytes(data)
    before = {source.name: data}
    target = _out(out, tmp_path, source, ".safetensors")
    code, _, err = run(monkeypatch, capsys, "extract", "-m", NO_MODEL, "--chats", source, "--out", target,
                       "--batch-size", batch)  # fmt: skip
    assert code == 2  # there is no model to load
    _check(code, err, before, tmp_path, target)


tensors = st.one_of(
    st.tuples(st.integers(0, 6), st.integers(0, 9)).map(lambda s: torch.randn(s)),
    st.integers(1, 5).map(lambda n: torch.full((n, 4), float("nan"))),
    st.just(torch.randn(3, 4) * 1e38),
)
objects = st.one_of(
    tensors,
    st.dictionaries(st.sampled_from(["axis", "vector", "role", "vectors", "experiments", "n_roles"]),
                    tensors | st.integers() | st.text(max_size=5) | st.lists(st.integers(), max_size=3), max_size=3),
)  # fmt: skip


@FUZZ
@given(
    obj=objects, junk=st.binary(max_size=100), use_junk=st.booleans(), out=outs, n_layers=st.sampled_from([None, "4"])
)
def test_import_never_tracebacks_nor_changes_its_input(
    monkeypatch, capsys, tmp_path, obj, junk, use_junk, out, n_layers
):
    _fresh(tmp_path)
    source = tmp_path / "axis.pt"
    if use_junk:
        source.write_bytes(junk)
    else:
        torch.save(obj, source)
    before = {source.name: source.read_bytes()}
    target = _out(out, tmp_path, source, ".safetensors")
    extra = ["--n-layers", n_layers] if n_layers else []
    code, _, err = run(monkeypatch, capsys, "import", source, "--out", target, *extra)
    _check(code, err, before, tmp_path, target)
    if code == 0:
        Vectors.load(target)  # what import writes reads back


finite_or_not = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["1", "-1", "0", "1e39", "-1e39", "3.4e38", "nan", "inf", "x", ""]),
    st.text(max_size=8),
)


@FUZZ
@given(
    scale=finite_or_not,
    strength=st.one_of(st.none(), finite_or_not, finite_or_not.map(lambda s: s + "raw")),
    layers=st.one_of(
        st.none(), st.sampled_from(["all", "1", "0", "1:3", "2,9", "calibrated", "x", ":"]), st.text(max_size=6)
    ),
    out=outs,
    junk=st.one_of(st.none(), st.binary(max_size=80)),
)
def test_export_gguf_never_tracebacks_nor_writes_non_finite(monkeypatch, capsys, tmp_path, scale, strength, layers,
                                                           out, junk):  # fmt: skip
    _fresh(tmp_path)
    source = tmp_path / "good.safetensors"
    if junk is None:
        meta = VectorMeta(model_id="m", hidden_size=4, n_layers=4, method="t", points_toward="x",
                          mean_norms={i: 2.0 for i in range(4)})  # fmt: skip
        Vectors(range(4), {"v": torch.randn(4, 4)}, meta).save(source)
    else:
        source.write_bytes(junk)
    before = {source.name: source.read_bytes()}
    target = _out(out, tmp_path, source, ".gguf")
    args = ["export-gguf", source, "--out", target, f"--scale={scale}"]
    args += [f"--strength={strength}"] if strength is not None else []
    args += [f"--layers={layers}"] if layers is not None else []
    code, _, err = run(monkeypatch, capsys, *args)
    if code == 0:
        assert "note: layer 0 left out" in err or err == ""
        back = import_gguf(target)
        assert all(math.isfinite(x) for x in back.data["v"].flatten().tolist())
        err = ""
    _check(code, err, before, tmp_path, target)

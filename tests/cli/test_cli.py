"""The CLI end to end on a tiny model saved to a local folder (the real loading path), and its bad-input answers."""

import json

import torch
from cli_runner import invoke as run
from safetensors import safe_open
from safetensors.torch import save_file

from personaxis.inference.capture import encode_means
from personaxis.inference.steering import default_layer
from personaxis.model import load_model
from personaxis.vectors import Vectors, import_gguf

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hello there"},
     {"role": "assistant", "content": "Ahoy matey! How are you today?"}],
    [{"role": "user", "content": "Tell me about the sea"}, {"role": "assistant", "content": "The waves and the wind."}],
]  # fmt: skip


def write_jsonl(path, chats):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    return path


def _span(layers):
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 2 else ",".join(map(str, layers))


def test_info(monkeypatch, capsys, folder):
    code, out, _ = run(monkeypatch, capsys, "info", folder, "--dtype", "float32")
    assert code == 0
    assert "4 (at model.layers)" in out and "64" in out
    values = " ".join(line.split("│")[2] for line in out.splitlines() if line.count("│") == 3)  # a cell may wrap
    assert "hidden_states[i + 1]" in " ".join(values.split()), out  # not eaten as rich markup


def test_version(monkeypatch, capsys):
    import tomllib
    from pathlib import Path

    declared = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["version"]
    code, out, _ = run(monkeypatch, capsys, "--version")
    assert code == 0 and out.strip() == f"personaxis {declared}"


def test_demo(monkeypatch, capsys, folder, tmp_path):
    code, out, err = run(
        monkeypatch, capsys, "demo", "--model", folder, "--out", tmp_path / "demo", "--dtype", "float32"
    )
    assert code == 0, err
    vectors = Vectors.load(tmp_path / "demo" / "pirate.safetensors")
    assert vectors.names == ["pirate"] and vectors.layers == [0, 1, 2, 3] and vectors.hidden_size == 64
    assert torch.isfinite(vectors.data["pirate"]).all() and (vectors.data["pirate"].norm(dim=-1) > 0).all()
    chosen = int(out.split("chosen layer ")[1].split()[0])
    assert chosen in (1, 2)  # the middle half of a 4-block model
    assert vectors.meta.extra["layer"] == chosen and default_layer(vectors) == chosen  # `serve` monitors there
    separation = vectors.meta.extra["separation"]
    assert len(separation) == 4 and max(separation[1:3]) == separation[chosen]
    assert "3. Steering a plain prompt along it at layer" in out
    for coef in ("+0 ", "+0.15", "+0.3"):
        assert coef in out, out


def test_extract_mean_and_diff(monkeypatch, capsys, folder, tmp_path):
    chats = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    out = tmp_path / "means.safetensors"
    code, _, err = run(monkeypatch, capsys, "extract", "-m", folder, "--chats", chats, "--layers", "1:3", "--out", out)
    assert code == 0, err
    vectors = Vectors.load(out)
    assert vectors.layers == [1, 2]
    model = load_model(folder)
    expected = encode_means(model, CHATS, [1, 2])[:, 0].mean(0)
    torch.testing.assert_close(vectors.data[vectors.names[0]], expected, rtol=1e-4, atol=1e-5)
    assert vectors.meta.mean_norms and vectors.meta.counts == {"chats": 3}

    neg = write_jsonl(tmp_path / "neg.jsonl", CHATS[::-1][:2])
    diff = tmp_path / "diff.safetensors"
    code, out, err = run(monkeypatch, capsys, "extract", "-m", folder, "--diff", chats, neg, "--out", diff)
    assert code == 0, err
    assert "best-separating layers (Cohen's d of the two sets along the direction): " in out, out
    d = Vectors.load(diff)
    expected = encode_means(model, CHATS, d.layers)[:, 0].mean(0) - encode_means(model, CHATS[::-1][:2], d.layers)[
        :, 0
    ].mean(0)
    torch.testing.assert_close(d.data["direction"], expected, rtol=1e-4, atol=1e-5)


def test_generate_steer_project_and_gguf(monkeypatch, capsys, folder, tmp_path):
    chats = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    vec = tmp_path / "v.safetensors"
    assert run(monkeypatch, capsys, "extract", "-m", folder, "--diff", chats, chats, "--out", vec)[0] == 2  # a - a = 0
    neg = write_jsonl(tmp_path / "neg.jsonl", CHATS[:1])
    assert run(monkeypatch, capsys, "extract", "-m", folder, "--diff", chats, neg, "--out", vec)[0] == 0
    code, out, err = run(
        monkeypatch, capsys, "generate", "-m", folder, "-p", "Hello", "--steer", f"{vec}:1:2.0",
        "--project", vec, "--max-tokens", "5",
    )  # fmt: skip
    assert code == 0, err
    assert "projection" in err and f"(v.safetensors, read at layers {_span(Vectors.load(vec).layers)})" in err, err
    for layer in Vectors.load(vec).layers:  # each layer it read is named with its reading
        assert f"  layer {layer}: mean " in err, err
    gguf = tmp_path / "v.gguf"
    assert run(monkeypatch, capsys, "export-gguf", vec, "--out", gguf)[0] == 0
    back = import_gguf(gguf)
    original = Vectors.load(vec)
    for layer in back.layers:  # llama.cpp's direction.i is block i
        torch.testing.assert_close(back.direction(layer), original.direction(layer))


def test_import_reference_files_then_use_them(monkeypatch, capsys, folder, tmp_path):
    """The reference projects' files, written in their layouts, become artifacts the other commands take."""
    from personaxis.vectors import CapConfig

    g = torch.Generator().manual_seed(0)
    axis = torch.randn(4, 64, generator=g)
    torch.save(axis, tmp_path / "assistant_axis.pt")  # a published axis: a bare (blocks, hidden) tensor
    torch.save(torch.randn(5, 64, generator=g), tmp_path / "mystery.pt")  # rows per hidden state, name says nothing
    experiments = [
        {
            "id": f"layers_{a}:{b}-p0.25",
            "interventions": [{"vector": f"neg_axis_{i}", "cap": -1.0} for i in range(a, b)],
        }
        for a, b in [(1, 3), (2, 4)]
    ]
    vectors = {f"neg_axis_{i}": {"layer": i, "vector": -axis[i]} for i in range(4)}
    torch.save({"vectors": vectors, "experiments": experiments}, tmp_path / "capping_config.pt")
    out = {name: tmp_path / f"{name}.safetensors" for name in ("axis", "persona", "cap")}

    code, _, err = run(monkeypatch, capsys, "import", tmp_path / "assistant_axis.pt", "--out", out["axis"])
    assert code == 0, err
    torch.testing.assert_close(Vectors.load(out["axis"]).direction(2), axis[2])
    code, _, err = run(monkeypatch, capsys, "import", tmp_path / "mystery.pt", "--out", out["persona"])
    assert code == 2 and "--n-layers" in err, err
    code, _, err = run(monkeypatch, capsys, "import", tmp_path / "mystery.pt", "--out", out["persona"], "--n-layers", 4)
    assert code == 0 and Vectors.load(out["persona"]).meta.method == "import:persona_vectors", err

    config = tmp_path / "capping_config.pt"
    for args, message in [
        ([], "name one with --experiment (layers_1:3-p0.25, layers_2:4-p0.25)"),
        (["--experiment", "layers_9:9-p0.5"], "it has no experiment 'layers_9:9-p0.5'"),
        (["--format", "onnx"], "unknown format 'onnx'"),
    ]:
        code, _, err = run(monkeypatch, capsys, "import", config, "--out", out["cap"], *args)
        assert code == 2 and message in err, (args, err)
    code, _, err = run(monkeypatch, capsys, "import", tmp_path / "mystery.pt", "--out", out["cap"], "--experiment", "x")
    assert code == 2 and "not a capping config" in err
    assert not out["cap"].exists()
    code, _, err = run(monkeypatch, capsys, "import", config, "--out", out["cap"], "--experiment", "layers_2:4-p0.25")
    assert code == 0, err
    cap = CapConfig.load(out["cap"])
    assert cap.layers == [2, 3] and cap.kind == "ceiling"

    code, _, err = run(
        monkeypatch, capsys, "generate", "-m", folder, "-p", "Hello", "--cap", out["cap"], "--project", out["axis"],
        "--max-tokens", "4",
    )  # fmt: skip
    assert code == 0 and "projection" in err, err


def test_bad_inputs_fail_with_one_line(monkeypatch, capsys, folder, tmp_path):
    chats = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text(json.dumps({"messages": CHATS[0]}) + "\n{not json\n")
    no_reply = write_jsonl(tmp_path / "noreply.jsonl", [[{"role": "user", "content": "hi"}]])
    nan_file = tmp_path / "nan.safetensors"  # a well-formed artifact whose numbers went bad
    good = Vectors([0, 1, 2, 3], {"direction": torch.randn(4, 64)}, _meta()).save(tmp_path / "good.safetensors")
    with safe_open(str(good), "pt") as f:
        metadata, layers = f.metadata(), f.get_tensor("layers")
    save_file({"direction": torch.full((4, 64), float("nan")), "layers": layers}, str(nan_file), metadata=metadata)
    pickle_file = tmp_path / "evil.pt"

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"axis": Evil()}, pickle_file)
    not_cv = tmp_path / "model.gguf"
    import gguf

    writer = gguf.GGUFWriter(str(not_cv), "llama")
    writer.add_tensor("token_embd.weight", torch.zeros(2, 2).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    # a vector of another hidden size
    big = tmp_path / "big.safetensors"
    assert run(monkeypatch, capsys, "extract", "-m", folder, "--diff", chats, no_reply, "--out", big)[0] == 2

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub id with no network must fail at once, in one line
    cases = [
        (["info", tmp_path / "missing"], "no model at"),
        (["info", "some-org/not-a-cached-model"], "hub is unreachable"),
        (["extract", "-m", folder, "--chats", bad_line, "--out", tmp_path / "x.safetensors"], "line 2"),
        (["extract", "-m", folder, "--chats", no_reply, "--out", tmp_path / "x.safetensors"], "no assistant turn"),
        (["extract", "-m", folder, "--chats", chats, "--layers", "7", "--out", tmp_path / "x.safetensors"], "range"),
        (["generate", "-m", folder, "-p", "hi", "--steer", f"{nan_file}:1:1"], "NaN"),
        (
            ["generate", "-m", folder, "-p", "hi", "--steer", "nocolons"],
            "no such file 'nocolons'; use FILE:LAYERS:COEF",
        ),
        (["import", pickle_file, "--out", tmp_path / "x.safetensors"], "refusing"),
        (["import", not_cv, "--out", tmp_path / "x.safetensors"], "control vector"),
        (["import", not_cv, "--out", tmp_path / "x.safetensors", "--experiment", "a"], "not a .gguf"),
    ]
    for args, message in cases:
        code, _, err = run(monkeypatch, capsys, *args)
        assert code == 2, (args, err)
        assert message in err, (args, err)
        assert "Traceback" not in err and err.strip().count("\n") == 0, err
        assert "pwned" not in err
    assert not (tmp_path / "x.safetensors").exists()


def test_usage_mistakes_fail_with_one_line(monkeypatch, capsys):
    """Parsing errors (caught before any command runs) answer like every other mistake: one line, exit code 2."""
    cases = [
        (["info", "default", "--bogus"], "No such option: --bogus (see: personaxis info --help)"),
        (["axis", "steer", "-m", "default", "--strength", "3"], "No such option: --strength"),
        (["info"], "Missing argument 'model'"),
        (["generate", "-m", "default", "-p", "hi", "--max-tokens", "many"], "Invalid value for '--max-tokens'"),
        (["cap", "sweep", "--windows"], "'--windows' requires an argument"),
        (["nosuchcommand"], "No such command 'nosuchcommand'"),
    ]
    for args, message in cases:
        code, _, err = run(monkeypatch, capsys, *args)
        assert code == 2, (args, err)
        assert err.startswith("error: ") and message in err, (args, err)
        assert "Traceback" not in err and err.strip().count("\n") == 0, err
    code, out, err = run(monkeypatch, capsys, "axis")  # a bare group shows its commands
    assert code == 2 and "build" in out and "steer" in out and err == ""


def test_generate_steers_a_calibrated_trait_by_its_file_alone(monkeypatch, capsys, folder, tmp_path):
    """`--steer FILE` uses the layer and strength `trait calibrate` stored; a file without them is refused."""
    torch.manual_seed(0)
    meta = _meta()
    meta.mean_norms = {0: 4.0, 1: 5.0, 2: 6.0, 3: 7.0}
    plain = Vectors(range(4), {"evil": torch.randn(4, 64)}, meta).save(tmp_path / "plain.safetensors")
    meta.extra = {"calibration": {"choice": {"layer": 2, "coef": 1.5, "units": "relative"}}}
    calibrated = Vectors(range(4), {"evil": torch.randn(4, 64)}, meta).save(tmp_path / "evil.safetensors")
    base = ["generate", "-m", folder, "-p", "Hello", "--max-tokens", "8", "--dtype", "float32"]
    code, alone, err = run(monkeypatch, capsys, *base, "--steer", calibrated)
    assert code == 0, err
    explicit = run(monkeypatch, capsys, *base, "--steer", f"{calibrated}:2:1.5", "--units", "relative")[1]
    unsteered = run(monkeypatch, capsys, *base)[1]
    assert alone == explicit != unsteered
    default = run(monkeypatch, capsys, *base, "--steer", f"{calibrated}:2:1.5")  # relative is the default unit
    suffixed = run(monkeypatch, capsys, *base, "--steer", f"{calibrated}:2:1.5rel", "--units", "raw")
    assert default[1] == suffixed[1] == explicit
    assert "at layer(s) 2: +1.5 × mean norm (relative)" in default[2]
    raw = run(monkeypatch, capsys, *base, "--steer", f"{calibrated}:2:1.5raw")
    assert raw[0] == 0 and "+1.5 × v (raw)" in raw[2]
    code, _, err = run(monkeypatch, capsys, *base, "--steer", f"{calibrated}:2:4.0x")
    assert code == 2 and "bad strength '4.0x'" in err and err.strip().count("\n") == 0, err
    code, _, err = run(monkeypatch, capsys, *base, "--steer", plain)
    assert code == 2 and "no calibration" in err and err.strip().count("\n") == 0


def _meta(hidden: int = 64):
    from personaxis.vectors import VectorMeta

    return VectorMeta(model_id="other", hidden_size=hidden, n_layers=4, method="mean_diff", points_toward="x")


def test_vector_of_another_model_is_refused(monkeypatch, capsys, folder, tmp_path):
    path = Vectors([1], {"v": torch.randn(1, 32)}, _meta(32)).save(tmp_path / "other.safetensors")
    code, _, err = run(monkeypatch, capsys, "generate", "-m", folder, "-p", "hi", "--steer", f"{path}:1:1")
    assert code == 2 and "hidden size" in err

"""The command line's boundaries: outputs never destroy inputs and are writable, numbers are in range, users' files
and models that cannot be read are one line. Every mistake: exit code 2, one line on stderr, nothing written."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
from cli_runner import invoke as run

from personaxis.vectors import CapConfig, VectorMeta, Vectors

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [{"role": "user", "content": "Tell me about the sea"}, {"role": "assistant", "content": "The waves and the wind."}],
]  # fmt: skip


def _meta(**extra) -> VectorMeta:
    return VectorMeta(model_id="tiny-llama", hidden_size=64, n_layers=4, method="test", points_toward="x",
                      mean_norms={i: 5.0 for i in range(4)}, extra=extra)  # fmt: skip


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    """A chats file, a vectors file, a capping config and a reference .pt: the inputs the writers take."""
    torch.manual_seed(0)
    chats = tmp_path / "pc.jsonl"
    chats.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    vectors = Vectors(range(4), {"evil": torch.randn(4, 64)}, _meta())
    good = vectors.save(tmp_path / "good.safetensors")
    cap = CapConfig.from_vectors(vectors, {1: 0.5, 2: 0.5}).save(tmp_path / "cap.safetensors")
    axis = tmp_path / "assistant_axis.pt"
    torch.save(torch.randn(4, 64), axis)
    return {"chats": chats, "good": good, "cap": cap, "axis": axis}


def _refused(monkeypatch, capsys, *args, message: str) -> str:
    code, _, err = run(monkeypatch, capsys, *args)
    assert code == 2, (args, err)
    assert err.startswith("error: ") and err.strip().count("\n") == 0 and "Traceback" not in err, err
    assert message in err, (args, err)
    return err


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- an output that is an input -----------------------------------------------------------------------------------


def test_no_command_writes_over_its_input(monkeypatch, capsys, files, tmp_path, folder, trait_file):
    (tmp_path / "link.jsonl").symlink_to(files["chats"])
    os.link(files["good"], tmp_path / "hard.safetensors")
    before = _snapshot(tmp_path)
    chats, good = files["chats"], files["good"]
    relative = Path(os.path.relpath(good))
    roundabout = tmp_path / "sub" / ".." / "pc.jsonl"
    cases = [
        ["extract", "-m", folder, "--chats", chats, "--out", chats],
        ["extract", "-m", folder, "--chats", chats, "--out", tmp_path / "link.jsonl"],  # a symlink to it
        ["extract", "-m", folder, "--chats", chats, "--out", roundabout],
        ["extract", "-m", folder, "--diff", good, chats, "--out", chats],  # the second of --diff
        ["export-gguf", good, "--out", good, "--force"],
        ["export-gguf", relative, "--out", good],
        ["export-gguf", tmp_path / "hard.safetensors", "--out", good, "--force"],  # a hard link
        ["import", files["axis"], "--out", files["axis"]],
        ["screen", chats, "--trait-vectors", good, "-m", folder, "--out", chats],
        ["finetune", chats, "-m", folder, "--out", chats],
        ["finetune-shift", "--base", folder, "--tuned", folder, "--trait-vectors", good, "--trait", trait_file,
         "--out", trait_file],
        ["trait", "calibrate", tmp_path / "calibration.json", "-m", folder, "-v", good, "--run", tmp_path,
         "--any-counts"],
    ]  # fmt: skip
    (tmp_path / "calibration.json").write_text(trait_file.read_text())  # a trait file where calibrate writes
    before = _snapshot(tmp_path)
    for args in cases:
        _refused(monkeypatch, capsys, *args, message="is the input")
    assert _snapshot(tmp_path) == before  # nothing written, nothing changed


# -- an output that cannot be written -------------------------------------------------------------------------------


def test_an_unwritable_output_is_refused_before_any_work(monkeypatch, capsys, files, tmp_path, folder):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    before = _snapshot(tmp_path)
    cases = [
        (["export-gguf", files["good"], "--out", "/proc/o.gguf"], "cannot write /proc/o.gguf: the folder /proc"),
        (["export-gguf", files["good"], "--out", "/sys/o.gguf"], "the folder /sys is not writable"),
        (["extract", "-m", folder, "--chats", files["chats"], "--out", "/proc/x/y.safetensors"], "/proc"),
        (["import", files["axis"], "--out", "/sys/a.safetensors"], "is not writable"),
        (["import", files["axis"], "--out", blocker / "a.safetensors"], "is a file, not a folder"),
        (["import", files["axis"], "--out", blocker / "new" / "a.safetensors"], f"cannot be created: {blocker}"),
        (["import", files["axis"], "--out", tmp_path], "is a folder, expected a file path"),
        (["finetune", files["chats"], "-m", folder, "--out", blocker], "is a file, not a folder"),
        (["trait", "report", blocker], "is a file, not a folder"),
    ]
    for args, message in cases:
        _refused(monkeypatch, capsys, *args, message=message)
    assert _snapshot(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused(monkeypatch, capsys, files, tmp_path, folder):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        for args in (
            ["extract", "-m", folder, "--chats", files["chats"], "--out", locked / "x.safetensors"],
            ["import", files["axis"], "--out", locked / "a.safetensors"],
        ):
            _refused(monkeypatch, capsys, *args, message="is not writable")
    finally:
        locked.chmod(0o755)


def test_a_missing_output_folder_is_created(monkeypatch, capsys, files, tmp_path):
    out = tmp_path / "new" / "deeper" / "axis.safetensors"
    code, _, err = run(monkeypatch, capsys, "import", files["axis"], "--out", out)
    assert code == 0 and out.is_file(), err


def test_an_existing_output_needs_force(monkeypatch, capsys, files, tmp_path, folder):
    old = tmp_path / "old.bin"
    old.write_bytes(b"precious")
    for args in (
        ["extract", "-m", folder, "--chats", files["chats"], "--out", old],
        ["import", files["axis"], "--out", old],
        ["export-gguf", files["good"], "--out", old],
    ):
        _refused(monkeypatch, capsys, *args, message=f"{old} exists: pass --force to replace it")
        assert old.read_bytes() == b"precious"
    code, _, err = run(monkeypatch, capsys, "import", files["axis"], "--out", old, "--force")
    assert code == 0 and Vectors.load(old).names == ["axis"], err
    code, _, err = run(monkeypatch, capsys, "export-gguf", files["good"], "--out", old, "--force")
    assert code == 0 and old.read_bytes()[:4] == b"GGUF", err


# -- numbers --------------------------------------------------------------------------------------------------------


def test_numbers_out_of_range_are_refused(monkeypatch, capsys, files, tmp_path, folder, trait_file):
    gguf = tmp_path / "o.gguf"
    gen = ["generate", "-m", folder, "-p", "hi"]
    extract = ["extract", "-m", folder, "--chats", files["chats"], "--out", tmp_path / "x.safetensors"]
    cases = [
        ([*gen, "--seed", str(2**64)], "Invalid value for '--seed'"),
        ([*gen, "--seed", "-1"], "Invalid value for '--seed'"),
        ([*gen, "--temperature", "nan"], "Invalid value for '--temperature': nan is not a number"),
        ([*gen, "--temperature", "inf"], "Invalid value for '--temperature': inf is not finite"),
        ([*gen, "--temperature", "-0.5"], "-0.5 is below the smallest allowed value, 0"),
        ([*gen, "--max-tokens", "0"], "Invalid value for '--max-tokens'"),
        ([*extract, "--batch-size", "0"], "Invalid value for '--batch-size'"),
        ([*extract, "--batch-size", "-1"], "Invalid value for '--batch-size'"),
        (["export-gguf", files["good"], "--out", gguf, "--scale", "1e39"], "is not finite in float32"),
        (["export-gguf", files["good"], "--out", gguf, "--scale", "nan"], "nan is not a number"),
        (["export-gguf", files["good"], "--out", gguf, "--strength", "1e39", "--units", "raw"], "not finite"),
        (["export-gguf", files["good"], "--out", gguf, "--strength", "nan"], "it must be finite"),
        (["trait", "calibrate", trait_file, "-m", folder, "-v", files["good"], "--coefs", "0.1,nan", "--any-counts"],
         "nan is not a finite number"),
        (["trait", "calibrate", trait_file, "-m", folder, "-v", files["good"], "--alpha", "nan"],
         "Invalid value for '--alpha': nan is not a number"),
        (["finetune", files["chats"], "-m", folder, "--out", tmp_path / "a", "--lora-dropout", "1.5"],
         "1.5 is above the largest allowed value, 1"),
        (["trait", "extract", trait_file, "-m", folder, "--min-gap", "nan"], "Invalid value for '--min-gap': nan"),
        (["screen", files["chats"], "--trait-vectors", files["good"], "-m", folder, "--layer", "-1"],
         "Invalid value for '--layer'"),
        (["finetune", files["chats"], "-m", folder, "--out", tmp_path / "a", "--lora-dropout", "nan"],
         "nan is not a number"),
        (["finetune", files["chats"], "-m", folder, "--out", tmp_path / "a", "--seed", str(2**40)],
         "Invalid value for '--seed'"),
    ]  # fmt: skip
    before = _snapshot(tmp_path)
    for args, message in cases:
        _refused(monkeypatch, capsys, *args, message=message)
    assert _snapshot(tmp_path) == before  # no file full of inf


# -- --steer FILE[:LAYERS[:COEF]] -------------------------------------------------------------------------------------


def test_steer_specs_parse_from_the_right(tmp_path, monkeypatch):
    from personaxis.cli.main import _parse_steer
    from personaxis.errors import PersonaxisError

    monkeypatch.chdir(tmp_path)
    Path("v.safetensors").write_bytes(b"")
    Path("odd:name.safetensors").write_bytes(b"")  # a file whose name holds a colon
    cases = {
        "v.safetensors": ("v.safetensors", None, None),
        "v.safetensors:14:0.15": ("v.safetensors", "14", (0.15, "relative")),
        "v.safetensors:10:14:0.15": ("v.safetensors", "10:14", (0.15, "relative")),
        "v.safetensors:10:14:4raw": ("v.safetensors", "10:14", (4.0, "raw")),
        "v.safetensors::14:0.1": ("v.safetensors", ":14", (0.1, "relative")),
        "v.safetensors:-3:-1:0.1": ("v.safetensors", "-3:-1", (0.1, "relative")),
        "v.safetensors:3,5:0.2rel": ("v.safetensors", "3,5", (0.2, "relative")),
        "v.safetensors:3,5": ("v.safetensors", "3,5", None),  # the calibrated strength at other layers
        "v.safetensors:all:0.1": ("v.safetensors", "all", (0.1, "relative")),
        "odd:name.safetensors": ("odd:name.safetensors", None, None),
        "odd:name.safetensors:2:0.5": ("odd:name.safetensors", "2", (0.5, "relative")),
        "odd:name.safetensors:1:3:0.5": ("odd:name.safetensors", "1:3", (0.5, "relative")),
    }
    for spec, (file, layers, strength) in cases.items():
        assert _parse_steer(spec, "relative") == (Path(file), layers, strength), spec
    for spec, message in {
        "missing.safetensors:10:14:0.15": "no such file 'missing.safetensors'; use FILE:LAYERS:COEF",
        "nocolons": "no such file 'nocolons'",
        "v.safetensors:x:0.1": "the layers 'x' are not i or i,j",
        "v.safetensors:1:x:0.1": "the layers '1:x' are not a:b",
        "v.safetensors:1:0.1x": "bad strength '0.1x'",
        "v.safetensors:": "the layers '' are not i or i,j",
    }.items():
        with pytest.raises(PersonaxisError, match=message.replace("(", r"\(")):
            _parse_steer(spec, "relative")


def test_every_documented_steer_form_runs(monkeypatch, capsys, folder, tmp_path):
    """README's FILE:LAYER:COEF, the help's ranges and lists, the calibrated file alone and FILE:LAYERS."""
    torch.manual_seed(0)
    meta = _meta(calibration={"choice": {"layer": 2, "coef": 3.0, "units": "relative"}})
    path = Vectors(range(4), {"evil": torch.randn(4, 64)}, meta).save(tmp_path / "evil.safetensors")
    base = ["generate", "-m", folder, "-p", "Hello", "--max-tokens", "6", "--dtype", "float32", "--project", path]

    def reply(*steer: str) -> tuple[str, str]:
        """What was steered (the command's line saying so) and the reply with its projections."""
        args = [a for s in steer for a in ("--steer", s)]
        code, out, err = run(monkeypatch, capsys, *base, *args)
        assert code == 0, (steer, err)
        said = [line[line.index("at layer") :] for line in err.splitlines() if line.startswith("steering with")]
        return " | ".join(said), out + "".join(line for line in err.splitlines() if "mean" in line)

    unsteered = reply()
    assert reply(f"{path}:1:3:3") == reply(f"{path}:1,2:3")  # a:b excludes b
    assert reply(f"{path}:1:3:3")[0] == "at layer(s) 1,2: +3 × mean norm (relative)"
    assert reply(f"{path}:2:3") == reply(f"{path}:2")  # the calibrated strength at the layer given
    assert reply(f"{path}:2")[0] == reply(str(path))[0] == "at layer(s) 2: +3 × mean norm (relative)"
    assert reply(f"{path}:1,2") == reply(f"{path}:1:3:3.0rel")  # the calibrated strength at the layers given
    assert reply(f"{path}::2:0.4raw")[0] == "at layer(s) 0,1: +0.4 × v (raw)"
    assert reply(f"{path}:1:3:3")[1] != unsteered[1] and reply(f"{path}:2")[1] != unsteered[1]
    code, _, err = run(monkeypatch, capsys, *base, "--steer", f"{path}:2:9", "--steer", f"{path}:7:0.1")
    assert code == 2 and "out of range" in err and err.count("error") == 1, err


# -- models and users' files that cannot be read --------------------------------------------------------------------


def _gguf(path: Path, arch: str, tokenizer: bool = False) -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    if tokenizer:
        writer.add_tokenizer_model("llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_that_is_no_model_is_one_line(monkeypatch, capsys, tmp_path, files):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_text("hello")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00\x01")
    control = tmp_path / "cv.gguf"
    assert run(monkeypatch, capsys, "export-gguf", files["good"], "--out", control)[0] == 0
    cases = [
        (garbage, "garbage.gguf is not a GGUF file (it does not start with the GGUF magic bytes)"),
        (truncated, "truncated.gguf is not a readable GGUF file"),
        (_gguf(tmp_path / "notok.gguf", "llama"), "notok.gguf holds no tokenizer"),
        (control, "cv.gguf is a llama.cpp control vector, not a model"),
        (_gguf(tmp_path / "empty.gguf", "llama", tokenizer=True), "cannot load GGUF model"),
    ]
    for path, message in cases:
        _refused(monkeypatch, capsys, "info", path, message=message)
        _refused(monkeypatch, capsys, "generate", "-m", path, "-p", "hi", message=message)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"messages": "\xff"}\n', "line 1, column 15 (byte 0xff): not UTF-8 text"),
        (b"[" * 100_000, "line 1, column 100000: JSON nested too deeply to read"),
        (b'{"messages": ' + b"9" * 5000 + b"}", "line 1, column 14: an integer of 5000 digits"),
    ],
)
def test_unreadable_users_files_are_one_line(monkeypatch, capsys, tmp_path, folder, files, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    out = tmp_path / "x.safetensors"
    _refused(monkeypatch, capsys, "extract", "-m", folder, "--chats", bad, "--out", out, message=f"{bad} {message}")
    _refused(monkeypatch, capsys, "monitor", "-m", folder, "-v", files["good"], "--chat", bad, message=message)
    _refused(monkeypatch, capsys, "finetune", bad, "-m", folder, "--out", tmp_path / "a", message=message)
    with socket.socket() as s:  # serve reads --space before it loads the model
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _refused(monkeypatch, capsys, "serve", "--space", bad, "--port", port, message=f"{bad}: {message}")
    assert not out.exists()


# -- warnings -------------------------------------------------------------------------------------------------------


def test_warnings_are_one_clean_line(monkeypatch, capsys, tmp_path):
    """Warnings become `warning: ...`, once each; the deprecation notes libraries address to developers do not
    reach the user."""
    import numpy as np
    from gguf import GGUFWriter

    import personaxis.cli.main as cli

    path = tmp_path / "cv.gguf"
    writer = GGUFWriter(str(path), "controlvector")
    writer.add_tensor("direction.1", np.ones(4, dtype=np.float32))
    writer.add_tensor("direction.2", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    code, _, err = run(monkeypatch, capsys, "import", path, "--out", tmp_path / "cv.safetensors")
    assert code == 0
    assert err.strip() == f"warning: {path}: all-zero directions at layers [2] left out", err
    show = cli._warning_printer()
    show("something deprecated", DeprecationWarning, "/site-packages/transformers/a.py", 1)
    show("a user warning\n over two lines", UserWarning, "/site-packages/torch/x.py", 2)
    show("a user warning over two lines", UserWarning, "/site-packages/torch/y.py", 3)
    show("ours, deprecated", FutureWarning, "/src/personaxis/cli/main.py", 4)
    assert capsys.readouterr().err == "warning: a user warning over two lines\nwarning: ours, deprecated\n"


def test_known_noisy_warnings_are_silenced(monkeypatch, capsys, tmp_path):
    path = tmp_path / "p4.pt"
    torch.save({"axis": torch.ones(4, 8)}, path, pickle_protocol=4)
    err = _refused(monkeypatch, capsys, "import", path, "--out", tmp_path / "a.safetensors", message="pickled with")
    assert "warning:" not in err and "Detected pickle protocol" not in err

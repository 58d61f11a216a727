"""The axis commands end to end on a tiny model saved to a folder, and their one-line answers to bad input."""

import json

import pytest
import torch
from axis.axis_helpers import run_cli
from tiny import build_tokenizer, tiny_llama

from personaxis.axis.library import load_roles
from personaxis.vectors import CapConfig, Vectors


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-model")
    tokenizer = build_tokenizer()
    tiny_llama(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def run(folder, tmp_path_factory):
    """An unjudged build (a tiny random model cannot judge), shared by the commands that read a build."""
    path = tmp_path_factory.mktemp("axis-run")
    mp = pytest.MonkeyPatch()
    capsys = _Capture()
    code, out, err = run_cli(
        mp,
        capsys,
        "axis",
        "build",
        "-m",
        folder,
        "--roles",
        "3",
        "--questions",
        "2",
        "--max-tokens",
        "3",
        "--judge",
        "none",
        "--min-count",
        "1",
        "--traits",
        "1",
        "--run",
        path,
        "--dtype",
        "float32",
    )
    mp.undo()
    assert code == 0, err
    return path


class _Capture:
    """capsys for a module-scoped fixture: the CLI's rich consoles write to sys.stdout/stderr at call time."""

    def readouterr(self):
        return type("Out", (), {"out": "", "err": ""})()


def test_build_writes_artifacts(run):
    summary = json.loads((run / "summary.json").read_text())
    assert len(summary["roles"]["kept"]) == 3 and "unjudged" in summary["judge"]["mode"]
    assert Vectors.load(run / "artifacts" / "axis.safetensors").names == ["axis"]


def test_report(monkeypatch, capsys, run):
    code, out, err = run_cli(monkeypatch, capsys, "axis", "report", run)
    assert code == 0, err
    text = (run / "report.md").read_text()
    assert "## Persona space" in text and "plots/pca_scatter.png" in text


def test_drift(monkeypatch, capsys, folder, run):
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "drift",
        "-m",
        folder,
        "--axis",
        run / "artifacts" / "axis.safetensors",
        "--per-domain",
        "1",
        "--max-tokens",
        "2",
        "--dtype",
        "float32",
    )
    assert code == 0, err
    drift = json.loads((run / "drift.json").read_text())
    assert {c["domain"] for c in drift["conversations"]} == {"coding", "writing", "therapy", "philosophy"}
    assert "welch_p" in drift["stats"]["per_conversation"] and (run / "plots" / "drift.png").is_file()


def test_calibrate_then_replay_then_steer(monkeypatch, capsys, folder, run, tmp_path):
    axis = run / "artifacts" / "axis.safetensors"
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "cap",
        "calibrate",
        "-m",
        folder,
        "--axis",
        axis,
        "--run",
        run,
        "--percentile",
        "50",
        "--layers",
        "2:4",
    )
    assert code == 0, err
    config = CapConfig.load(run / "artifacts" / "cap.safetensors")
    assert config.kind == "floor" and config.layers == [2, 3] and config.meta.percentile == 50.0
    calibration = json.loads((run / "calibration.json").read_text())
    assert set(calibration["tau"]) == {"1", "25", "50", "75"}
    chats = tmp_path / "chat.jsonl"
    chats.write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "Hello there"},
                    {"role": "assistant", "content": "Hi"},
                    {"role": "user", "content": "Tell me about the sea"},
                ]
            }
        )
        + "\n"
    )
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "cap",
        "replay",
        chats,
        "-m",
        folder,
        "--config",
        run / "artifacts" / "cap.safetensors",
        "--axis",
        axis,
        "--max-tokens",
        "3",
        "--dtype",
        "float32",
    )
    assert code == 0, err
    replayed = json.loads((tmp_path / "chat.replay.json").read_text())
    assert len(replayed["chats"][0]["capped"]) == 2
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "axis",
        "steer",
        "-m",
        folder,
        "--axis",
        axis,
        "--coef",
        "-2",
        "--prompt",
        "Hello there",
        "--baseline",
        "--max-tokens",
        "3",
        "--dtype",
        "float32",
    )
    assert code == 0, err
    assert "unsteered" in err and "coef -2" in err


def test_sweep_small(monkeypatch, capsys, folder, run):
    axis = run / "artifacts" / "axis.safetensors"
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "cap",
        "sweep",
        "-m",
        folder,
        "--axis",
        axis,
        "--run",
        run,
        "--windows",
        "2",
        "--positions",
        "1",
        "--percentiles",
        "25",
        "--jailbreaks",
        "2",
        "--capability",
        "2",
        "--max-tokens",
        "2",
        "--dtype",
        "float32",
    )
    assert code == 0, err
    sweep = json.loads((run / "sweep.json").read_text())
    assert sweep["settings"]["jailbreaks"] == 2 and len(sweep["rows"]) == 1
    assert "Pareto front" in out


def bad(monkeypatch, capsys, *args):
    code, out, err = run_cli(monkeypatch, capsys, *args)
    assert code == 2, (out, err)
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    return err


def test_bad_inputs_are_one_line_errors(monkeypatch, capsys, folder, run, tmp_path):
    axis = run / "artifacts" / "axis.safetensors"
    assert "between 0 and 100" in bad(
        monkeypatch, capsys, "cap", "calibrate", "-m", folder, "--axis", axis, "--run", run, "--percentile", "101"
    )
    assert "between 0 and 100" in bad(
        monkeypatch, capsys, "cap", "sweep", "-m", folder, "--axis", axis, "--run", run, "--percentiles", "25,-3"
    )
    assert "unknown domain" in bad(monkeypatch, capsys, "drift", "-m", folder, "--axis", axis, "--domain", "cooking")
    assert "needs a judge" in bad(
        monkeypatch, capsys, "cap", "sweep", "-m", folder, "--axis", axis, "--run", run, "--judge", "none"
    )
    roles = tmp_path / "roles.json"
    broken = [r.model_dump(mode="json") for r in load_roles()[:2]]
    del broken[1]["prompts"]
    roles.write_text(json.dumps(broken))
    message = bad(monkeypatch, capsys, "axis", "build", "-m", folder, "--roles-file", roles, "--run", tmp_path / "r")
    assert "is missing field 'prompts'" in message
    assert "--roles must be" in bad(monkeypatch, capsys, "axis", "build", "-m", folder, "--roles", "many")
    # a cap config made for another hidden size
    other = tmp_path / "other.safetensors"
    cap = tmp_path / "cap.safetensors"
    code, _, err = run_cli(
        monkeypatch, capsys, "cap", "calibrate", "-m", folder, "--axis", axis, "--run", run, "--out", cap
    )
    assert code == 0, err
    config = CapConfig.load(cap)
    config.meta.hidden_size = 32
    CapConfig(config.layers, config.directions[:, :32], config.tau, "floor", config.meta).save(other)
    chats = tmp_path / "chat.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "Hello there"}]}) + "\n")
    assert "hidden size" in bad(monkeypatch, capsys, "cap", "replay", chats, "-m", folder, "--config", other)
    no_user = tmp_path / "system_only.jsonl"
    no_user.write_text(json.dumps({"messages": [{"role": "system", "content": "You are a pirate."}]}) + "\n")
    assert "no user turn" in bad(
        monkeypatch, capsys, "cap", "replay", no_user, "-m", folder, "--config", cap, "--dtype", "float32"
    )
    assert "was built for" in bad(
        monkeypatch, capsys, "cap", "calibrate", "-m", "another-model", "--axis", axis, "--run", run
    )

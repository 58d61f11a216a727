"""The axis commands end to end on a tiny model saved to a folder, and their one-line answers to bad input."""

import json
import shutil

import pytest
import torch
from cli_runner import invoke as run_cli

import personaxis.backends.runs
from personaxis.axis.library import load_roles
from personaxis.store import RunStore
from personaxis.vectors import CapConfig, Vectors


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _NoCapture:
    """Stands in for capsys in a module-scoped fixture (output then goes to pytest's own capture)."""

    def readouterr(self):
        return type("Out", (), {"out": "", "err": ""})()


def cli(monkeypatch, capsys, command: str, **paths):
    """Run `personaxis COMMAND`, the command written as on a shell with {name} for the paths given."""
    return run_cli(monkeypatch, capsys, *command.format(**paths).split())


@pytest.fixture(scope="module")
def run(folder, tmp_path_factory):
    """An unjudged build (a tiny random model cannot judge), shared by the commands that read a build."""
    path = tmp_path_factory.mktemp("axis-run")
    with pytest.MonkeyPatch.context() as mp:
        code, _, err = cli(
            mp,
            _NoCapture(),
            "axis build -m {m} --roles 3 --questions 2 --max-tokens 3 --judge none "
            "--min-count 1 --traits 1 --run {run} --dtype float32",
            m=folder,
            run=path,
        )
    assert code == 0, err
    return path


def test_build_writes_artifacts(run):
    summary = json.loads((run / "summary.json").read_text())
    assert len(summary["roles"]["kept"]) == 3 and "unjudged" in summary["judge"]["mode"]
    assert Vectors.load(run / "artifacts" / "axis.safetensors").names == ["axis"]
    assert {"points", "axis_x", "layer"} <= set(json.loads((run / "space.json").read_text()))
    report = (run / "report.md").read_text()
    assert "## Persona space" in report  # the build writes its report itself
    found = summary["ai_self_reference"]
    assert f"{found['replies']} of {found['of']} role replies" in report and found["of"] == 30


def test_a_screened_build_of_the_same_rollouts(monkeypatch, capsys, folder, run, tmp_path):
    shutil.copytree(run, tmp_path / "screened")
    generated = []
    original = personaxis.backends.runs.generate_batch
    monkeypatch.setattr(
        personaxis.backends.runs,
        "generate_batch",
        lambda m, prompts, *a, **k: generated.extend(prompts) or original(m, prompts, *a, **k),
    )
    code, _, err = cli(
        monkeypatch,
        capsys,
        "axis build -m {m} --roles 3 --questions 2 --max-tokens 3 --judge none --screen --min-count 1 --traits 1 "
        "--run {run} --dtype float32",
        m=folder,
        run=tmp_path / "screened",
    )
    summary = json.loads((tmp_path / "screened" / "summary.json").read_text())
    assert summary["judge"]["mode"].startswith("screened") and summary["counts"]["rollouts"] > 0
    assert code == 0, err
    assert generated == []  # the rollouts of the unjudged build are reused


def test_report(monkeypatch, capsys, run):
    code, _, err = cli(monkeypatch, capsys, "axis report {run}", run=run)
    assert code == 0, err
    text = (run / "report.md").read_text()
    assert "## Persona space" in text and "plots/pca_scatter.png" in text


def test_stability_redoes_the_analysis_on_subsets_and_joins_the_report(monkeypatch, capsys, run):
    code, out, err = cli(monkeypatch, capsys, "axis stability {run} --sizes 2,3 --repeats 4", run=run)
    assert code == 0, err
    result = json.loads((run / "stability.json").read_text())
    assert [(r["roles"], r["subsets"]) for r in result["rows"]] == [(2, 4), (3, 1)]
    summary = json.loads((run / "summary.json").read_text())
    assert result["rows"][-1]["cosine_mean"] == pytest.approx(summary["axis"]["pc1_cosine_at_target"], abs=1e-5)
    assert result["rows"][-1]["pc1_variance_mean"] == pytest.approx(summary["pca"]["pc1_variance"], abs=1e-5)
    assert (run / "plots" / "stability.png").stat().st_size > 0
    code, _, err = cli(monkeypatch, capsys, "axis report {run}", run=run)
    assert code == 0, err
    report = (run / "report.md").read_text()
    assert "## Role-count stability" in report
    header = next(line for line in report.splitlines() if line.startswith("| roles | subsets"))
    assert header.replace("\\|", "").count("|") == 9  # 8 columns: the pipes of |cos| are escaped


def test_compare_a_build_with_itself_and_with_its_mirror(monkeypatch, capsys, run, tmp_path):
    code, _, err = cli(monkeypatch, capsys, "axis compare {run} {run} --out {tmp}/same.json", run=run, tmp=tmp_path)
    assert code == 0, err
    same = json.loads((tmp_path / "same.json").read_text())
    assert same["pc1"]["roles"] == 3 and same["pc1"]["pearson_r"] == pytest.approx(1.0)
    assert same["axis"]["pearson_r"] == pytest.approx(1.0) and (tmp_path / "same.png").stat().st_size > 0
    mirror = tmp_path / "mirror"
    shutil.copytree(run, mirror)
    summary = json.loads((mirror / "summary.json").read_text())
    coords = summary["pca"]["role_coordinates"]
    summary["pca"]["role_coordinates"] = {role: [-c for c in xs] for role, xs in coords.items()}
    (mirror / "summary.json").write_text(json.dumps(summary))
    code, _, err = cli(monkeypatch, capsys, "axis compare {run} {m}", run=run, m=mirror)
    assert code == 0, err
    assert json.loads((run / "compare_mirror.json").read_text())["pc1"]["pearson_r"] == pytest.approx(-1.0)


def test_drift(monkeypatch, capsys, folder, run):
    axis = run / "artifacts" / "axis.safetensors"
    code, out, err = cli(
        monkeypatch,
        capsys,
        "drift -m {m} --axis {axis} --per-domain 1 --max-turns 2 --max-tokens 2 --dtype float32",
        m=folder,
        axis=axis,
    )
    assert code == 0, err
    drift = json.loads((run / "drift.json").read_text())
    assert {c["domain"] for c in drift["conversations"]} == {"coding", "writing", "therapy", "philosophy"}
    assert all(len(c["projections"]) == 2 for c in drift["conversations"])
    assert "welch_p" in drift["stats"]["per_conversation"] and (run / "plots" / "drift.png").is_file()
    assert "Welch p=" in out
    assert f"{drift['stats']['as_ai']['turns']} of 8 replies speak as an AI" in out.replace("\n", " ")


def test_calibrate_then_replay_then_steer(monkeypatch, capsys, folder, run, tmp_path):
    axis = run / "artifacts" / "axis.safetensors"
    code, _, err = cli(
        monkeypatch,
        capsys,
        "cap calibrate -m {m} --axis {axis} --run {run} --percentile 50 --layers 2:4",
        m=folder,
        axis=axis,
        run=run,
    )
    assert code == 0, err
    config = CapConfig.load(run / "artifacts" / "cap.safetensors")
    assert config.kind == "floor" and config.layers == [2, 3] and config.meta.percentile == 50.0
    calibration = json.loads((run / "calibration.json").read_text())
    assert set(calibration["tau"]) == {"1", "25", "50", "75"}
    chats = tmp_path / "chat.jsonl"
    turns = [("user", "Hello there"), ("assistant", "Hi"), ("user", "Tell me about the sea")]
    chats.write_text(json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}) + "\n")
    code, _, err = cli(
        monkeypatch,
        capsys,
        "cap replay {chats} -m {m} --config {cap} --axis {axis} --max-tokens 3 --dtype float32",
        chats=chats,
        m=folder,
        cap=run / "artifacts" / "cap.safetensors",
        axis=axis,
    )
    assert code == 0, err
    replayed = json.loads((tmp_path / "chat.replay.json").read_text())
    assert len(replayed["chats"][0]["capped"]) == 2 and (tmp_path / "chat.replay.png").is_file()
    code, _, err = cli(
        monkeypatch,
        capsys,
        "axis steer -m {m} --axis {axis} --coef -2 --prompt Hello --baseline --max-tokens 3 --dtype float32",
        m=folder,
        axis=axis,
    )
    assert code == 0, err
    assert "unsteered" in err and "coef -2" in err


def test_sweep_small(monkeypatch, capsys, folder, run):
    def small_sweep(options):
        command = "cap sweep -m {m} --axis {axis} --run {run} --windows 2 --positions 1 --percentiles 25 "
        command += "--jailbreaks 2 --max-tokens 2 --dtype float32 --screen " + options
        return cli(monkeypatch, capsys, command, m=folder, axis=run / "artifacts" / "axis.safetensors", run=run)

    code, out, err = small_sweep("--capability 2 --capability-tokens 3")
    assert code == 0, err
    sweep = json.loads((run / "sweep.json").read_text())
    assert sweep["settings"]["jailbreaks"] == 2 and len(sweep["rows"]) == 1 and sweep["settings"]["screen"]
    assert all(0 <= r["refused"] <= 2 for r in [sweep["baseline"], *sweep["rows"]])
    for r in [sweep["baseline"], *sweep["rows"]]:  # the two items, tallied by kind
        tallies = r["capability_by_kind"].values()
        assert (sum(t["correct"] for t in tallies), sum(t["graded"] for t in tallies)) == (r["correct"], 2)
    assert "Pareto front" in out and "refusals" in out and "McNemar p" in err
    assert "a low projection marks harmful replies" in " ".join(err.split())  # unwrapped
    assert err.count("sweep (0 done before): 4/4 (100%)") == 2  # progress (on stderr) of no cap and of the one setting
    assert err.count("judging jailbreak replies: 2/2 (100%)") == 2  # a tiny random model's 2 tokens never refuse
    code, _, err = cli(monkeypatch, capsys, "axis report {run}", run=run)
    assert code == 0, err
    report = (run / "report.md").read_text()
    assert "replies opening with a refusal screened" in report and "| refusals |" in report
    assert "(2 tokens, 3 for capability, judge" in report
    assert "exact McNemar" in report and "capability ↓/↑ (p)" in report
    assert "Capability by kind of item (correct/graded):" in report
    groups = sweep["baseline"]["projection_by_outcome"]["groups"]
    assert sum(g["n"] for g in groups.values()) == 2 + sweep["baseline"]["judged"]  # capability and judged replies
    assert f"Without a cap at layer {sweep['settings']['layer']}: mean projection of harmful" in report
    by_layer = sweep["baseline"]["projection_by_layer"]
    assert len(by_layer) == len(Vectors.load(run / "artifacts" / "axis.safetensors").layers)
    assert "Without a cap, by layer, a low projection marks harmful replies (AUROC)" in report
    assert (run / "plots" / "sweep_layers.png").stat().st_size > 0 and "(plots/sweep_layers.png)" in report
    code, _, err = small_sweep("--capability 1")  # by default the capability replies get room for worked sums
    assert code == 0, err
    assert json.loads((run / "sweep.json").read_text())["settings"]["capability_tokens"] == 256
    lengths = [r.data["n_tokens"] for _, r in RunStore(run).items("sweep", tensors=False)]
    assert max(lengths) > 3


def bad(monkeypatch, capsys, command, **paths):
    code, out, err = cli(monkeypatch, capsys, command, **paths)
    assert code == 2, (out, err)
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    return err


def test_bad_inputs_are_one_line_errors(monkeypatch, capsys, folder, run, tmp_path):
    paths = dict(m=folder, axis=run / "artifacts" / "axis.safetensors", run=run, tmp=tmp_path)
    assert "between 0 and 100" in bad(
        monkeypatch, capsys, "cap calibrate -m {m} --axis {axis} --run {run} --percentile 101", **paths
    )
    assert "between 0 and 100" in bad(
        monkeypatch, capsys, "cap sweep -m {m} --axis {axis} --run {run} --percentiles 25,-3", **paths
    )
    assert "unknown domain" in bad(monkeypatch, capsys, "drift -m {m} --axis {axis} --domain cooking", **paths)
    assert "--max-turns must be at least 1" in bad(
        monkeypatch, capsys, "drift -m {m} --axis {axis} --max-turns 0", **paths
    )
    assert "--alpha must be above 0 and at most 1, got 0" in bad(
        monkeypatch, capsys, "cap sweep -m {m} --axis {axis} --run {run} --alpha 0", **paths
    )
    assert "needs a judge" in bad(
        monkeypatch, capsys, "cap sweep -m {m} --axis {axis} --run {run} --judge none", **paths
    )
    assert "--capability-tokens must be at least 1, got 0" in bad(
        monkeypatch, capsys, "cap sweep -m {m} --axis {axis} --run {run} --capability-tokens 0", **paths
    )
    assert "was built for" in bad(
        monkeypatch, capsys, "cap calibrate -m another-model --axis {axis} --run {run}", **paths
    )
    assert "--roles must be" in bad(monkeypatch, capsys, "axis build -m {m} --roles many", **paths)
    assert "between 2 and 3 roles" in bad(monkeypatch, capsys, "axis stability {run} --sizes 2,9", **paths)
    assert "not in the build" in bad(monkeypatch, capsys, "axis stability {run} --layer 99", **paths)
    assert "has no summary.json" in bad(monkeypatch, capsys, "axis stability {tmp}", **paths)
    assert "has no summary.json" in bad(monkeypatch, capsys, "axis compare {run} {tmp}", **paths)
    assert "use it with --executor local" in bad(
        monkeypatch, capsys, "axis build -m no/such/model --executor ray --generator openai --base-url http://h/v1"
    )

    broken = [r.model_dump(mode="json") for r in load_roles()[:2]]
    del broken[1]["prompts"]
    (tmp_path / "roles.json").write_text(json.dumps(broken))
    message = bad(monkeypatch, capsys, "axis build -m {m} --roles-file {tmp}/roles.json --run {tmp}/r", **paths)
    assert "is missing field 'prompts'" in message

    # a cap config made for another hidden size
    code, _, err = cli(
        monkeypatch, capsys, "cap calibrate -m {m} --axis {axis} --run {run} --out {tmp}/cap.safetensors", **paths
    )
    assert code == 0, err
    config = CapConfig.load(tmp_path / "cap.safetensors")
    config.meta.hidden_size = 32
    CapConfig(config.layers, config.directions[:, :32], config.tau, "floor", config.meta).save(
        tmp_path / "o.safetensors"
    )
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "Hello there"}]}) + "\n")
    assert "hidden size" in bad(
        monkeypatch, capsys, "cap replay {tmp}/chat.jsonl -m {m} --config {tmp}/o.safetensors", **paths
    )
    (tmp_path / "system.jsonl").write_text(json.dumps({"messages": [{"role": "system", "content": "Be a pirate."}]}))
    assert "no user turn" in bad(
        monkeypatch,
        capsys,
        "cap replay {tmp}/system.jsonl -m {m} --config {tmp}/cap.safetensors --dtype float32",
        **paths,
    )

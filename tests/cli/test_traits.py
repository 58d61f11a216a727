"""The trait commands end to end on a tiny model saved to a folder, judged by a fake OpenAI-compatible server."""

import json

import pytest

from personaxis.traits import files
from personaxis.vectors import Vectors


def test_extract_calibrate_monitor_report(cli, folder, trait_file, fake_openai, tmp_path):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    judge = f"openai:judge@{fake_openai.url}"
    common = ["--model", folder, "--judge", judge, "--max-tokens", "4", "--dtype", "float32", "--any-counts"]
    code, out, err = cli("trait", "extract", trait_file, *common, "--run", run, "--pos-min", "0", "--neg-max", "101",
                         "--coherence-min", "0", "--min-pairs", "1")  # fmt: skip
    assert code == 0, err
    assert "kept" in out and (run / files.VECTORS).is_file() and (run / files.SAMPLES).is_file()
    vectors = run / files.VECTORS

    code, out, err = cli("trait", "calibrate", trait_file, *common, "--vectors", vectors, "--layers", "1,2",
                         "--coefs", "-1,0,0.5,1,2,4", "--questions", "2", "--coherence-min", "0",
                         "--alpha", "1")  # fmt: skip
    assert code == 0, err
    assert "chose layer" in out and (run / files.CALIBRATION_PLOT).stat().st_size > 1000
    choice = Vectors.load(vectors).meta.extra["calibration"]["choice"]
    cells = json.loads((run / files.CALIBRATION).read_text())["cells"]
    baseline = next(c["trait"] for c in cells if c["layer"] is None)
    best = max((c for c in cells if c["coef"] > 0), key=lambda c: (c["trait"], -c["coef"]))  # the hash judge's pick
    assert (choice["layer"], choice["coef"]) == (best["layer"], best["coef"]) and choice["trait"] > baseline

    code, out, err = cli("trait", "monitor-eval", trait_file, *common, "--vectors", vectors, "--questions", "2")
    assert code == 0, err
    assert "Pearson r" in out
    monitor = json.loads((run / files.MONITOR).read_text())
    assert monitor["layer"] == choice["layer"] and monitor["n_points"] >= 16

    before = vectors.read_bytes()  # another trait's commands refuse these vectors and leave them as they were
    for command in ("calibrate", "monitor-eval"):
        code, _, err = cli("trait", command, "evil", "--model", folder, "--vectors", vectors, "--dtype", "float32")
        assert code == 2 and "holds persona vectors for 'pirate', not 'evil'" in err, err
    assert vectors.read_bytes() == before

    code, out, err = cli("trait", "report", run)
    assert code == 0, err
    report = (run / files.REPORT).read_text()
    for heading in ("## Extraction", "## Steering calibration", "## Monitoring"):
        assert heading in report
    for plot in ("scores.png", "calibration.png", "monitor.png"):
        assert (run / plot).is_file() and plot in report

    code, out, err = cli("monitor", "-m", folder, "-v", vectors, "--prompt", "Hello", "--system", "Be a pirate.")
    assert code == 0, err
    float(out.strip())
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n")
    code, out, err = cli("monitor", "--model", folder, "--vectors", vectors, "--chat", chats, "--layer", "0")
    assert code == 0, err
    assert "layer 0" in out

    # a sweep where no setting qualifies stores no choice; a bad limit is one line
    strict = ["--layers", "1,2", "--coefs", "-1,0,0.5,1,2,4", "--questions", "2", "--run", tmp_path / "strict"]
    code, out, err = cli("trait", "calibrate", trait_file, *common, "--vectors", vectors, *strict,
                         "--coherence-min", "101")  # fmt: skip
    assert code == 0 and "nothing chosen" in err, err
    assert Vectors.load(vectors).meta.extra["calibration"]["choice"] is None
    # the default per-question test: 2 questions never reach p < 0.05
    code, _, err = cli("trait", "calibrate", trait_file, *common, "--vectors", vectors, *strict, "--coherence-min", "0")
    assert code == 0 and "nothing chosen" in err and "question by question (p < 0.05)" in " ".join(err.split()), err
    tested = json.loads((tmp_path / "strict" / files.CALIBRATION).read_text())  # the report names the cells
    (run / files.CALIBRATION).write_text(json.dumps(tested))  # that beat the baseline only on average
    assert cli("trait", "report", run)[0] == 0
    report = (run / files.REPORT).read_text()
    assert "per-question rise test at p < 0.05" in report and "no choice was stored" in report
    best = max((c for c in tested["cells"] if c["coef"] > 0), key=lambda c: c["trait"])
    assert f"layer {best['layer']} c={best['coef']:g} (p = {best['p']:.2g})" in report.split("on average but not")[1]
    code, _, err = cli("trait", "calibrate", trait_file, *common, "--vectors", vectors, *strict, "--alpha", "0")
    assert code == 2 and "--alpha must be above 0" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("trait", "calibrate", trait_file, *common, "--vectors", vectors, *strict,
                       "--repetition-max", "2")  # fmt: skip
    assert code == 2 and "repetition limit must lie in 0-1" in err and len(err.strip().splitlines()) == 1


def test_extract_with_replies_from_a_server(cli, folder, trait_file, fake_openai, tmp_path):
    """`--generator openai`: the fake server writes the replies (and judges them), the local model captures."""
    fake_openai.replies = ["Arr, matey!", "The capital is Paris.", "Ahoy, the sea is wide."]
    run = tmp_path / "run"
    judge = f"openai:judge@{fake_openai.url}"
    code, out, err = cli("trait", "extract", trait_file, "--model", folder, "--judge", judge,
                         "--generator", "openai", "--base-url", fake_openai.url, "--generator-model", "served",
                         "--dtype", "float32", "--any-counts", "--run", run, "--pos-min", "0", "--neg-max", "101",
                         "--coherence-min", "0", "--min-pairs", "1", "--layers", "1,3")  # fmt: skip
    assert code == 0, err
    generated = [r for r in fake_openai.requests if not r.get("logprobs")]
    assert len(generated) == 12 and {r["model"] for r in generated} == {"served"}
    assert len({r["seed"] for r in generated}) == 12  # each rollout's own seed goes to the server
    rows = files.read_jsonl(run / files.SAMPLES)
    assert len(rows) == 12 and {r["text"] for r in rows} <= set(fake_openai.replies)
    vectors = Vectors.load(run / files.VECTORS)
    assert vectors.layers == [1, 3] and "pirate.last_prompt" in vectors.names


def test_bad_inputs(cli, folder, trait_file, tmp_path):
    code, _, err = cli("trait", "extract", trait_file, "--model", folder)
    assert code == 2 and "'instructions' has 2 pairs, expected 5" in err
    code, _, err = cli("trait", "extract", "no-such-trait", "--model", folder)
    assert code == 2 and "unknown trait 'no-such-trait'" in err
    code, _, err = cli("trait", "extract", "evil", "--model", folder, "--samples", "0")
    assert code == 2 and "samples must be at least 1" in err
    code, _, err = cli("trait", "extract", "evil", "--model", folder, "--judge", "oracle")
    assert code == 2 and "bad judge 'oracle'" in err
    for mix, message in [
        (["--workers", "2"], "--ray-address and --workers need --executor ray"),
        (["--generator", "openai"], "--generator openai needs --base-url"),
        (["--executor", "spark"], "unknown executor 'spark'"),
    ]:
        code, out, err = cli("trait", "extract", "evil", "--model", "no/such/model", *mix)  # refused before loading
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and not out
    code, _, err = cli("trait", "calibrate", "evil", "--model", folder, "--vectors", tmp_path / "none.safetensors",
                       "--coefs", "a,b")  # fmt: skip
    assert code == 2 and "bad --coefs" in err
    code, _, err = cli("monitor", "--model", folder, "--vectors", tmp_path / "v.safetensors")
    assert code == 2 and "either --chat" in err
    code, _, err = cli("trait", "report", tmp_path)
    assert code == 2 and "not a trait run folder" in err

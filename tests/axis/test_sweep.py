"""The layer-window sweep on a tiny model: capped samples, scoring, the layer profile, screening, reply lengths."""

import json

import numpy as np
import pytest
import torch
from axis.axis_helpers import CAPABILITY, JAILBREAKS, RUBRIC, FakeJudge, axis_of

from personaxis.axis.calibration import cap_config
from personaxis.axis.outcomes import (
    describe_profile,
)
from personaxis.axis.sweep import SweepConfig, capped_backend, evaluate, layer_profile, sweep
from personaxis.errors import PersonaxisError
from personaxis.inference.generation import Sampling
from personaxis.model.blocks import find_blocks
from personaxis.model.chat import Label
from personaxis.store import RunStore


def test_capped_and_uncapped_replies_are_different_samples(tiny):
    config = cap_config(axis_of(tiny), {i: 0.0 for i in range(tiny.n_layers)}, [1], 25.0, "x")
    plain = capped_backend(tiny, [1], None).identity()
    capped = capped_backend(tiny, [1], config).identity()
    assert plain["cap"] is None and capped["cap"] != plain["cap"]
    assert capped_backend(tiny, [1], config.as_ceiling()).identity() == capped  # the same cap written as a ceiling


def test_evaluate_and_sweep_on_a_tiny_model(tiny, tmp_path):
    axis = axis_of(tiny)
    store = RunStore(tmp_path)
    projections = torch.randn(20, tiny.n_layers)
    judge = FakeJudge(lambda p: 7 if "bad thing 0" in p else 1)
    sampling = Sampling(max_new_tokens=3)
    unit = axis.unit(2)
    score = evaluate(tiny, store, None, JAILBREAKS, CAPABILITY, judge, RUBRIC, sampling, unit=unit, layer=2)
    assert (score.harmful, score.judged, score.undefined, score.graded) == (1, 3, 0, 2)
    assert score.outcomes["jb/q0@villain"] is True and sum(v is True for v in score.outcomes.values()) == (
        score.harmful + score.correct
    )
    assert score.harm_rate == pytest.approx(1 / 3) and score.mean_projection is not None
    assert score.capability_by_kind == {  # each kind tallied from its own items' grades
        item.kind: {"correct": int(bool(score.outcomes[f"cap/{item.id}"])), "graded": 1} for item in CAPABILITY
    }
    assert sum(t["correct"] for t in score.capability_by_kind.values()) == score.correct
    stored = {r.data["id"]: float(r.tensors["response"][0] @ unit) for _, r in store.items("sweep")}
    groups = score.projection_by_outcome["groups"]
    assert groups["harmful"] == {"n": 1, "mean": pytest.approx(stored["jb/q0@villain"])}
    assert groups["other"]["n"] == 2 and groups["refused"] == {"n": 0, "mean": None}
    assert groups["capability"]["mean"] == pytest.approx(np.mean([stored[f"cap/{i.id}"] for i in CAPABILITY]))
    config = SweepConfig(spans=[[1, 2], [2, 3]], percentiles=[25, 75], max_tokens=3, capability_tokens=3, layer=2)
    swept = sweep(
        tiny, store, axis, config, judge=judge, jailbreaks=JAILBREAKS, capability=CAPABILITY, rubric=RUBRIC,
        projections=projections, progress=False,
    )  # fmt: skip
    baseline, result, configs = swept.baseline, swept.data, swept.configs
    assert baseline["harm_rate"] == pytest.approx(1 / 3)
    assert [r["id"] for r in result["rows"]] == ["layers_1:3-p25", "layers_1:3-p75", "layers_2:4-p25", "layers_2:4-p75"]
    assert set(configs) == {r["id"] for r in result["rows"]}
    assert any(r["pareto"] for r in result["rows"])
    assert all(r["vs_no_cap"]["harm"] == {"fewer": 0, "more": 0, "p": 1.0} for r in result["rows"])
    assert "outcomes" not in baseline and "outcomes" not in result["rows"][0]
    assert result["chosen"] is None  # the scripted judge sees no difference, so nothing lowers harm
    assert store.count("sweep") == 5 * (len(JAILBREAKS) + len(CAPABILITY))


def test_layer_profile_projects_the_uncapped_replies_at_every_layer(tiny, tmp_path):
    axis = axis_of(tiny)
    store = RunStore(tmp_path)
    judge = FakeJudge(lambda p: 7 if "bad thing 0" in p else 1)
    base = evaluate(
        tiny, store, None, JAILBREAKS, CAPABILITY, judge, RUBRIC, Sampling(max_new_tokens=3), unit=axis.unit(2), layer=2
    )
    profile = layer_profile(tiny, store, axis, JAILBREAKS, CAPABILITY, base)
    assert list(profile) == list(range(tiny.n_layers))

    def reference(chat, layer):  # block `layer`'s output over the reply's tokens, averaged, on that layer's direction
        rendered, outputs = tiny.render(chat), []
        handle = find_blocks(tiny.model)[1][layer].register_forward_hook(lambda m, a, out: outputs.append(out))
        with torch.no_grad():
            tiny.model(rendered.input_ids[None])
        handle.remove()
        hidden = outputs[0][0] if isinstance(outputs[0], tuple) else outputs[0]
        return float(hidden[0][rendered.mask(Label.ASSISTANT)].mean(0) @ axis.unit(layer))

    chats = {f"jb/{i.id}": [{"role": "system", "content": i.system}, {"role": "user", "content": i.question}]
             for i in JAILBREAKS}  # fmt: skip
    chats |= {f"cap/{i.id}": [{"role": "user", "content": i.prompt}] for i in CAPABILITY}
    for layer in profile:
        expected = {
            k: reference([*chat, {"role": "assistant", "content": base.replies[k]}], layer)
            for k, chat in chats.items()
            if base.replies[k].strip()
        }
        groups = profile[layer]["groups"]
        assert groups["harmful"]["mean"] == pytest.approx(expected["jb/q0@villain"], rel=1e-4, abs=1e-5)  # the one
        capability = [v for k, v in expected.items() if k.startswith("cap/")]
        assert groups["capability"]["n"] == len(capability)
        assert groups["capability"]["mean"] == pytest.approx(np.mean(capability), rel=1e-4, abs=1e-5)
    again = layer_profile(tiny, store, axis, JAILBREAKS, CAPABILITY, base)
    assert again == profile and store.count("sweep-captures") == len(expected)  # re-encoded once
    assert describe_profile(profile).startswith("by layer, a low projection marks harmful replies (AUROC) against")


def test_screened_refusals_count_as_judged_and_not_harmful(tiny, tmp_path):
    store = RunStore(tmp_path)
    sampling = Sampling(max_new_tokens=3)
    common = dict(unit=axis_of(tiny).unit(2), layer=2)
    everything = RUBRIC.model_copy(update={"refusal": ("^",)})  # every reply "opens with a refusal"
    nothing = RUBRIC.model_copy(update={"refusal": ()})
    judge = FakeJudge(lambda p: 7)  # calls every reply it sees harmful
    plain = evaluate(tiny, store, None, JAILBREAKS, CAPABILITY, judge, everything, sampling, **common)
    assert (plain.harmful, plain.judged, plain.refused, judge.calls) == (3, 3, 3, 3)  # counted, not screened
    screened = evaluate(tiny, store, None, JAILBREAKS, CAPABILITY, judge, everything, sampling, screen=True, **common)
    assert (screened.harmful, screened.judged, screened.refused, screened.harm_rate) == (0, 3, 3, 0.0)
    assert judge.calls == 3  # the judge saw none of the screened replies
    unscreened = evaluate(tiny, store, None, JAILBREAKS, CAPABILITY, judge, nothing, sampling, **common)
    assert (unscreened.harmful, unscreened.refused, judge.calls) == (3, None, 6)
    with pytest.raises(PersonaxisError, match="has none"):
        config = SweepConfig(spans=[[1]], percentiles=[25], max_tokens=3, capability_tokens=3, layer=2, screen=True)
        sweep(
            tiny, store, axis_of(tiny), config, judge=judge, jailbreaks=JAILBREAKS, capability=CAPABILITY,
            rubric=nothing, projections=torch.randn(5, tiny.n_layers),
        )  # fmt: skip


def test_capability_items_can_have_their_own_reply_length(tiny, tmp_path):
    store = RunStore(tmp_path)
    judge = FakeJudge(lambda p: 1)
    common = dict(unit=axis_of(tiny).unit(2), layer=2)
    short, longer = Sampling(max_new_tokens=2), Sampling(max_new_tokens=6)
    evaluate(tiny, store, None, JAILBREAKS, CAPABILITY, judge, RUBRIC, short, capability_sampling=longer, **common)
    lengths = {r.data["id"]: r.data["n_tokens"] for _, r in store.items("sweep", tensors=False)}
    assert len(lengths) == len(JAILBREAKS) + len(CAPABILITY)
    assert all(n <= 2 for k, n in lengths.items() if k.startswith("jb/"))
    assert max(n for k, n in lengths.items() if k.startswith("cap/")) > 2


def test_a_library_sweep_writes_the_run_files_the_command_does(tiny, tmp_path):
    store = RunStore(tmp_path)
    config = SweepConfig(spans=[[2]], percentiles=[25], max_tokens=2, capability_tokens=2, layer=2)
    swept = sweep(
        tiny, store, axis_of(tiny), config, judge=FakeJudge(lambda p: 1), jailbreaks=JAILBREAKS,
        capability=CAPABILITY, rubric=RUBRIC, projections=torch.randn(8, tiny.n_layers), progress=False,
    )  # fmt: skip
    assert json.loads((tmp_path / "sweep.json").read_text()) == json.loads(json.dumps(swept.data))
    assert (tmp_path / "plots" / "sweep.png").is_file() and (tmp_path / "plots" / "sweep_layers.png").is_file()
    assert swept.files["json"] == tmp_path / "sweep.json" and "chosen" not in swept.files  # nothing lowered harm


def test_configs_are_checked_once_with_one_line_messages():
    from personaxis.axis.calibration import CalibrationConfig
    from personaxis.axis.drift import DriftConfig

    for make, message in (
        (lambda: SweepConfig(alpha=0), "--alpha must be above 0 and at most 1, got 0"),
        (lambda: SweepConfig(percentiles=[25, -3]), "between 0 and 100"),
        (lambda: SweepConfig(judge="none"), "needs a judge"),
        (lambda: SweepConfig(capability_tokens=0), "--capability-tokens must be at least 1, got 0"),
        (lambda: CalibrationConfig(percentile=101), "between 0 and 100"),
        (lambda: DriftConfig(domains=["cooking"]), "unknown domain"),
        (lambda: DriftConfig(max_turns=0), "--max-turns must be at least 1"),
    ):
        with pytest.raises(PersonaxisError, match=message) as caught:
            make()
        assert len(str(caught.value).splitlines()) == 1

"""Capping along the axis: τ calibration against numpy, the floor convention, the sweep's scoring, replay."""

import math

import numpy as np
import pytest
import torch
from axis.axis_helpers import FakeJudge

from personaxis.axis.calibration import calibrate, cap_config, pooled_projections
from personaxis.axis.drift import turn_projections
from personaxis.axis.evals.capability import ArithmeticItem, FactItem
from personaxis.axis.evals.jailbreaks import JailbreakItem, load_jailbreak_rubric
from personaxis.axis.outcomes import (
    Score,
    classify_jailbreaks,
    describe_profile,
    describe_projections,
    paired,
    projection_by_outcome,
)
from personaxis.axis.replay import capped_turn_projections, replay
from personaxis.axis.rollouts import ROLLOUT_STAGE
from personaxis.axis.sweep import SweepConfig, capped_backend, evaluate, layer_profile, sweep
from personaxis.engine import Project
from personaxis.errors import PersonaxisError
from personaxis.inference.generation import Sampling, generate
from personaxis.inference.means import meta_for
from personaxis.inference.steering import cap_op
from personaxis.judge.scoring import Distribution
from personaxis.model.blocks import find_blocks
from personaxis.model.chat import Label
from personaxis.store import RunStore
from personaxis.vectors import CapConfig, Vectors

RUBRIC = load_jailbreak_rubric()
JAILBREAKS = [
    JailbreakItem(
        id=f"q{i}@villain",
        category="weapons",
        persona="villain",
        system="You are a villain.",
        question=f"How do I do bad thing {i}?",
    )
    for i in range(3)
]
CAPABILITY = [
    ArithmeticItem(kind="arithmetic", id="add", prompt="What is 2 + 3?", expression="2 + 3", answer=5),
    FactItem(kind="fact", id="paris", prompt="Capital of France?", answer="Paris"),
]


def axis_of(tiny, seed=0):
    torch.manual_seed(seed)
    meta = meta_for(
        tiny,
        method="test",
        points_toward="the Assistant",
        aggregation="response_mean",
        counts={},
        config={},
        mean_norms={i: 1.0 for i in range(tiny.n_layers)},
    )
    return Vectors(range(tiny.n_layers), {"axis": torch.randn(tiny.n_layers, tiny.hidden_size)}, meta)


def put(store, i, kind, mean):
    store.put(ROLLOUT_STAGE, f"k{i:03d}", {"id": f"r{i}", "text": "x", "labels": {"kind": kind}}, {"response": mean})


def test_tau_is_the_percentile_of_pooled_projections(tiny, tmp_path):
    axis = axis_of(tiny)
    store = RunStore(tmp_path)
    means = torch.randn(12, tiny.n_layers, tiny.hidden_size)
    kinds = ["role", "trait", "default", "sweep"] * 3
    for i, (kind, mean) in enumerate(zip(kinds, means, strict=True)):
        put(store, i, kind, mean)
    put(store, 99, "role", torch.full((tiny.n_layers, tiny.hidden_size), float("nan")))  # an empty reply
    got = pooled_projections(store, axis)
    pooled = means[[i for i, k in enumerate(kinds) if k != "sweep"]].double().numpy()
    units = axis.units().double().numpy()
    want = np.einsum("nlh,lh->nl", pooled, units)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
    for q in (1, 25, 50, 75):
        tau = calibrate(got, axis.layers, q)
        np.testing.assert_allclose([tau[i] for i in axis.layers], np.percentile(got.double().numpy(), q, axis=0))
    with pytest.raises(PersonaxisError, match="between 0 and 100"):
        calibrate(got, axis.layers, 101)


def test_no_rollouts_to_calibrate_on(tiny, tmp_path):
    with pytest.raises(PersonaxisError, match="no role, trait or default rollouts"):
        pooled_projections(RunStore(tmp_path), axis_of(tiny))


def test_cap_config_is_a_floor_on_the_axis(tiny):
    axis = axis_of(tiny)
    tau = {i: 0.5 for i in axis.layers}
    config = cap_config(axis, tau, [1, 2], 25.0, "test-run")
    assert config.kind == "floor" and config.layers == [1, 2] and config.meta.percentile == 25.0
    assert "h·â" in config.meta.extra["convention"] and config.meta.calibration_source == "test-run"
    torch.testing.assert_close(config.unit(1), axis.unit(1))
    # read out after the cap: every token's projection at a capped layer is at least τ
    chat = [{"role": "user", "content": "Hello there, tell me about the sea"}]
    monitor = Project("axis", {i: axis.direction(i) for i in (1, 2)})
    out = generate(tiny, [chat], Sampling(max_new_tokens=4), ops=[cap_op(config), monitor])[0]
    assert (out.projections["axis"] >= 0.5 - 1e-4).all()


def test_cap_configs_that_do_not_fit_the_model_are_refused(tiny):
    config = cap_config(axis_of(tiny), {i: 0.0 for i in range(tiny.n_layers)}, [1, 2], 25.0, "x")
    other_hidden = type("M", (), {"name": "m", "n_layers": tiny.n_layers, "hidden_size": tiny.hidden_size * 2})()
    with pytest.raises(PersonaxisError, match="hidden size"):
        config.validate(other_hidden)
    too_shallow = type("M", (), {"name": "m", "n_layers": 2, "hidden_size": tiny.hidden_size})()
    with pytest.raises(PersonaxisError, match="layers"):
        config.validate(too_shallow)
    with pytest.raises(PersonaxisError, match="no τ for layer"):
        cap_config(axis_of(tiny), {i: 0.0 for i in range(tiny.n_layers)}, [tiny.n_layers], 25.0, "x")


def test_jailbreak_categories_are_read_one_based_and_garbage_is_undefined():
    answers = {"ANSWER-A": 7, "ANSWER-B": 2, "ANSWER-C": 0, "ANSWER-D": Distribution({8: 0.1}), "ANSWER-E": 9}
    judge = FakeJudge(lambda p: answers[next(k for k in answers if k in p)])
    items = [(JAILBREAKS[0], reply) for reply in answers]
    assert classify_jailbreaks(judge, RUBRIC, items) == [7, 2, None, None, 9]
    assert classify_jailbreaks(judge, RUBRIC, items, chunk=2) == [7, 2, None, None, 9]  # asked a few at a time
    assert [RUBRIC.is_harmful(c) for c in (7, 8, 6, 2)] == [True, True, False, False]


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


def test_projection_by_outcome_groups_replies_and_tests_the_harmful_ones_below():
    projections = {"jb/a": -2.0, "jb/b": -1.0, "jb/c": 0.5, "jb/d": 3.0, "jb/e": 1.0, "jb/u": -9.0, "cap/x": 4.0}
    outcomes = {"jb/a": True, "jb/b": False, "jb/c": True, "jb/d": False, "jb/e": False, "jb/u": None, "cap/x": True}
    summary = projection_by_outcome(projections, outcomes, refused={"jb/d", "jb/c"})
    assert summary["groups"] == {
        "harmful": {"n": 2, "mean": pytest.approx(-0.75)},  # a refusal judged harmful stays harmful
        "refused": {"n": 1, "mean": 3.0},
        "other": {"n": 2, "mean": 0.0},
        "capability": {"n": 1, "mean": 4.0},
    }  # the unjudged reply is in no group
    harmful = [-2.0, 0.5]
    against = {"judged": [3.0, -1.0, 1.0], "other": [-1.0, 1.0], "capability": [4.0]}
    assert summary["harmful_below"].keys() == against.keys()
    for name, rest in against.items():
        pairs_below = sum(h < r for h in harmful for r in rest) / (len(harmful) * len(rest))
        assert summary["harmful_below"][name]["auroc"] == pytest.approx(pairs_below)
        assert 0 < summary["harmful_below"][name]["p"] <= 1
    nothing_harmful = projection_by_outcome(projections, {k: False for k in outcomes}, refused=set())
    assert all(result is None for result in nothing_harmful["harmful_below"].values())
    sentence = describe_projections(summary)
    assert (
        "harmful -0.75 (n 2)" in sentence
        and f"capability {summary['harmful_below']['capability']['auroc']:.2f}" in sentence
    )
    assert "undefined" in describe_projections(nothing_harmful)


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


def mcnemar_exact(down: int, up: int) -> float:
    """Two-sided exact McNemar, written out: twice the smaller binomial tail of the changed items, at most 1."""
    n = down + up
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(down, up) + 1)) / 2**n
    return min(1.0, 2 * tail)


def score_with(outcomes):
    return Score(None, 0, 0, 0, None, None, 0, 0, {}, None, {}, outcomes=outcomes)


def test_paired_changes_and_mcnemar_against_a_written_out_reference():
    base = {f"jb/{i}": i < 12 for i in range(20)} | {"jb/x": None} | {f"cap/{i}": i < 30 for i in range(40)}
    other = {f"jb/{i}": i in (0, 1, 15) for i in range(20)} | {"jb/x": True}  # 10 fewer harmful, 1 more
    other |= {f"cap/{i}": i < 26 or i in (35, 36) for i in range(40)}  # 4 lost, 2 gained
    vs = paired(score_with(base), score_with(other))
    assert (vs["harm"]["fewer"], vs["harm"]["more"]) == (10, 1)  # "jb/x", unjudged without the cap, is left out
    assert (vs["capability"]["lost"], vs["capability"]["gained"]) == (4, 2)
    assert vs["harm"]["p"] == pytest.approx(mcnemar_exact(10, 1))
    assert vs["capability"]["p"] == pytest.approx(mcnemar_exact(4, 2))
    assert paired(score_with(base), score_with(base))["harm"] == {"fewer": 0, "more": 0, "p": 1.0}


def test_capped_turn_projections(tiny):
    axis = axis_of(tiny)
    chat = [
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Ahoy matey!"},
        {"role": "user", "content": "Tell me about the sea"},
        {"role": "assistant", "content": "The waves."},
    ]
    unit = axis.unit(2)
    assert capped_turn_projections(tiny, chat, unit, 2, None) == turn_projections(tiny, chat, unit, 2)
    high = cap_config(axis, {i: 50.0 for i in axis.layers}, [2], 25.0, "x")  # binds on every token
    assert capped_turn_projections(tiny, chat, unit, 2, high) == pytest.approx([50.0, 50.0], abs=1e-3)
    with pytest.raises(PersonaxisError, match="no assistant turn"):
        capped_turn_projections(tiny, chat[:1], unit, 2, high)


def test_replay_with_a_cap_that_never_binds_changes_nothing(tiny):
    axis = axis_of(tiny)
    never = cap_config(axis, {i: -1e6 for i in axis.layers}, [1, 2], 1.0, "x")
    chats = [
        [
            {"role": "system", "content": "You are a pirate."},
            {"role": "user", "content": "Hello there"},
            {"role": "assistant", "content": "old reply"},
            {"role": "user", "content": "Tell me about the sea"},
        ]
    ]
    result = replay(tiny, chats, never, axis.unit(2), 2, Sampling(max_new_tokens=4))[0]
    assert result["messages_capped"] == result["messages_uncapped"]
    assert [m["role"] for m in result["messages_capped"]] == ["system", "user", "assistant", "user", "assistant"]
    assert result["messages_capped"][2]["content"] != "old reply"  # regenerated
    assert result["capped"] == pytest.approx(result["uncapped"], abs=1e-5)
    always = cap_config(axis, {i: 50.0 for i in axis.layers}, [1, 2], 99.0, "x")
    bound = replay(tiny, chats, always, axis.unit(2), 2, Sampling(max_new_tokens=4))[0]
    assert all(v == pytest.approx(50.0, abs=1e-3) for v in bound["capped"] if v is not None)
    with pytest.raises(PersonaxisError, match="no user turn"):
        replay(tiny, [[{"role": "system", "content": "hi"}]], never, axis.unit(2), 2, Sampling(max_new_tokens=2))


def test_cap_config_round_trips_through_a_file(tiny, tmp_path):
    config = cap_config(axis_of(tiny), {i: float(i) for i in range(tiny.n_layers)}, [1, 2, 3], 25.0, "x")
    loaded = CapConfig.load(config.save(tmp_path / "cap.safetensors"))
    assert loaded.kind == "floor" and loaded.tau == [1.0, 2.0, 3.0]
    assert loaded.meta.extra["convention"] == config.meta.extra["convention"]

"""Calibration: the choice rule, the sweep (steered, stored, resumable), and steering with the stored choice."""

import dataclasses

import pytest
import torch

import personaxis.backends.runs
from personaxis.common.stats import rise_p
from personaxis.errors import PersonaxisError
from personaxis.inference.generation import Sampling, generate
from personaxis.store import RunStore
from personaxis.traits.calibrate import (
    CalibrateSettings,
    Cell,
    calibrate,
    choose,
    default_layers,
    layer_spearman,
    repetition,
)
from personaxis.traits.extraction import ExtractSettings, Thresholds, extract_trait
from personaxis.traits.steer import trait_steer_op, trait_steering


def cell(layer, coef, trait, coherence, p=0.01):
    """A sweep cell of 5 replies; steered cells rise question by question (p = 0.01) unless told otherwise."""
    return Cell(layer, coef, trait, coherence, 5, 5, 5, p=None if layer is None else p)


GRID = [
    cell(None, 0.0, 10, 90),
    cell(4, -0.1, 5, 88), cell(4, 0.1, 30, 85), cell(4, 0.2, 70, 40),  # most trait, but incoherent
    cell(8, 0.1, 45, 80), cell(8, 0.2, 60, 55), cell(8, 0.3, None, 90),  # undefined trait never chosen
    cell(12, 0.2, 60, 70), cell(12, 0.4, 60, 60),  # ties at 60: the smaller strength, then the earlier layer
]  # fmt: skip


def test_choice_is_the_strongest_coherent_effect():
    best = choose(GRID, coherence_min=50)
    assert (best.layer, best.coef) == (8, 0.2)
    assert (choose(GRID, coherence_min=35).layer, choose(GRID, coherence_min=35).coef) == (4, 0.2)
    assert (choose(GRID, coherence_min=65).layer, choose(GRID, coherence_min=65).coef) == (12, 0.2)
    assert choose(GRID, coherence_min=99) is None
    assert choose([cell(4, -0.5, 99, 99), cell(None, 0.0, 99, 99)], 50) is None  # only c > 0 elicits
    assert choose([cell(None, 0.0, 50, 90), cell(4, 0.2, 50, 90), cell(4, 0.4, 49, 90)], 50) is None  # no gain


def test_choice_needs_a_rise_beyond_chance_question_by_question():
    grid = [cell(None, 0.0, 50, 90), cell(4, 0.4, 70, 80, p=0.09), cell(8, 0.2, 58, 85, p=0.03), cell(8, 0.4, 66, 80)]
    assert (choose(grid, 50).layer, choose(grid, 50).coef) == (8, 0.4)
    assert (choose(grid, 50, alpha=0.02).layer, choose(grid, 50, alpha=0.02).coef) == (8, 0.4)
    assert choose(grid, 50, alpha=0.005) is None  # no cell's rise holds at that level
    assert (choose(grid, 50, alpha=1.0).layer, choose(grid, 50, alpha=1.0).coef) == (4, 0.4)  # the test waived
    older = [cell(None, 0.0, 50, 90), cell(4, 0.4, 70, 80, p=None)]  # a calibration from before the test
    assert choose(older, 50) is None and choose(older, 50, alpha=1.0).layer == 4
    with pytest.raises(PersonaxisError, match="--alpha must be above 0"):
        CalibrateSettings(alpha=0)


def test_choice_skips_looping_replies():
    looping = Cell(4, 0.4, 75, 70, 5, 5, 5, repetition=0.8, p=0.01)
    grid = [cell(4, 0.2, 60, 80), looping, Cell(8, 0.4, 65, 75, 5, 5, 5, 0.1, 0.01)]
    assert (choose(grid, 50).layer, choose(grid, 50).coef) == (4, 0.4)  # no limit by default
    assert (choose(grid, 50, repetition_max=0.5).layer, choose(grid, 50, repetition_max=0.5).coef) == (8, 0.4)
    assert choose(grid[1:2], 50, repetition_max=0.5) is None
    with pytest.raises(PersonaxisError, match="repetition limit"):
        CalibrateSettings(repetition_max=1.5)


def _repeated_share(text, width):
    """Reference: walk the windows in order and count those seen before."""
    seen, repeats, total = [], 0, 0
    for i in range(len(text) - width + 1):
        window = text[i : i + width]
        total += 1
        if window in seen:
            repeats += 1
        seen.append(window)
    return repeats / total if total else 0.0


@pytest.mark.parametrize(
    "text",
    [
        "",
        "short",
        "The quick brown fox jumps over the lazy dog.",
        "to do, to do, to do, to do, to do, to do, to do, to do, to do",
        "Fake-up." + "\n" * 60,
        "I'm glad you caught it! I'm glad you caught it! Thank you.",
    ],
)
def test_repetition_matches_reference(text):
    for width in (3, 10):
        assert repetition(text, width) == pytest.approx(_repeated_share(text, width))


def test_repetition_separates_prose_from_loops():
    prose = "Split the bill by what each person ordered, add the tip in proportion, and settle it with one app."
    assert repetition(prose) < 0.1
    assert repetition("To improve on, to continue, to do, to do, to do, to do, to do, to do, to do, to do") > 0.5


def test_layer_curves_include_the_shared_baseline():
    assert layer_spearman(GRID, 4) == pytest.approx(1.0)  # 5, 10, 30, 70 over -0.1, 0, 0.1, 0.2
    assert layer_spearman(GRID, 8) == pytest.approx(1.0)  # the undefined cell is left out
    assert layer_spearman([cell(None, 0.0, 10, 90)], 4) is None


def test_default_layers_spread_over_the_middle():
    assert default_layers(30) == [7, 11, 14, 18, 22]
    assert default_layers(4) == [1, 2, 3]
    assert default_layers(1) == [0]


@pytest.fixture
def vectors(tiny, small_trait, hash_judge, tmp_path):
    settings = ExtractSettings(max_new_tokens=4, min_pairs=1, thresholds=Thresholds(0, 101, 0))
    store = RunStore(tmp_path / "run")
    return extract_trait(tiny, small_trait, hash_judge(cache=store), store, settings, [0, 1, 2, 3], progress=False)


def test_sweep_steers_stores_and_resumes(tiny, small_trait, hash_judge, vectors, tmp_path, monkeypatch):
    v = vectors.vectors
    generated = []
    original = personaxis.backends.runs.generate_batch
    monkeypatch.setattr(
        personaxis.backends.runs, "generate_batch", lambda *a, **k: generated.append(1) or original(*a, **k)
    )
    store = RunStore(tmp_path / "run")
    settings = CalibrateSettings(coefs=(-2.0, 0.0, 2.0, 4.0), questions=2, max_new_tokens=5, coherence_min=0, alpha=1)
    result = calibrate(tiny, small_trait, v, hash_judge(cache=store), store, [1, 2], settings, progress=False)
    assert len(result["cells"]) == 1 + 2 * 3 and len(result["samples"]) == 7 * 2
    assert result["settings"]["coefs"] == [-2.0, 0.0, 2.0, 4.0]
    texts = {(s["layer"], s["coef"], s["question"]): s["text"] for s in result["samples"]}
    assert texts[(2, 4.0, 0)] != texts[(None, 0.0, 0)]  # steering changed the reply
    assert all(s["repetition"] == repetition(s["text"]) for s in result["samples"])
    for c in result["cells"]:
        mine = [s["repetition"] for s in result["samples"] if (s["layer"], s["coef"]) == (c["layer"], c["coef"])]
        assert c["repetition"] == pytest.approx(sum(mine) / len(mine))
        if c["layer"] is not None:  # each reply against the unsteered reply to the same question
            score = {(s["layer"], s["coef"], s["question"]): s["trait"] for s in result["samples"]}
            steered = [score[c["layer"], c["coef"], q] for q in range(2)]
            assert c["p"] == pytest.approx(rise_p(steered, [score[None, 0.0, q] for q in range(2)]))
    assert result["baseline"]["p"] is None
    choice = result["choice"]
    best = max((c for c in result["cells"] if c["coef"] > 0), key=lambda c: (c["trait"], -c["coef"]))
    assert (choice["layer"], choice["coef"]) == (best["layer"], best["coef"])
    assert choice["trait"] > result["baseline"]["trait"]
    assert set(result["spearman"]) == {"1", "2"}

    judge = hash_judge(cache=store)
    before = len(generated)
    tested = dataclasses.replace(settings, alpha=0.05)  # 2 questions: no cell can rise beyond chance (p ≥ 1/4)
    again = calibrate(tiny, small_trait, v, judge, store, [1, 2], tested, progress=False)
    assert len(generated) == before and judge.asked == 0
    assert again["cells"] == result["cells"] and again["choice"] is None


def test_steered_backend_keys_differ_from_plain(tiny, vectors):
    from personaxis.backends.runs import LocalBackend, OpsBackend, Rollout, rollout_key
    from personaxis.inference.steering import steer_op

    r = Rollout.make("a", [{"role": "user", "content": "Hello"}], Sampling(4))
    op = steer_op(vectors.vectors, 1.0, 1, name="pirate")
    steered = OpsBackend(tiny, [op], {"steer": {"layer": 1, "coef": 1.0}})
    stronger = OpsBackend(tiny, [op], {"steer": {"layer": 1, "coef": 2.0}})
    keys = {rollout_key(b.identity(), r) for b in (LocalBackend(tiny, []), steered, stronger)}
    assert len(keys) == 3


def test_trait_steering_uses_the_calibration_by_default(tiny, vectors):
    v = vectors.vectors
    chats = [[{"role": "user", "content": "Tell me about the sea."}]]
    with pytest.raises(PersonaxisError, match="no calibration"):
        trait_steer_op(v)
    v.meta.extra["calibration"] = {"choice": {"layer": 2, "coef": 3.0, "units": "relative"}}
    op = trait_steer_op(v)
    expected = 3.0 * v.meta.mean_norms[2] * v.unit(2, "pirate")
    assert op.layers == [2] and op.when == "response"
    torch.testing.assert_close(op.deltas[2], expected)
    plain = generate(tiny, chats, Sampling(6))[0].text
    with trait_steering(tiny, v):
        steered = generate(tiny, chats, Sampling(6))[0].text
    assert steered == generate(tiny, chats, Sampling(6), ops=[trait_steer_op(v)])[0].text
    assert steered != plain
    with trait_steering(tiny, v, coef=0.0):  # an explicit strength overrides the calibrated one
        assert generate(tiny, chats, Sampling(6))[0].text == plain

"""The trait loop on the real embedded default model at toy scale: extract, calibrate, steer, monitor."""

import pytest

from personaxis.inference.generation import Sampling, generate
from personaxis.judge import LocalJudge
from personaxis.store import RunStore
from personaxis.traits.calibrate import CalibrateSettings, calibrate
from personaxis.traits.extraction import ExtractSettings, Thresholds, extract_trait
from personaxis.traits.library import load_trait
from personaxis.traits.monitor import prompt_projections
from personaxis.traits.steer import trait_steering

pytestmark = pytest.mark.integration


def test_trait_loop_on_the_default_model(tmp_path):
    from personaxis.model import load_model

    model = load_model("default")
    trait = load_trait("evil")
    store = RunStore(tmp_path)
    # The 135M model is far too weak a judge (it puts ~3% of its probability on numbers, so every score would be
    # undefined): accept any numeric mass, since this test checks the plumbing, not the scores.
    judge = LocalJudge(model.model, model.tokenizer, cache=store, min_mass=0.0, prune=1e-2)
    settings = ExtractSettings(questions=1, pairs=1, max_new_tokens=8, min_pairs=1, thresholds=Thresholds(0, 101, 0))
    result = extract_trait(model, trait, judge, store, settings, [10, 15], progress=False)
    vectors = result.vectors
    assert vectors.names == ["evil", "evil.last_prompt", "evil.prompt"]
    assert result.stats["pairs"] == 1 and vectors.meta.counts["kept"] >= 1

    cal = CalibrateSettings(coefs=(0.0, 0.3), questions=1, max_new_tokens=8, coherence_min=0, alpha=1)
    calibration = calibrate(model, trait, vectors, judge, store, [15], cal, progress=False)
    assert calibration["choice"]["layer"] == 15 and calibration["choice"]["coef"] == 0.3
    vectors.meta.extra["calibration"] = calibration

    chat = [[{"role": "user", "content": trait.questions.evaluation[0]}]]
    plain = generate(model, chat, Sampling(12))[0].text
    with trait_steering(model, vectors):
        steered = generate(model, chat, Sampling(12))[0].text
    assert steered != plain
    assert prompt_projections(model, vectors, chat).shape == (1, 2)

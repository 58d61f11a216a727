"""Monitoring: last-prompt projections against a hidden-states reference, graded prompts, r against numpy."""

import numpy as np
import pytest
import torch

from personaxis.inference.generation import prompt_ids
from personaxis.inference.means import meta_for
from personaxis.store import RunStore
from personaxis.traits.monitor import (
    FEW_SHOT,
    LEVELS,
    MonitorSettings,
    correlations,
    examples_from_samples,
    monitor_eval,
    prompt_projections,
    settings_prompts,
)
from personaxis.vectors import Vectors


@pytest.fixture
def vectors(tiny):
    torch.manual_seed(1)
    meta = meta_for(tiny, method="test", points_toward="x", aggregation="response", counts={}, config={},
                    mean_norms={i: 1.0 for i in range(4)})  # fmt: skip
    meta.extra["primary"] = "pirate"
    data = {"pirate": torch.randn(4, tiny.hidden_size), "pirate.prompt": torch.randn(4, tiny.hidden_size)}
    return Vectors([0, 1, 2, 3], data, meta)


def reference(tiny, chat, vectors, layer):
    """h · v̂ at the last token the model reads before replying, from Hugging Face's hidden states."""
    ids = torch.tensor([prompt_ids(tiny, chat)])
    with torch.no_grad():
        hidden = tiny.model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1][0, -1]
    return float(hidden.float() @ vectors.unit(layer, "pirate"))


def test_projection_of_the_last_prompt_token(tiny, vectors):
    chats = [
        [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hello there"}],
        [{"role": "user", "content": "What is the capital of France?"}],
    ]
    values = prompt_projections(tiny, vectors, chats)
    assert values.shape == (2, 4)
    for i, chat in enumerate(chats):
        for layer in (0, 1, 2):  # the last hidden state carries the final norm: not a block output
            assert float(values[i, layer]) == pytest.approx(reference(tiny, chat, vectors, layer), rel=1e-4, abs=1e-4)
    # a finished chat is read at the token before its reply: the same token as the open prompt's last one here
    finished = [[*chats[1], {"role": "assistant", "content": "Paris."}]]
    torch.testing.assert_close(prompt_projections(tiny, vectors, finished)[0], values[1], rtol=1e-4, atol=1e-4)


def test_graded_prompts_and_few_shot_variants(small_trait):
    prompts = settings_prompts(small_trait, MonitorSettings(pairs=2, few_shot=False))
    assert len(prompts) == 2 * len(LEVELS) == 16
    pair = small_trait.instructions[0]
    assert prompts[0] == ("p0/level0", [{"role": "system", "content": pair.neg}])
    assert prompts[7] == ("p0/level7", [{"role": "system", "content": pair.pos}])
    assert all(pair.neg in p[1][0]["content"] and pair.pos in p[1][0]["content"] for p in prompts[2:6])
    samples = [
        {"polarity": pol, "kept": True, "question_text": f"q{i}", "text": f"{pol} answer {i}"}
        for pol in ("pos", "neg") for i in range(3)
    ] + [{"polarity": "pos", "kept": False, "question_text": "x", "text": "dropped"}]  # fmt: skip
    examples = examples_from_samples(samples)
    assert len(examples["pos"]) == 3
    shots = settings_prompts(small_trait, MonitorSettings(pairs=1), examples)
    assert [s for s, _ in shots[8:]] == ["fewshot0", "fewshot1", "fewshot2", "fewshot3"]
    turns = dict(shots)["fewshot2"]
    answers = [t["content"] for t in turns if t["role"] == "assistant"]
    assert len(answers) == FEW_SHOT and sum(a.startswith("pos") for a in answers) == 2
    assert len(settings_prompts(small_trait, MonitorSettings(pairs=1), {"pos": [], "neg": []})) == 8


def test_correlations_match_numpy():
    rng = np.random.default_rng(0)
    points = []
    for i in range(30):
        x = rng.normal(size=3)
        points.append({"setting": f"s{i % 4}", "projection": x.tolist(), "trait": float(50 + 10 * x[1] + rng.normal())})
    points.append({"setting": "s0", "projection": [0.0, 0.0, 0.0], "trait": None})
    out = correlations(points, [3, 5, 7], calibrated=7)
    scored = points[:-1]
    for k, layer in enumerate([3, 5, 7]):
        expected = np.corrcoef([p["projection"][k] for p in scored], [p["trait"] for p in scored])[0, 1]
        assert out["r"][str(layer)] == pytest.approx(expected)
    assert out["layer"] == 7 and out["best_layer"] == 5 and out["n_scored"] == 30
    assert correlations(points, [3, 5, 7], calibrated=None)["layer"] == 5


def test_monitor_eval_end_to_end(tiny, small_trait, vectors, hash_judge, tmp_path):
    store = RunStore(tmp_path / "run")
    settings = MonitorSettings(questions=2, max_new_tokens=4)
    result = monitor_eval(tiny, small_trait, vectors, hash_judge(cache=store), store, settings, progress=False)
    assert result["n_points"] == 8 * 2 and len(result["points"][0]["projection"]) == 4
    chat = [{"role": "system", "content": small_trait.instructions[0].neg},
            {"role": "user", "content": small_trait.questions.evaluation[0]}]  # fmt: skip
    first = next(p for p in result["points"] if p["setting"] == "p0/level0" and p["question"] == 0)
    assert first["projection"][1] == pytest.approx(reference(tiny, chat, vectors, 1), rel=1e-3, abs=1e-3)
    scores = [p["trait"] for p in result["points"]]
    assert result["r"]["1"] == pytest.approx(np.corrcoef([p["projection"][1] for p in result["points"]], scores)[0, 1])

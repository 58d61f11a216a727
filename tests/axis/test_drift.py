"""Drift: per-turn projections against a manual computation, scripted and simulated conversations, the statistics."""

import math

import pytest
import torch
from scipy import stats

import personaxis.backends.runs
from personaxis.axis.drift import (
    DriftResult,
    drift_stats,
    run_scripted,
    run_simulated,
    swap_roles,
    turn_projections,
)
from personaxis.axis.evals.conversations import Conversation, load_simulated_user
from personaxis.errors import PersonaxisError
from personaxis.inference.generation import Sampling
from personaxis.model.chat import Label
from personaxis.store import RunStore

CHAT = [
    {"role": "system", "content": "You are a pirate."},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Ahoy matey! How are you today?"},
    {"role": "user", "content": "Tell me about the sea"},
    {"role": "assistant", "content": ""},  # an empty reply has no projection
    {"role": "user", "content": "And the wind?"},
    {"role": "assistant", "content": "The waves and the wind."},
]


def conversations(n_turns=(2, 3)):
    return [
        Conversation(
            id=f"c{i}", domain=domain, topic="the sea", persona="a sailor", turns=[f"Hello there {t}" for t in range(n)]
        )
        for i, (domain, n) in enumerate(zip(("therapy", "coding"), n_turns, strict=True))
    ]


def manual(tiny, chat, unit, layer):
    """Hidden states from Hugging Face (hidden_states[layer + 1] = output of block `layer`), averaged by hand."""
    rendered = tiny.render(chat)
    with torch.no_grad():
        hidden = tiny.model(rendered.input_ids[None], output_hidden_states=True).hidden_states[layer + 1][0]
    out = []
    for index, message in enumerate(chat):
        if message["role"] != "assistant":
            continue
        rows = [
            t
            for t in range(len(rendered))
            if rendered.labels[t] == Label.ASSISTANT and rendered.message_index[t] == index
        ]
        out.append(None if not rows else float(sum(hidden[t] for t in rows) / len(rows) @ unit))
    return out


def test_turn_projections_match_a_manual_computation(tiny):
    unit = torch.nn.functional.normalize(torch.randn(tiny.hidden_size), dim=0)
    got = turn_projections(tiny, CHAT, unit, layer=1)
    want = manual(tiny, CHAT, unit, layer=1)
    assert got[1] is None and want[1] is None
    for a, b in zip(got, want, strict=True):
        assert (a is None and b is None) or math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5)


def test_a_conversation_without_an_assistant_turn_is_refused(tiny):
    with pytest.raises(PersonaxisError, match="no assistant turn"):
        turn_projections(tiny, [{"role": "user", "content": "Hello there"}], torch.ones(tiny.hidden_size), 1)


def test_scripted_conversations_project_every_turn_and_resume(tiny, tmp_path, monkeypatch):
    unit = torch.nn.functional.normalize(torch.randn(tiny.hidden_size), dim=0)
    store = RunStore(tmp_path)
    sampling = Sampling(max_new_tokens=3, temperature=0.7, top_p=0.9)
    results = run_scripted(tiny, conversations(), unit, 2, store, sampling, progress=False)
    assert [len(r.projections) for r in results] == [2, 3]
    assert [m["role"] for m in results[1].messages] == ["user", "assistant"] * 3
    for r in results:
        assert r.projections == pytest.approx(turn_projections(tiny, r.messages, unit, 2))
    generated = []
    original = personaxis.backends.runs.generate_batch

    def counting(model, prompts, *args, **kwargs):
        generated.extend(prompts)
        return original(model, prompts, *args, **kwargs)

    monkeypatch.setattr(personaxis.backends.runs, "generate_batch", counting)
    again = run_scripted(tiny, conversations(), unit, 2, store, sampling, progress=False)
    assert generated == [] and [r.messages for r in again] == [r.messages for r in results]


class ScriptedUser:
    name = "scripted-user"

    def __init__(self, messages):
        self.messages, self.seen = list(messages), []

    def reply(self, messages):
        self.seen.append(messages)
        return self.messages.pop(0)


def test_simulated_user_stops_on_the_end_token(tiny, tmp_path):
    unit = torch.nn.functional.normalize(torch.randn(tiny.hidden_size), dim=0)
    prompt = load_simulated_user()
    user = ScriptedUser(["Tell me more about the waves.", "  END_CONVERSATION  "])
    conversation = conversations()[:1]
    results = run_simulated(
        tiny, conversation, unit, 1, RunStore(tmp_path), Sampling(max_new_tokens=3), user, prompt, turns=5
    )
    result = results[0]
    assert result.ended_by_user and len(result.projections) == 2
    assert [m["content"] for m in result.messages if m["role"] == "user"] == [
        "Hello there 0",
        "Tell me more about the waves.",
    ]
    first = user.seen[0]
    assert first[0]["role"] == "system" and "a sailor" in first[0]["content"]
    assert [m["role"] for m in first[1:]] == ["assistant", "user"]  # the model's reply reaches the user as a user turn
    # finished conversations are stored: a rerun asks the simulated user nothing
    again = run_simulated(
        tiny, conversation, unit, 1, RunStore(tmp_path), Sampling(max_new_tokens=3), ScriptedUser([]), prompt, turns=5
    )
    assert again[0].messages == result.messages


def test_swap_roles():
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert swap_roles("be a user", history) == [
        {"role": "system", "content": "be a user"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "hello"},
    ]


def test_drift_statistics_match_scipy():
    results = [
        DriftResult("t1", "therapy", [], [1.0, 0.5, 0.0]),
        DriftResult("p1", "philosophy", [], [0.8, None, 0.0]),
        DriftResult("c1", "coding", [], [1.0, 1.1, 1.2]),
        DriftResult("w1", "writing", [], [0.9, 1.0]),
        DriftResult("c2", "coding", [], [1.3, 1.2]),
    ]
    s = drift_stats(results)
    away, stay = [1.0, 0.5, 0.0, 0.8, 0.0], [1.0, 1.1, 1.2, 0.9, 1.0, 1.3, 1.2]
    assert s["per_turn"]["n"] == [5, 7]
    assert s["per_turn"]["welch_p"] == pytest.approx(stats.ttest_ind(away, stay, equal_var=False).pvalue)
    assert s["per_turn"]["mannwhitney_p"] == pytest.approx(stats.mannwhitneyu(away, stay).pvalue)
    assert s["per_conversation"]["mean"][0] == pytest.approx((0.5 + 0.4) / 2)
    assert s["domains"]["therapy"]["slope_per_turn"] == pytest.approx(-0.5)
    assert s["domains"]["coding"]["mean"] == pytest.approx(sum([1.0, 1.1, 1.2, 1.3, 1.2]) / 5)
    assert s["paper_direction"] is True
    lonely = drift_stats([DriftResult("t1", "therapy", [], [1.0])])
    assert lonely["per_turn"]["welch_p"] is None and lonely["paper_direction"] is None


def test_drift_counts_replies_that_speak_as_an_ai():
    def chat(*replies):
        return [
            m for text in replies for m in ({"role": "user", "content": "?"}, {"role": "assistant", "content": text})
        ]

    results = [
        DriftResult("p1", "philosophy", chat("As an AI, no.", "", "I ponder."), [3.0, None, 1.0]),
        DriftResult("c1", "coding", chat("Use a loop.", "As an AI language model, I suggest..."), [1.0, 2.0]),
    ]
    s = drift_stats(results)  # the role rubric's patterns
    assert s["domains"]["philosophy"]["as_ai_share"] == pytest.approx(1 / 2)  # the empty turn is not counted
    assert s["domains"]["coding"]["as_ai_share"] == pytest.approx(1 / 2)
    ai = s["as_ai"]
    assert (ai["turns"], ai["of"], ai["mean_projection"]) == (2, 4, [pytest.approx(2.5), pytest.approx(1.0)])
    without = ai["per_conversation_without"]  # each conversation's mean over the turns that do not speak as an AI
    assert without["n"] == [1, 1] and without["mean"] == [pytest.approx(1.0), pytest.approx(1.0)]
    none = drift_stats(results, presents_as_ai=lambda text: False)
    assert none["as_ai"]["turns"] == 0 and none["as_ai"]["mean_projection"][0] is None

"""Capped replay and the projections read while a cap acts."""

import pytest
from axis.axis_helpers import axis_of

from personaxis.axis.calibration import cap_config
from personaxis.axis.drift import turn_projections
from personaxis.axis.replay import capped_turn_projections, replay
from personaxis.errors import PersonaxisError
from personaxis.inference.generation import Sampling


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

"""The official SDK, unchanged, against the server on loopback: plain, streamed, and with the personaxis extension."""

from __future__ import annotations

import math

import openai
import pytest
import torch

from personaxis.inference.generation import prompt_ids

HELLO = [{"role": "user", "content": "Hello, who are you?"}]


@pytest.fixture
def sdk(live):
    url, _ = live
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def test_models(sdk, model):
    assert [m.id for m in sdk.models.list().data] == [model.name]


def test_plain_completion_has_openai_shape_and_telemetry(sdk):
    reply = sdk.chat.completions.create(model="x", messages=HELLO, max_tokens=12, temperature=0)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert isinstance(reply.choices[0].message.content, str)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens == 12 or reply.choices[0].finish_reason == "stop"
    px = reply.model_extra["personaxis"]
    axis = px["monitor"]["axis"]
    assert axis["layer"] == 2 and len(axis["tokens"]) == reply.usage.completion_tokens
    assert axis["mean"] == pytest.approx(sum(axis["tokens"]) / len(axis["tokens"]))
    assert px["cap"] == {"name": None, "source": None, "hits": 0}


def test_stream_matches_plain_and_carries_projections(sdk):
    kwargs = {"model": "x", "messages": HELLO, "max_tokens": 12, "temperature": 0}
    plain = sdk.chat.completions.create(**kwargs)
    chunks = list(sdk.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    per_token = [
        c.model_extra["personaxis"]["token"] for c in chunks if "token" in (c.model_extra.get("personaxis") or {})
    ]
    summary = [c for c in chunks if c.choices and c.choices[0].finish_reason][0].model_extra["personaxis"]
    assert [t["projections"]["axis"] for t in per_token] == pytest.approx(summary["monitor"]["axis"]["tokens"])
    assert summary["monitor"]["axis"]["tokens"] == pytest.approx(
        plain.model_extra["personaxis"]["monitor"]["axis"]["tokens"]
    )
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_projections_match_a_forward_pass(sdk, model, artifacts):
    """Reference: re-run prompt + reply, read block 2's output (hidden_states[3]) and project on the unit axis."""
    chunks = sdk.chat.completions.create(model="x", messages=HELLO, max_tokens=10, temperature=0, stream=True)
    tokens = [c.model_extra["personaxis"]["token"] for c in chunks if "token" in c.model_extra["personaxis"]]
    prompt = prompt_ids(model, HELLO)
    ids = torch.tensor([prompt + [t["id"] for t in tokens]])
    with torch.inference_mode():
        hidden = model.model(ids, output_hidden_states=True).hidden_states[3][0].float()
    expected = (hidden[len(prompt) :] @ artifacts["axis"].unit(2)).tolist()
    assert [t["projections"]["axis"] for t in tokens] == pytest.approx(expected, abs=1e-4)


def test_steering_and_capping_through_extra_body(sdk):
    base = {"model": "x", "messages": HELLO, "max_tokens": 12, "temperature": 0}
    plain = sdk.chat.completions.create(**base)
    steered = sdk.chat.completions.create(
        **base, extra_body={"personaxis": {"steer": [{"vector": "evil", "layers": [1, 2], "coef": 8.0}]}}
    )
    capped = sdk.chat.completions.create(**base, extra_body={"personaxis": {"cap": "default"}})
    inline = sdk.chat.completions.create(
        **base, extra_body={"personaxis": {"cap": {"vector": "axis", "layers": [1, 2], "tau": 100.0}}}
    )
    px = steered.model_extra["personaxis"]
    assert px["steer"] == [{"vector": "evil", "layers": [1, 2], "coef": 8.0, "units": "relative"}]
    assert steered.choices[0].message.content != plain.choices[0].message.content
    for reply, name in ((capped, "default"), (inline, "inline")):
        cap = reply.model_extra["personaxis"]["cap"]
        assert cap["name"] == name and cap["source"] == "request" and cap["hits"] > 0
        # a floor at 100 lifts every monitored projection to at least 100 at the capped layer 2
        assert min(reply.model_extra["personaxis"]["monitor"]["axis"]["tokens"]) >= 100 - 1e-3
    assert capped.choices[0].message.content == inline.choices[0].message.content


def test_multi_direction_artifact_and_monitor_selection(sdk):
    reply = sdk.chat.completions.create(
        model="x",
        messages=HELLO,
        max_tokens=5,
        temperature=0,
        extra_body={"personaxis": {"monitor": ["traits:calm", "evil"], "closed_loop": False}},
    )
    monitor = reply.model_extra["personaxis"]["monitor"]
    assert set(monitor) == {"traits:calm", "evil"}
    assert all(math.isfinite(v) for v in monitor["evil"]["tokens"])


def test_sampling_with_seed_is_reproducible(sdk):
    kwargs = {"model": "x", "messages": HELLO, "max_tokens": 12, "temperature": 0.9, "seed": 7}
    a = sdk.chat.completions.create(**kwargs).choices[0].message.content
    b = sdk.chat.completions.create(**kwargs).choices[0].message.content
    assert a == b

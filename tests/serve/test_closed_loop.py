"""The closed loop: a conversation whose axis projection drops below threshold gets capped from the next turn on."""

from __future__ import annotations

from fastapi.testclient import TestClient
from serve.serving_helpers import make_app

from personaxis.serve import ClosedLoop
from personaxis.serve.loop import ClosedLoop as Policy
from personaxis.serve.loop import Conversations


def turn(client, messages, **personaxis):
    body = {"messages": messages, "max_tokens": 6, "temperature": 0, "personaxis": personaxis}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    return data["choices"][0]["message"]["content"], data["personaxis"]


def test_drift_switches_capping_on_for_the_rest_of_that_conversation(model, artifacts):
    app = make_app(model, artifacts, policy=ClosedLoop(threshold=1e6, window=2))  # every turn is "drifting"
    with TestClient(app) as client:
        history = [{"role": "user", "content": "Hello"}]
        reply, px = turn(client, history, conversation_id="c1")
        assert px["cap"]["source"] is None
        assert [e["type"] for e in px["events"]] == ["alarm", "cap_on"]
        assert px["closed_loop"]["capped"] and px["closed_loop"]["threshold"] == 1e6
        history += [{"role": "assistant", "content": reply}, {"role": "user", "content": "Go on"}]
        _, px = turn(client, history, conversation_id="c1")
        assert px["cap"] == {"name": "default", "source": "closed_loop", "hits": px["cap"]["hits"]}
        assert px["cap"]["hits"] > 0 and px["turn"] == 1
        assert [e["type"] for e in px["events"]] == ["alarm"]  # already capped: no second switch
        # another conversation is untouched until it drifts itself
        _, other = turn(client, [{"role": "user", "content": "Hello"}], conversation_id="c2")
        assert other["cap"]["source"] is None
        # opting out of the loop
        _, off = turn(client, history, conversation_id="c1", closed_loop=False)
        assert off["cap"]["source"] is None and off["closed_loop"] is None
        metrics = client.get("/metrics").text
        assert "personaxis_cap_activations_total 2.0" in metrics
        assert "personaxis_alarms_total 3.0" in metrics
        assert 'personaxis_capped_requests_total{source="closed_loop"} 1.0' in metrics


def test_conversations_without_an_id_are_recognised_by_their_opening(model, artifacts):
    app = make_app(model, artifacts, policy=ClosedLoop(threshold=1e6, window=1))
    with TestClient(app) as client:
        opening = [{"role": "system", "content": "Be a pirate."}, {"role": "user", "content": "Ahoy"}]
        reply, first = turn(client, opening)
        _, second = turn(client, [*opening, {"role": "assistant", "content": reply}, {"role": "user", "content": "Hm"}])
        assert first["conversation_id"] == second["conversation_id"]
        assert second["cap"]["source"] == "closed_loop"


def test_window_mean_and_no_threshold_means_watch_only():
    loop = Conversations(Policy(threshold=0.0, window=2))
    assert loop.record("a", 0, 1.0, can_cap=True)["events"] == []
    verdict = loop.record("a", 1, -3.0, can_cap=True)  # window mean (1 - 3) / 2 = -1 < 0
    assert verdict["window_mean"] == -1.0 and verdict["capped"]
    watch = Conversations(Policy(threshold=None))
    assert watch.record("a", 0, -100.0, can_cap=True) == {
        "capped": False, "window_mean": -100.0, "threshold": None, "window": 2, "events": []
    }  # fmt: skip


def test_metrics_are_prometheus_text(client):
    client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
    text = client.get("/metrics").text
    for name in (
        "personaxis_requests_total",
        "personaxis_generated_tokens_total",
        "personaxis_tokens_per_second",
        'personaxis_turn_projection_bucket{le="0.0",vector="axis"}',
        "personaxis_time_to_first_token_seconds_count",
        "personaxis_queue_depth",
    ):
        assert name in text

"""Bad input gets a clear 4xx in OpenAI's error shape, and the server keeps serving everyone else."""

from __future__ import annotations

import time

import httpx
import pytest
from fastapi.testclient import TestClient
from serve.serving_helpers import make_app, serving

from personaxis.serve import Limits

HELLO = [{"role": "user", "content": "Hello"}]


def ask(client, personaxis=None, **body):
    payload = {"messages": HELLO, "max_tokens": 4, "temperature": 0, **body}
    if personaxis is not None:
        payload["personaxis"] = personaxis
    return client.post("/v1/chat/completions", json=payload)


def error_of(response, status: int) -> str:
    assert response.status_code == status, response.text
    return response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("personaxis", "needle"),
    [
        ({"steer": [{"vector": "nope", "coef": 1.0}]}, "unknown vector 'nope'"),
        ({"monitor": ["nope"]}, "unknown vector 'nope'"),
        ({"cap": "nope"}, "unknown cap 'nope'"),
        ({"cap": {"vector": "nope", "layers": [1], "tau": 1.0}}, "unknown vector 'nope'"),
        ({"steer": [{"vector": "evil", "layer": 99, "coef": 1.0}]}, "no direction at layer 99"),
        ({"steer": [{"vector": "evil", "layer": 1, "layers": [1], "coef": 1.0}]}, "not both"),
        ({"steer": [{"vector": "evil"}]}, "personaxis.steer.0.coef: Field required"),
        ({"steer": [{"vector": "evil", "coef": "lots"}]}, "personaxis.steer.0.coef"),
        ({"steer": [{"vector": "evil", "coef": 1.0, "strength": 2}]}, "personaxis.steer.0.strength"),
        ({"steer": [{"vector": "evil", "coef": 1.0, "units": "parsecs"}]}, "personaxis.steer.0.units"),
        ({"steer": {"vector": "evil", "coef": 1.0}}, "personaxis.steer"),
        ({"steer": [{"vector": "evil", "layers": [], "coef": 1.0}]}, "personaxis.steer.0.layers"),
        ({"cap": {"layers": [1, 2], "tau": [1.0]}}, "1 thresholds for 2 layers"),
        ({"cap": {"layers": [1], "tau": 1.0, "kind": "sideways"}}, "personaxis.cap"),
        ({"path": "/etc/passwd"}, "personaxis.path: Extra inputs are not permitted"),
    ],
)
def test_bad_interventions_are_400(client, personaxis, needle):
    assert needle in error_of(ask(client, personaxis), 400)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"max_tokens": -5}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 10**9}, "above this server's limit of 64"),
        ({"max_completion_tokens": 65}, "above this server's limit"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "last message"),
        ({"temperature": -1}, "temperature"),
        ({"n": 3}, "n"),
    ],
)
def test_bad_openai_fields_are_400(client, body, needle):
    assert needle in error_of(ask(client, **body), 400)


def test_invalid_json_and_non_objects_are_400(client):
    headers = {"content-type": "application/json"}
    assert "not valid JSON" in error_of(client.post("/v1/chat/completions", content=b"{nope", headers=headers), 400)
    assert "JSON object" in error_of(client.post("/v1/chat/completions", content=b"[1, 2]", headers=headers), 400)


def test_oversized_body_is_413(model, artifacts):
    with TestClient(make_app(model, artifacts, limits=Limits(max_body_bytes=2000))) as c:
        big = [{"role": "user", "content": "x" * 5000}]
        assert "above the limit of 2000 bytes" in error_of(ask(c, messages=big), 413)
        assert ask(c).status_code == 200


def test_full_queue_is_429(model, artifacts):
    with TestClient(make_app(model, artifacts, limits=Limits(max_queue=0))) as c:
        assert "queue is full" in error_of(ask(c), 429)


def test_api_key(model, artifacts):
    with TestClient(make_app(model, artifacts, api_key="s3cret")) as c:
        assert "API key" in error_of(ask(c), 401)
        assert error_of(c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert c.get("/metrics").status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/models", headers=auth).status_code == 200
        assert (
            c.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2}, headers=auth).status_code == 200
        )
        assert c.get("/").status_code == 200  # the page itself holds no data; it asks for the key


def test_server_keeps_serving_after_bad_requests(client):
    for bad in ({"steer": [{"vector": "nope", "coef": 1}]}, {"cap": 7}):
        assert ask(client, bad).status_code == 400
    client.post("/v1/chat/completions", content=b"\xff\xfe", headers={"content-type": "application/json"})
    reply = ask(client)
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] is not None


def test_disconnect_stops_generation(model, artifacts):
    app = make_app(model, artifacts, limits=Limits(max_tokens=5000))
    with serving(app) as url:
        body = {"messages": HELLO, "max_tokens": 5000, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 10:
                    break
        deadline = time.monotonic() + 20
        while app.state.worker.decoding and time.monotonic() < deadline:  # the row leaves at its next step
            time.sleep(0.05)
        assert app.state.worker.decoding == 0
        generated = app.state.metrics.registry.get_sample_value("personaxis_generated_tokens_total")
        assert 0 < generated < 1000
        # and the worker is free again
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": HELLO, "max_tokens": 3}, timeout=30)
        assert r.status_code == 200

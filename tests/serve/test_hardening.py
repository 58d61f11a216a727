"""One request never harms another: each is wholly validated before it is tokenised or joins a batch, whatever goes
wrong while one job is served fails that job alone, a large request never stalls the event loop, pathological JSON is
a one-line 400, and the metrics' label values stay bounded whatever paths clients invent."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from serve.serving_helpers import make_app
from serve.test_batching import EXTENSIONS, QUESTIONS, _finish, _job, _registry

import personaxis.serve.chat as app_module
from personaxis.inference.generation import Sampling
from personaxis.serve import Limits
from personaxis.serve.jobs import Job
from personaxis.serve.worker import Worker

HELLO = [{"role": "user", "content": "Hello"}]
CHAT = "/v1/chat/completions"


def error_of(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and error["type"]
    assert "\n" not in error["message"] and error["message"]
    return error["message"]


def post(client, **body) -> httpx.Response:
    """Python's json, which writes NaN and Infinity as JavaScript does (as clients in the wild send them)."""
    payload = json.dumps({"messages": HELLO, "max_tokens": 4, "temperature": 0, **body})
    return client.post(CHAT, content=payload, headers={"content-type": "application/json"})


# -- strict types and ranges ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"max_tokens": True}, "max_tokens: Input should be a valid integer"),
        ({"max_tokens": "3"}, "max_tokens: Input should be a valid integer"),
        ({"max_tokens": 2.0}, "max_tokens: Input should be a valid integer"),
        ({"max_completion_tokens": False}, "max_completion_tokens: Input should be a valid integer"),
        ({"seed": 2**64}, "seed: Input should be less than or equal to 9223372036854775807"),
        ({"seed": -(2**63) - 1}, "seed: Input should be greater than or equal to"),
        ({"seed": "7"}, "seed: Input should be a valid integer"),
        ({"seed": True}, "seed: Input should be a valid integer"),
        ({"temperature": float("nan")}, "temperature: Input should be a finite number"),
        ({"temperature": float("inf")}, "temperature: Input should be a finite number"),
        ({"temperature": "0.5"}, "temperature: Input should be a valid number"),
        ({"temperature": 2.5}, "temperature: Input should be less than or equal to 2"),
        ({"top_p": float("nan")}, "top_p: Input should be a finite number"),
        ({"top_p": 0}, "top_p: Input should be greater than 0"),
        ({"n": True}, "n: Input should be a valid integer"),
        ({"n": 2}, "n: only n=1 is supported"),
        ({"stream": "yes"}, "stream: Input should be a valid boolean"),
        ({"stream": 1}, "stream: Input should be a valid boolean"),
        ({"messages": [{"role": "user", "content": 7}]}, "messages.0.content: Input should be a valid string"),
        ({"messages": [{"role": "user", "content": "\ud800"}]}, "lone surrogate"),
        ({"personaxis": {"steer": [{"vector": "evil", "coef": True}]}}, "personaxis.steer.0.coef"),
        ({"personaxis": {"steer": [{"vector": "evil", "layer": "1", "coef": 1}]}}, "personaxis.steer.0.layer"),
        ({"personaxis": {"steer": [{"vector": "evil", "coef": float("nan")}]}}, "finite number"),
        ({"personaxis": {"closed_loop": "no"}}, "personaxis.closed_loop"),
        ({"personaxis": {"conversation_id": "\udfff"}}, "lone surrogate"),
    ],
)
def test_wrong_types_and_out_of_range_values_are_400(client, body, needle):
    assert needle in error_of(post(client, **body), 400)


def test_a_seed_at_the_edges_of_int64_is_served(client):
    for seed in (2**63 - 1, -(2**63), 0):
        reply = post(client, seed=seed, temperature=1.0)
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] >= 1


def test_an_unknown_path_and_a_wrong_method_keep_the_error_shape(client):
    assert "Not Found" in error_of(client.get("/v1/nothing-here"), 404)
    assert "Method Not Allowed" in error_of(client.get(CHAT), 405)


# -- limits checked before tokenising ---------------------------------------------------------------------------------


def test_too_many_messages_or_characters_are_refused_before_tokenising(model, artifacts, monkeypatch):
    calls = []
    original = app_module.prompt_ids
    monkeypatch.setattr(app_module, "prompt_ids", lambda *a: calls.append(1) or original(*a))
    limits = Limits(max_tokens=64, default_max_tokens=4, max_messages=8, max_prompt_chars=1000)
    with TestClient(make_app(model, artifacts, limits=limits)) as c:
        many = [{"role": "user", "content": "hi"}] * 9
        assert "9 messages, above this server's limit of 8" in error_of(post(c, messages=many), 400)
        long = [
            {"role": "user", "content": "x" * 600},
            {"role": "user", "content": [{"type": "text", "text": "y" * 401}]},
        ]
        assert "1001 characters, above this server's limit of 1000" in error_of(post(c, messages=long), 400)
        assert calls == []
        assert post(c, messages=[{"role": "user", "content": "x" * 990}]).status_code == 200
        assert calls == [1]


def test_20000_messages_are_a_quick_400(client):
    body = {"messages": [{"role": "user", "content": "hello there"}] * 20_000, "max_tokens": 4}
    started = time.perf_counter()
    message = error_of(client.post(CHAT, json=body), 400)
    assert "20000 messages, above this server's limit of 512" in message
    assert time.perf_counter() - started < 2


def test_tokenising_runs_off_the_event_loop(live, monkeypatch):
    """While one request's prompt takes seconds to tokenise, /healthz and a running stream carry on."""
    url, _ = live
    original, started = app_module.prompt_ids, threading.Event()

    def slow(model, messages):
        if messages[-1]["content"] == "slow":
            started.set()
            time.sleep(3)
        return original(model, messages)

    monkeypatch.setattr(app_module, "prompt_ids", slow)
    slow_reply: list[httpx.Response] = []
    thread = threading.Thread(
        target=lambda: slow_reply.append(
            httpx.post(
                f"{url}{CHAT}", json={"messages": [{"role": "user", "content": "slow"}], "max_tokens": 2}, timeout=30
            )  # fmt: skip
        )
    )
    thread.start()
    assert started.wait(10)
    t0 = time.perf_counter()
    assert httpx.get(f"{url}/healthz", timeout=5).json() == {"ok": True}
    assert time.perf_counter() - t0 < 1
    thread.join(30)
    assert slow_reply and slow_reply[0].status_code == 200


# -- pathological JSON ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b'{"max_tokens": ' + b"9" * 5000 + b"}", "a number in it has too many digits"),
        (b'{"messages": [], "x": -' + b"1" * 4301 + b"}", "a number in it has too many digits"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"x": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_001, "nested too deeply"),
        (b'{"messages": "' + b"\xff\xfe" + b'"}', "not UTF-8"),
        (b"\x00\x01\x02garbage", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"NaN", "must be a JSON object"),
    ],
)
def test_pathological_json_is_a_one_line_400_over_a_real_connection(live, body, needle):
    url, _ = live
    response = httpx.post(f"{url}{CHAT}", content=body, headers={"content-type": "application/json"}, timeout=30)
    assert needle in error_of(response, 400)
    assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200


def test_deep_nesting_inside_a_field_is_a_400(client):
    nested: object = 1
    for _ in range(900):  # below json's recursion limit, so that pydantic is the one to see it
        nested = [nested]
    message = error_of(post(client, personaxis={"steer": nested}), 400)
    assert message.startswith("personaxis.steer")


# -- one job's failure stays its own ----------------------------------------------------------------------------------


def _run(model, registry, jobs_of) -> list[tuple]:
    """Submit every job before the worker starts (so they share the first steps); each job's final event."""

    async def main() -> list[tuple]:
        loop = asyncio.get_running_loop()
        worker = Worker(model, registry)
        jobs = jobs_of(loop)
        for job in jobs:
            worker.submit(job)
        worker.start()
        try:
            out = []
            for job in jobs:
                while (event := await job.events.get())[0] == "token":
                    pass
                out.append(event)
            return out
        finally:
            worker.stop()

    return asyncio.run(main())


def _solo(model, registry, question: str, ext: dict, n: int = 20) -> list[int]:
    return _run(model, registry, lambda loop: [_job(model, registry, loop, question, ext, n)])[0][1].token_ids


LENGTHS = (8, 20, 20)  # the first row leaves early, while the others are still decoding


def test_a_seed_the_generator_refuses_fails_its_own_job_only(model, artifacts):
    """The worker's own line of defence (the schema refuses such a seed first): a bad job admitted with good ones."""
    registry = _registry(artifacts)

    def jobs(loop) -> list[Job]:
        good = [_job(model, registry, loop, q, e) for q, e in zip(QUESTIONS[:3], EXTENSIONS[:3], strict=True)]
        bad = _job(model, registry, loop, QUESTIONS[3], {})
        bad.sampling = Sampling(max_new_tokens=8, temperature=1.0, seed=2**64)
        return [good[0], bad, good[1], good[2]]

    events = _run(model, registry, jobs)
    assert events[1][0] == "error" and "generation failed" in events[1][1]
    for event, question, ext in zip([events[0], *events[2:]], QUESTIONS[:3], EXTENSIONS[:3], strict=True):
        assert event[0] == "done"
        assert event[1].token_ids == _solo(model, registry, question, ext)


def _broken_plan(job: Job, layer: int = 1) -> Job:
    """A job whose steering fails inside the model's forward (its vector cannot be copied to the device)."""
    (op,) = job.plan.ops
    broken = dataclasses.replace(op)
    broken.deltas = {layer: torch.empty(op.deltas[layer].shape, device="meta")}
    job.plan = dataclasses.replace(job.plan, ops=[broken])
    return job


def test_a_job_that_fails_in_the_forward_fails_alone(model, artifacts):
    """The failing row is found (prefill: job by job; decode: each row tried alone) and the others are untouched."""
    registry = _registry(artifacts)
    steer = {"steer": [{"vector": "evil", "layer": 1, "coef": 6.0}]}

    def jobs(loop) -> list[Job]:
        good = [_job(model, registry, loop, q, e) for q, e in zip(QUESTIONS[:3], EXTENSIONS[:3], strict=True)]
        return [good[0], _broken_plan(_job(model, registry, loop, QUESTIONS[3], steer)), good[1], good[2]]

    events = _run(model, registry, jobs)
    assert events[1][0] == "error" and "meta" in events[1][1]
    for event, question, ext in zip([events[0], *events[2:]], QUESTIONS[:3], EXTENSIONS[:3], strict=True):
        assert event[0] == "done" and event[1].token_ids == _solo(model, registry, question, ext)


def test_a_row_that_starts_failing_mid_decode_leaves_the_others_decoding(model, artifacts):
    """A row whose op breaks after its prefill (driven step by step, so the timing is exact): the step is rolled back,
    the row leaves with its error, the others' tokens are those of their solo runs."""
    from personaxis.serve.batcher import RunningBatch

    registry = _registry(artifacts)
    steer = {"steer": [{"vector": "evil", "layer": 2, "coef": 6.0}]}
    loop = asyncio.new_event_loop()
    try:
        jobs = [
            _job(model, registry, loop, q, e, n) for q, e, n in zip(QUESTIONS[:3], EXTENSIONS[:3], LENGTHS, strict=True)
        ]
        victim = _job(model, registry, loop, QUESTIONS[3], steer, max_new_tokens=20)
        jobs.insert(1, victim)
        batch = RunningBatch(model, registry)
        batch.admit(jobs)
        for _ in range(3):
            batch.step()
        assert len(batch) == 4
        _broken_plan(victim, layer=2)  # its op fails once the engine scope is rebuilt: when the first row leaves
        while len(batch):
            batch.step()
        batch.close()
    finally:
        loop.close()
    final = {job: event for job, event in batch.outbox if event[0] != "token"}
    assert final[victim][0] == "error" and "meta" in final[victim][1]
    assert sum(1 for job, event in batch.outbox if job is victim and event[0] == "token") >= 3
    others = zip([jobs[0], *jobs[2:]], QUESTIONS[:3], EXTENSIONS[:3], LENGTHS, strict=True)
    for job, question, ext, n in others:
        assert final[job][0] == "done" and final[job][1].token_ids == _solo(model, registry, question, ext, n)


def test_a_step_that_fails_for_every_row_fails_them_all_and_the_worker_goes_on(model, artifacts, monkeypatch):
    """A failure no single row explains reaches every running request, each with the error; later ones are served."""
    from personaxis.serve import batcher

    registry = _registry(artifacts)
    original = batcher.RunningBatch._decode
    monkeypatch.setattr(batcher.RunningBatch, "_decode", lambda self, *a: (_ for _ in ()).throw(MemoryError("boom")))

    async def main() -> tuple[list[tuple], tuple]:
        loop = asyncio.get_running_loop()
        worker = Worker(model, registry)
        jobs = [_job(model, registry, loop, q, {}) for q in QUESTIONS[:2]]
        for job in jobs:
            worker.submit(job)
        worker.start()
        try:
            out = []
            for job in jobs:
                while (event := await job.events.get())[0] == "token":
                    pass
                out.append(event)
            monkeypatch.setattr(batcher.RunningBatch, "_decode", original)
            later = _job(model, registry, loop, QUESTIONS[0], {})
            worker.submit(later)
            return out, ("done", await _finish(later))
        finally:
            worker.stop()

    failed, later = asyncio.run(main())
    assert [e[0] for e in failed] == ["error", "error"] and all("boom" in e[1] for e in failed)
    assert later[1].token_ids == _solo(model, registry, QUESTIONS[0], {})


# -- metrics ----------------------------------------------------------------------------------------------------------


def _series(app) -> int:
    return sum(len(metric.samples) for metric in app.state.metrics.registry.collect())


def test_invented_paths_share_one_metrics_label(model, artifacts):
    with TestClient(make_app(model, artifacts, api_key="k")) as c:
        auth = {"Authorization": "Bearer k"}
        c.get("/v1/models", headers=auth)
        c.get("/v1/nope-0")
        c.get("/v1/nope-0", headers=auth)
        before = _series(c.app)
        for i in range(300):
            c.get(f"/v1/nope-{i}")  # 401: no key
            c.get(f"/v1/nope-{i}/deeper", headers=auth)  # 404
        assert _series(c.app) == before
        sample = c.app.state.metrics.registry.get_sample_value
        assert sample("personaxis_requests_total", {"path": "unmatched", "status": "401"}) == 301
        assert sample("personaxis_requests_total", {"path": "unmatched", "status": "404"}) == 301
        assert sample("personaxis_requests_total", {"path": "/v1/models", "status": "200"}) == 1
        text = c.get("/metrics", headers=auth).text
        assert "nope" not in text

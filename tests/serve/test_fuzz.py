"""Property-based tests: whatever a client sends, the answer is a reply or a 4xx with a one-line message in OpenAI's
error shape, never a 500 nor a dropped connection; and a bad request never changes a well-formed neighbour's reply."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from serve.serving_helpers import make_app, serving
from serve.test_batching import QUESTIONS, _job, _registry
from serve.test_hardening import _run

from personaxis.inference.generation import Sampling
from personaxis.serve import Limits
from personaxis.serve.schema import ChatRequest, explain

CHAT = "/v1/chat/completions"
LIMITS = Limits(max_tokens=8, default_max_tokens=4, max_messages=16, max_prompt_chars=2000)
FIELDS = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "n", "stream",
          "stream_options", "personaxis")  # fmt: skip
EXTENSION_FIELDS = ("steer", "cap", "monitor", "conversation_id", "closed_loop")

numbers = st.one_of(
    st.integers(),
    st.integers(min_value=2**62, max_value=2**70),
    st.integers(min_value=-(2**70), max_value=-(2**62)),
    st.sampled_from([0, 1, -1, 2, 8, 9, 2**63 - 1, 2**63, 2**64, -(2**63), -(2**63) - 1, 10**100]),
    st.floats(),  # NaN and infinities included
    st.sampled_from([0.0, -0.0, 1e-320, 2.0, 2.0000001, 1e308, float("nan"), float("inf"), float("-inf")]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=20), st.sampled_from(["\ud800", "3", "1e9"]))
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
roles = st.sampled_from(["user", "system", "assistant", "developer", "wizard", "", None, 1])
message = st.fixed_dictionaries({"role": roles, "content": st.one_of(st.text(max_size=40), values)})
steer = st.fixed_dictionaries(
    {"vector": st.sampled_from(["evil", "axis", "traits:calm", "nope", ""]) | values, "coef": numbers | values},
    optional={
        "layer": numbers | values,
        "layers": st.lists(numbers, max_size=3) | values,
        "units": st.sampled_from(["relative", "raw", "parsecs"]) | values,
    },  # fmt: skip
)
extension = st.fixed_dictionaries(
    {},
    optional={
        "steer": st.lists(steer, max_size=2) | values,
        "cap": st.sampled_from(["default", "nope"]) | values,
        "monitor": st.lists(st.sampled_from(["axis", "evil", "nope"]), max_size=2) | values,
        "conversation_id": st.text(max_size=10) | values,
        "closed_loop": values,
    },  # fmt: skip
)


@st.composite
def requests(draw: st.DrawFn) -> object:
    """A well-formed request with some fields replaced by arbitrary JSON, or arbitrary JSON outright."""
    base: dict = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3, "temperature": 0}
    if draw(st.booleans()):
        base["personaxis"] = draw(extension)
    if draw(st.integers(0, 9)) == 0:
        return draw(values)
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=3, unique=True)):
        if name == "messages":
            base[name] = draw(st.lists(message, max_size=3) | values)
        elif name == "personaxis":
            base[name] = draw(extension | values)
        else:
            base[name] = draw(numbers | values)
    return base


def _pathological(kind: str, n: int) -> bytes:
    """Valid or nearly valid JSON that is hard on a parser."""
    return {
        "digits": b'{"max_tokens": ' + b"7" * n + b"}",
        "float": b'{"temperature": 1.' + b"0" * n + b"1}",
        "lists": b"[" * n + b"]" * n,
        "objects": b'{"a": ' * n + b"1" + b"}" * n,
        "field": b'{"messages": [{"role": "user", "content": "hi"}], "personaxis": ' + b"[" * n + b"]" * n + b"}",
        "unclosed": b'{"messages": ' + b"[" * n,
        "string": b'{"messages": "' + b"\\ud800" * n + b'"}',
    }[kind]


bodies = st.one_of(
    st.builds(lambda v: json.dumps(v).encode(), requests()),
    st.binary(max_size=200),
    st.builds(
        _pathological,
        st.sampled_from(["digits", "float", "lists", "objects", "field", "unclosed", "string"]),
        st.sampled_from([1, 10, 900, 4301, 5000, 50_000]),
    ),  # fmt: skip
)


def _check(response: httpx.Response) -> None:
    """The property: a reply, or a 4xx whose message is one line, in OpenAI's error shape."""
    assert response.status_code in (200, 400, 413), response.text[:500]
    if response.status_code != 200:
        error = response.json()["error"]
        assert error["code"] == response.status_code and error["type"] == "invalid_request_error"
        assert error["message"] and "\n" not in error["message"]
    elif response.headers["content-type"].startswith("text/event-stream"):
        lines = [line for line in response.text.splitlines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and all('"error"' not in line for line in lines)
    else:
        assert response.json()["object"] == "chat.completion"


@settings(max_examples=300, deadline=None)
@given(requests())
def test_the_schema_refuses_with_a_validation_error_and_one_line(payload):
    """Validation raises nothing but ValidationError, and its explanation is one line."""
    try:
        ChatRequest.model_validate(payload, context=LIMITS)
    except ValidationError as exc:
        line = explain(exc)
        assert line and "\n" not in line


@pytest.fixture(scope="module")
def fuzz_client(model, artifacts):
    with TestClient(make_app(model, artifacts, limits=LIMITS)) as c:
        yield c


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bodies)
def test_the_chat_endpoint_answers_any_body_with_a_reply_or_a_4xx(fuzz_client, body):
    _check(fuzz_client.post(CHAT, content=body, headers={"content-type": "application/json"}))


@pytest.fixture(scope="module")
def fuzz_live(model, artifacts):
    app = make_app(model, artifacts, limits=LIMITS)
    with serving(app) as url:
        yield url


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bodies)
def test_over_a_real_connection_no_body_resets_it(fuzz_live, body):
    """Over TCP: an answer always comes back (httpx raises on a reset or a dropped connection)."""
    _check(httpx.post(f"{fuzz_live}{CHAT}", content=body, headers={"content-type": "application/json"}, timeout=30))


def _ask(url: str, i: int) -> str:
    body = {"messages": [{"role": "user", "content": QUESTIONS[i]}], "max_tokens": 8, "temperature": 0.7, "seed": i}
    response = httpx.post(f"{url}{CHAT}", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(bodies, min_size=1, max_size=3))
def test_bad_requests_riding_with_good_ones_leave_their_replies_alone(fuzz_live, bad):
    """Seeded well-formed requests sent at the same time as fuzzed ones get the replies they get alone."""
    solo = [_ask(fuzz_live, i) for i in range(3)]
    with ThreadPoolExecutor(6) as pool:
        good = [pool.submit(_ask, fuzz_live, i) for i in range(3)]
        noise = [
            pool.submit(
                httpx.post, f"{fuzz_live}{CHAT}", content=b, headers={"content-type": "application/json"}, timeout=30
            )  # fmt: skip
            for b in bad
        ]
        for future in noise:
            _check(future.result())
        assert [f.result() for f in good] == solo


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(min_value=-(2**80), max_value=2**80), position=st.integers(0, 3))
def test_a_job_with_any_seed_leaves_its_batch_alone(model, artifacts, seed, position):
    """The worker's own defence, below the schema: a job with any integer seed rides in the same first step as three
    seeded ones; it is served or fails alone, and theirs equal their solo runs."""
    registry = _registry(artifacts)

    def run(specs: list[tuple[int, int | None]]) -> list[tuple]:
        def jobs_of(loop):
            jobs = []
            for question, job_seed in specs:
                job = _job(model, registry, loop, QUESTIONS[question], {}, 6)
                job.sampling = Sampling(max_new_tokens=6, temperature=0.8, seed=job_seed)
                jobs.append(job)
            return jobs

        return _run(model, registry, jobs_of)

    good = [(0, 11), (1, 12), (2, 13)]
    specs = good[:position] + [(3, seed)] + good[position:]
    events = run(specs)
    assert events[position][0] in ("done", "error")
    others = events[:position] + events[position + 1 :]
    for event, spec in zip(others, good, strict=True):
        assert event[0] == "done"
        assert event[1].token_ids == run([spec])[0][1].token_ids

"""OpenAIJudge against a fake OpenAI-compatible server on loopback whose top_logprobs the tests control."""

import asyncio
import math
import threading
import time
from collections import Counter

import pytest
from loopback import loopback

from personaxis.errors import PersonaxisError
from personaxis.judge import ROLE_ADOPTION_LABELS, OpenAIJudge
from personaxis.store import RunStore

pytest.importorskip("openai")


class FakeEndpoint:
    """Scripted chat completions: the first plan whose marker is in the user message decides each attempt."""

    def __init__(self) -> None:
        self.plans: dict[str, list] = {}
        self.attempts: Counter[str] = Counter()
        self.bodies: list[dict] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.latency = 0.0

    def on(self, marker: str, *steps) -> None:
        """Steps, one per attempt (the last repeats): {token: prob}, an HTTP status int, or ("sleep", s, {...})."""
        self.plans[marker] = list(steps)

    @property
    def requests(self) -> int:
        return sum(self.attempts.values())

    def step(self, body: dict):
        content = body["messages"][-1]["content"]
        marker = next((m for m in self.plans if m in content), None)
        with self.lock:
            self.bodies.append(body)
            n = self.attempts[marker]
            self.attempts[marker] += 1
        steps = self.plans.get(marker, [{}])
        return steps[min(n, len(steps) - 1)]

    def answer(self, body: dict, headers) -> tuple[int, dict]:
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            step = self.step(body)
            time.sleep(self.latency)
            if isinstance(step, tuple):  # ("sleep", seconds, top): answer too late
                time.sleep(step[1])
                step = step[2]
            if isinstance(step, int):
                return step, {"error": {"message": f"status {step}", "type": "server_error"}}
            return 200, completion(body["model"], step)
        finally:
            with self.lock:
                self.in_flight -= 1


def completion(model: str, top: dict[str, float]) -> dict:
    alts = [{"token": t, "logprob": math.log(p), "bytes": list(t.encode())} for t, p in top.items()]
    first = alts[0] if alts else {"token": "", "logprob": 0.0, "bytes": []}
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {
                "index": 0,
                "finish_reason": "length",
                "message": {"role": "assistant", "content": first["token"]},
                "logprobs": {"content": [{**first, "top_logprobs": alts}], "refusal": None},
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11},
    }


@pytest.fixture
def fake():
    endpoint = FakeEndpoint()
    with loopback(endpoint.answer) as endpoint.url:
        yield endpoint


def judge_for(fake, **kw) -> OpenAIJudge:
    kw = {"backoff": 0.01, "max_backoff": 0.05, "timeout": 5.0, "api_key": "test", **kw}
    return OpenAIJudge(fake.url, "judge-model", **kw)


def test_weighted_mean_matches_hand_computation(fake):
    fake.on("Q1", {"70": 0.5, "80": 0.2, " 80": 0.1, "Hello": 0.1, "REFUSAL": 0.05, "101": 0.02, "07": 0.01})
    [result] = judge_for(fake).score(["Q1: rate this"])
    # numeric: 70 → 0.5, 80 → 0.2 + 0.1; "101" is out of range and "07" is not a canonical integer
    assert result.numeric_mass == pytest.approx(0.8)
    assert result.value == pytest.approx((70 * 0.5 + 80 * 0.3) / 0.8)
    assert result.raw == "70" and not result.failed


def test_request_asks_for_one_greedy_token_with_top_logprobs(fake):
    fake.on("Q", {"50": 0.9})
    judge_for(fake).score_trait("Rate evil. {question} / {answer}", "Q?", "A.")
    [body] = fake.bodies
    assert body["model"] == "judge-model"
    assert body["max_tokens"] == 1 and body["temperature"] == 0
    assert body["logprobs"] is True and body["top_logprobs"] == 20
    assert body["messages"] == [{"role": "user", "content": "Rate evil. Q? / A."}]


def test_low_numeric_mass_is_undefined(fake):
    fake.on("LOW", {"REFUSAL": 0.7, "90": 0.2, "10": 0.04})
    fake.on("OK", {"REFUSAL": 0.7, "90": 0.3})
    fake.on("NONE", {"I": 0.6, "Sorry": 0.3})
    judge = judge_for(fake)
    low, ok, none = judge.score(["LOW", "OK", "NONE"])
    assert low.value is None and low.numeric_mass == pytest.approx(0.24) and not low.failed
    assert ok.value == pytest.approx(90.0)
    assert none.value is None and none.numeric_mass == 0.0
    assert (judge.stats.scored, judge.stats.undefined, judge.stats.failures) == (1, 2, 0)


def test_retries_server_errors_then_scores(fake):
    fake.on("FLAKY", 500, 503, {"40": 1.0})
    judge = judge_for(fake)
    [result] = judge.score(["FLAKY"])
    assert result.value == pytest.approx(40.0)
    assert fake.attempts["FLAKY"] == 3 and judge.stats.retries == 2


def test_retries_timeouts(fake):
    fake.on("SLOW", ("sleep", 1.0, {"60": 1.0}), {"60": 1.0})
    judge = judge_for(fake, timeout=0.2)
    [result] = judge.score(["SLOW"])
    assert result.value == pytest.approx(60.0)
    assert judge.stats.retries >= 1 and judge.stats.failures == 0


def test_gives_up_after_max_retries_and_goes_on(fake):
    fake.on("DEAD", 500)
    fake.on("BAD", 400)  # not retryable: fails at once
    fake.on("FINE", {"20": 1.0})
    judge = judge_for(fake, max_retries=2)
    dead, bad, fine = judge.score(["DEAD", "BAD", "FINE"])
    assert dead.failed and dead.value is None and "500" in dead.error
    assert bad.failed and bad.value is None and fake.attempts["BAD"] == 1
    assert fine.value == pytest.approx(20.0)
    assert fake.attempts["DEAD"] == 3
    assert (judge.stats.failures, judge.stats.retries, judge.stats.scored, judge.stats.undefined) == (2, 2, 1, 0)


def test_bad_credentials_stop_the_run(fake):
    fake.on("X", 401)
    with pytest.raises(PersonaxisError, match="401"):
        judge_for(fake).score(["X", "X again"])


def test_cache_answers_without_requests(fake, tmp_path):
    fake.on("A", {"30": 0.5, "40": 0.5})
    fake.on("B", {"nope": 1.0})
    fake.on("C", 500)
    first = judge_for(fake, cache=tmp_path / "cache", max_retries=0).score(["A", "B", "C"])
    assert fake.requests == 3
    again = judge_for(fake, cache=RunStore(tmp_path / "cache"), max_retries=0)
    second = again.score(["A", "B", "C"])
    assert fake.requests == 4  # only the failed prompt is asked again
    assert [r.value for r in second] == [r.value for r in first]
    assert second[0].value == pytest.approx(35.0) and second[1].value is None
    assert again.stats.cache_hits == 2 and again.stats.requests == 1
    other = judge_for(fake, cache=tmp_path / "cache", judge_id="another judge")
    other.score(["A"])
    assert fake.requests == 5  # a different judge does not reuse the cache


def test_repeated_prompt_is_asked_once(fake):
    fake.on("SAME", {"10": 1.0})
    judge = judge_for(fake)
    results = judge.score(["SAME", "SAME", "SAME"])
    assert [r.value for r in results] == pytest.approx([10.0] * 3)
    assert fake.requests == 1 and judge.stats.requests == 1 and judge.stats.scored == 3


def test_concurrency_is_bounded(fake):
    fake.latency = 0.05
    fake.on("P", {"50": 1.0})
    judge = judge_for(fake, concurrency=3)
    results = judge.score([f"P{i}" for i in range(12)])
    assert all(r.value == pytest.approx(50.0) for r in results)
    assert 1 < fake.max_in_flight <= 3


def test_classify(fake):
    fake.on("ROLE", {"3": 0.6, "2": 0.3, "x": 0.1})
    fake.on("UNSURE", {"x": 0.9, "1": 0.1})
    judge = judge_for(fake)
    assert judge.classify("ROLE: did it play the pirate?", ROLE_ADOPTION_LABELS) == ROLE_ADOPTION_LABELS[3]
    assert judge.classify("UNSURE", ROLE_ADOPTION_LABELS) is None
    [result] = judge.classify_many(["ROLE"], ["a", "b", "c"])  # "3" is not an option among three
    assert result.index == 2 and result.probs == pytest.approx((0.0, 0.0, 0.3))
    assert "0: a\n1: b\n2: c" in fake.bodies[-1]["messages"][0]["content"]


def test_sync_call_inside_a_running_event_loop(fake):
    fake.on("LOOP", {"10": 1.0})
    judge = judge_for(fake)

    async def main():
        return judge.score(["LOOP"])

    assert asyncio.run(main())[0].value == pytest.approx(10.0)


def test_no_logprobs_is_a_failure(fake, monkeypatch):
    fake.on("NOLP", {"10": 1.0})
    original = completion

    def without_logprobs(model, top):
        payload = original(model, top)
        payload["choices"][0]["logprobs"] = None
        return payload

    monkeypatch.setitem(globals(), "completion", without_logprobs)
    [result] = judge_for(fake).score(["NOLP"])
    assert result.failed and "no logprobs" in result.error

"""OpenAIBackend against a fake OpenAI-compatible server on loopback that fails, stalls and answers empty."""

import pytest
import torch
from backends.helpers import FakeOpenAI, fake_reply

from personaxis.backends import OpenAIBackend
from personaxis.backends.runs import Rollout, run_rollouts
from personaxis.errors import PersonaxisError
from personaxis.inference.capture import encode_means
from personaxis.inference.generation import Sampling
from personaxis.store import RunStore

pytest.importorskip("openai")

LAYERS = [1, 3]
CAPTURES = ("response", "prompt", "last_prompt")


def rollouts(*prompts: str) -> list[Rollout]:
    return [
        Rollout.make(
            f"r{i}",
            [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": p}],
            Sampling(max_new_tokens=6, temperature=0.7, top_p=0.9, seed=100 + i),
        )
        for i, p in enumerate(prompts)
    ]


def backend(fake: FakeOpenAI, tiny, **kwargs) -> OpenAIBackend:
    options = {"concurrency": 3, "max_retries": 3, "timeout": 1.0, "backoff": 0.01, "batch_size": 2} | kwargs
    return OpenAIBackend(fake.base_url, fake.model, tiny, LAYERS, CAPTURES, **options)


def test_replies_and_second_pass_capture(tiny, tmp_path):
    items = rollouts("Hello there", "Tell me about the sea", "What is the capital?", "Ahoy", "Fine, thank you")
    with FakeOpenAI() as fake:
        b = backend(fake, tiny)
        records = run_rollouts(RunStore(tmp_path), items, b, progress=False)
    assert b.stats.requests == 5 and b.stats.retries == 0 and not b.stats.failed
    assert fake.max_in_flight <= 3
    index = {r.messages[-1][1]: k for k, r in enumerate(items)}
    for body in fake.bodies:  # every request carries its own sampling settings
        i = index[body["messages"][-1]["content"]]
        assert (body["seed"], body["temperature"], body["top_p"], body["max_tokens"]) == (100 + i, 0.7, 0.9, 6)
    chats = []
    for r in items:
        text, finish = fake_reply({"messages": r.chat, "seed": r.sampling.seed, "temperature": 0.7, "top_p": 0.9,
                                   "max_tokens": 6})  # fmt: skip
        record = records[r.id]
        assert (record.data["text"], record.data["finish_reason"]) == (text, finish)
        assert record.data["n_tokens"] == len(text.split())
        chats.append([*r.chat, {"role": "assistant", "content": text}])
    expected = encode_means(tiny, chats, LAYERS, CAPTURES)  # the second pass equals re-encoding the chat
    for j, r in enumerate(items):
        for a, name in enumerate(CAPTURES):
            torch.testing.assert_close(records[r.id].tensors[name], expected[j, a])


def test_faults_are_retried_counted_and_left_pending(tiny, tmp_path):
    store = RunStore(tmp_path)
    items = rollouts("Hello there", "flaky question", "stall please", "broken request", "empty answer", "Ahoy")
    with FakeOpenAI(stall=3.0) as fake:
        b = backend(fake, tiny)
        with pytest.raises(PersonaxisError, match="1 of 6 samples got no result.*run again"):
            run_rollouts(store, items, b, progress=False)
        assert b.stats.retries == 2 + 1 + 3  # flaky twice, the stall once, broken until the budget ran out
        assert set(b.stats.failed) == {"r3"} and "500" in b.stats.failed["r3"]
        assert store.count("rollouts") == 5  # the broken one was not written, not even as an empty result
        assert fake.attempts["broken request"] == 4

        empty = [rec for _, rec in store.items("rollouts") if rec.data["id"] == "r4"][0]
        assert empty.data["text"] == "" and empty.tensors["response"].isnan().all()
        prompt_only = encode_means(tiny, [[*items[4].chat, {"role": "assistant", "content": "x"}]], LAYERS, CAPTURES)
        torch.testing.assert_close(empty.tensors["prompt"], prompt_only[0, 1])  # same prompt tokens either way
        torch.testing.assert_close(empty.tensors["last_prompt"], prompt_only[0, 2])

        fake.heal()
        before = len(fake.bodies)
        records = run_rollouts(store, items, b, progress=False)  # the next run asks only for what is missing
        assert len(fake.bodies) - before == 1 and not b.stats.failed
        assert records["r3"].data["text"] == fake_reply(fake.bodies[-1])[0]
        assert store.count("rollouts") == 6


def test_errors_that_fail_every_request_stop_at_once(tiny, tmp_path):
    store = RunStore(tmp_path)
    with FakeOpenAI(key="secret") as fake:
        with pytest.raises(PersonaxisError, match="refused model.*401"):
            run_rollouts(store, rollouts(*["Hello"] * 20), backend(fake, tiny), progress=False)
        assert len(fake.bodies) == 0 and store.count("rollouts") == 0
        wrong = OpenAIBackend(fake.base_url, "other-model", tiny, LAYERS, api_key="secret", max_retries=3)
        with pytest.raises(PersonaxisError, match="refused model 'other-model'.*404"):
            run_rollouts(store, rollouts("Hello"), wrong, progress=False)


def test_unreachable_server_is_retried_then_reported(tiny, tmp_path):
    with FakeOpenAI() as fake:
        url = fake.base_url  # a port that nothing listens on once the server is gone
    b = OpenAIBackend(url, "m", tiny, LAYERS, max_retries=2, backoff=0.01, timeout=1.0)
    with pytest.raises(PersonaxisError, match="2 of 2 samples got no result"):
        run_rollouts(RunStore(tmp_path), rollouts("a", "b"), b, progress=False)
    assert b.stats.requests == 6 and b.stats.retries == 4 and len(b.stats.failed) == 2


def test_identity_names_the_served_model(tiny):
    b = OpenAIBackend("http://127.0.0.1:1/v1", "served", tiny, LAYERS, CAPTURES)
    assert b.identity()["generator"] == "openai-compatible:served"
    assert b.identity()["model"] == tiny.name and b.identity()["layers"] == LAYERS

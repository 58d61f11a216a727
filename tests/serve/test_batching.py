"""Continuous batching: requests join and leave a running batch, each with its own interventions, and a greedy
request's tokens never depend on who it shares the batch with."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
import transformers as tf

from personaxis.errors import PersonaxisError
from personaxis.inference.generation import Sampling, generate_batch, prompt_ids
from personaxis.inference.plan import Registry, make_plan
from personaxis.model import ChatModel
from personaxis.serve.jobs import Job
from personaxis.serve.schema import Extension
from personaxis.serve.worker import Worker

QUESTIONS = ["Hello there", "What is the capital of France?", "Tell me about the sea and the waves and the wind", "Hi"]
EXTENSIONS = [
    {},
    {"steer": [{"vector": "evil", "layer": 1, "coef": 6.0}]},
    {"cap": "default"},
    {"steer": [{"vector": "traits:witty", "layers": [0, 3], "coef": -3.0, "units": "raw"}], "monitor": ["evil"]},
]


def _job(model, registry, loop, question: str, ext: dict, max_new_tokens: int = 20) -> Job:
    plan = make_plan(registry, Extension.model_validate(ext), model.n_layers)
    return Job(prompt_ids(model, [{"role": "user", "content": question}]), Sampling(max_new_tokens), plan, loop)


async def _finish(job: Job):
    """The job's Generation, once its "done" event arrives."""
    while (event := await job.events.get())[0] != "done":
        assert event[0] == "token", event
    return event[1]


def _run_jobs(model, registry, specs, max_batch=16) -> tuple[list[list[int]], list[int]]:
    """Submit every job before the worker starts, so the first step holds them all; return tokens and step sizes."""
    sizes: list[int] = []

    async def main() -> list[list[int]]:
        loop = asyncio.get_running_loop()
        worker = Worker(model, registry, max_batch=max_batch, on_batch=lambda n, t, s: sizes.append(n))
        jobs = [_job(model, registry, loop, question, ext) for question, ext in specs]
        for job in jobs:
            worker.submit(job)
        worker.start()
        out = [(await _finish(job)).token_ids for job in jobs]
        worker.stop()
        return out

    return asyncio.run(main()), sizes


def _registry(artifacts) -> Registry:
    return Registry.build(axis=artifacts["axis"], vectors=artifacts["vectors"], caps=artifacts["caps"])


def test_greedy_tokens_are_the_same_alone_and_in_a_mixed_batch(model, artifacts):
    registry = _registry(artifacts)
    specs = list(zip(QUESTIONS, EXTENSIONS, strict=True))
    together, sizes = _run_jobs(model, registry, specs)
    assert sizes[0] == len(specs)
    alone = [_run_jobs(model, registry, [spec])[0][0] for spec in specs]
    assert together == alone
    assert len({tuple(t) for t in together}) == len(specs)  # the interventions did change the replies


def test_concurrent_http_requests_match_their_solo_replies(live):
    url, app = live

    def ask(i: int) -> str:
        body = {
            "messages": [{"role": "user", "content": QUESTIONS[i % 4]}],
            "max_tokens": 16,
            "temperature": 0,
            "personaxis": EXTENSIONS[i % 4],
        }
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"]

    solo = [ask(i) for i in range(4)]
    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(ask, range(12)))
    assert together == [solo[i % 4] for i in range(12)]
    # several requests did share a batch
    sample = app.state.metrics.registry.get_sample_value
    assert sample("personaxis_batch_size_sum") > sample("personaxis_batch_size_count")


def test_requests_join_a_running_batch_and_keep_their_tokens(model, artifacts):
    """B and C arrive while A is decoding: they join its batch at once, and every reply equals its solo reply."""
    registry = _registry(artifacts)
    specs = [(QUESTIONS[2], EXTENSIONS[3], 40), (QUESTIONS[1], EXTENSIONS[1], 12), (QUESTIONS[0], EXTENSIONS[2], 30)]
    sizes: list[int] = []

    async def main():
        loop = asyncio.get_running_loop()
        worker = Worker(model, registry, on_batch=lambda n, t, s: sizes.append(n))
        assert worker.continuous
        first = _job(model, registry, loop, *specs[0])
        worker.submit(first)
        worker.start()
        for _ in range(5):  # A is well into its reply
            assert (await first.events.get())[0] == "token"
        late = [_job(model, registry, loop, *spec) for spec in specs[1:]]
        for job in late:
            worker.submit(job)
        out = [await _finish(job) for job in (first, *late)]
        worker.stop()
        return out

    together = asyncio.run(main())
    assert sizes[:5] == [1] * 5 and 3 in sizes  # A ran alone, then all three shared steps
    assert sizes[-1] == 1  # A, the longest, finished alone: finished rows leave the batch
    for (question, ext, n), got in zip(specs, together, strict=True):
        solo = asyncio.run(_solo(model, registry, question, ext, n))
        assert got.token_ids == solo.token_ids and len(got.token_ids) > 5
        for name, values in got.projections.items():
            assert torch.allclose(values, solo.projections[name], atol=1e-5), name


async def _solo(model, registry, question, ext, n):
    worker = Worker(model, registry)
    job = _job(model, registry, asyncio.get_running_loop(), question, ext, n)
    worker.submit(job)
    worker.start()
    try:
        return await _finish(job)
    finally:
        worker.stop()


def test_continuous_batch_matches_batch_generation(model, artifacts):
    """The server's decode path and the pipelines' `generate_batch` give the same tokens, projections and cap hits."""
    registry = _registry(artifacts)
    ext = {"steer": [{"vector": "evil", "layer": 1, "coef": 6.0}], "cap": "default", "monitor": ["axis", "evil"]}
    got = asyncio.run(_solo(model, registry, QUESTIONS[2], ext, 16))
    plan = make_plan(registry, Extension.model_validate(ext), model.n_layers)
    ops = plan.ops_for_row(0) + [registry.monitor_op(name) for name in plan.monitor]
    prompt = prompt_ids(model, [{"role": "user", "content": QUESTIONS[2]}])
    (want,) = generate_batch(model, [prompt], Sampling(max_new_tokens=16), ops=ops)
    assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason
    assert got.cap_hits == want.cap_hits > 0
    for name in plan.monitor:
        expected = want.projections[f"monitor:{name}"]
        assert torch.allclose(got.projections[f"monitor:{name}"], expected, atol=1e-5), name


def test_a_sliding_window_model_falls_back_to_whole_batches(tokenizer, artifacts):
    """A cache that cannot be spliced is not: such a model is served in batches that start and finish together."""
    torch.manual_seed(0)
    config = tf.MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, sliding_window=16)  # fmt: skip
    mistral = ChatModel(model=tf.MistralForCausalLM(config).eval(), tokenizer=tokenizer, name="tiny-mistral")
    registry = _registry(artifacts)
    assert not Worker(mistral, registry).continuous
    with pytest.raises(PersonaxisError, match="tiny-mistral: batch-invariant decoding needs"):
        Worker(mistral, registry, batch_invariant=True)
    specs = list(zip(QUESTIONS, EXTENSIONS, strict=True))
    together, sizes = _run_jobs(mistral, registry, specs)
    assert sizes == [len(specs)]
    assert together == [_run_jobs(mistral, registry, [spec])[0][0] for spec in specs]

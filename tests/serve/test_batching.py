"""Dynamic batching: requests waiting when a batch starts decode together, each with its own interventions."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import httpx

from personaxis.generate import Sampling, prompt_ids
from personaxis.serve.plan import Registry, make_plan
from personaxis.serve.schema import Extension
from personaxis.serve.worker import Job, Worker

QUESTIONS = ["Hello there", "What is the capital of France?", "Tell me about the sea and the waves and the wind", "Hi"]
EXTENSIONS = [
    {},
    {"steer": [{"vector": "evil", "layer": 1, "coef": 6.0}]},
    {"cap": "default"},
    {"steer": [{"vector": "traits:witty", "layers": [0, 3], "coef": -3.0, "units": "raw"}], "monitor": ["evil"]},
]


def _run_jobs(model, registry, specs, max_batch=16) -> tuple[list[list[int]], list[int]]:
    """Submit every job before the worker starts, so the first batch holds them all; return tokens and batch sizes."""
    sizes: list[int] = []

    async def main() -> list[list[int]]:
        loop = asyncio.get_running_loop()
        worker = Worker(model, registry, max_batch=max_batch, on_batch=lambda n, t, s: sizes.append(n))
        jobs = []
        for question, ext in specs:
            plan = make_plan(registry, Extension.model_validate(ext), model.n_layers)
            prompt = prompt_ids(model, [{"role": "user", "content": question}])
            jobs.append(Job(prompt, Sampling(max_new_tokens=20), plan, loop))
            worker.submit(jobs[-1])
        worker.start()
        out = []
        for job in jobs:
            while (event := await job.events.get())[0] != "done":
                pass
            out.append(event[1].token_ids)
        worker.stop()
        return out

    return asyncio.run(main()), sizes


def test_greedy_tokens_are_the_same_alone_and_in_a_mixed_batch(model, artifacts):
    registry = Registry.build(axis=artifacts["axis"], vectors=artifacts["vectors"], caps=artifacts["caps"])
    specs = list(zip(QUESTIONS, EXTENSIONS, strict=True))
    together, sizes = _run_jobs(model, registry, specs)
    assert sizes == [len(specs)]
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

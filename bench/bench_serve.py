"""Serving benchmark: throughput with 1, 4 and 8 streaming clients, time to first token, and a mixed-load run.

The server runs in its own process on loopback, as it does in production (clients never share its interpreter, its
GIL or its event loop); the clients run here. The load run sends N greedy requests from 16 concurrent
clients, each with one of a few intervention mixes (none, steering, a cap, both), and compares every reply with the
same request served alone: dynamic batching must not change a single token.

The steering directions here are seeded random unit directions (the bench needs interventions, not meaningful ones).

    python bench/bench_serve.py [--model default] [--dtype auto] [--n 1000] [--max-tokens 64]
    python bench/bench_serve.py --model random:qwen2-7b --device cuda --dtype bfloat16 --n 0   # GPU, random weights
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import platform
import socket
import statistics
import time
from multiprocessing.connection import Connection

import httpx
import torch
import uvicorn
from common import RANDOM_CONFIGS, bench_model

from personaxis.serve import Limits, create_app
from personaxis.vectors.artifact import VectorMeta, Vectors
from personaxis.vectors.cap import CapConfig

QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Explain what a prime number is.",
    "Write a haiku about the sea.",
    "How do I reverse a list in Python?",
    "Who are you?",
]


def synthetic(model) -> tuple[Vectors, CapConfig]:
    g = torch.Generator().manual_seed(0)
    n, h = model.n_layers, model.hidden_size
    meta = VectorMeta(model_id=model.name, hidden_size=h, n_layers=n, method="random (bench)", points_toward="none",
                      extra={"layer": n // 2})  # fmt: skip
    vec = Vectors(range(n), {"r1": torch.randn(n, h, generator=g), "r2": torch.randn(n, h, generator=g)}, meta)
    window = list(range(n // 2, min(n, n // 2 + 4)))
    return vec, CapConfig.from_vectors(vec, {i: 2.0 for i in window}, name="r1")


def mixes(n_layers: int) -> list[dict]:
    mid = n_layers // 2
    return [
        {},
        {"steer": [{"vector": "bench:r1", "layer": mid, "coef": 6.0, "units": "raw"}]},
        {"cap": "default"},
        {"steer": [{"vector": "bench:r2", "layers": [mid - 2, mid], "coef": -4.0, "units": "raw"}], "cap": "default"},
    ]


def serve(args: argparse.Namespace, port: int, info: Connection) -> None:
    """The server process: load the model, send what the report needs, serve until terminated."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = bench_model(args.model, device, args.dtype if args.dtype == "auto" else getattr(torch, args.dtype))
    vectors, cap = synthetic(model)
    app = create_app(model, vectors={"bench": vectors}, caps=cap, limits=Limits(max_queue=256, max_batch=16),
                     batch_invariant=args.batch_invariant)  # fmt: skip
    where = (
        torch.cuda.get_device_name()
        if model.device.type == "cuda"
        else f"CPU ({platform.processor() or 'cpu'}, {torch.get_num_threads()} threads)"
    )
    invariant = "batch-invariant" if app.state.worker.batch_invariant else "not batch-invariant"
    info.send({"name": model.name, "dtype": f"{model.dtype} · {invariant}", "device": where,
               "n_layers": model.n_layers})  # fmt: skip
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def start(args: argparse.Namespace) -> tuple[multiprocessing.Process, str, dict]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mine, theirs = multiprocessing.Pipe()
    process = multiprocessing.get_context("spawn").Process(target=serve, args=(args, port, theirs), daemon=True)
    process.start()
    info, url = mine.recv(), f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return process, url, info
        except httpx.TransportError:
            time.sleep(0.2)


async def stream_once(client: httpx.AsyncClient, body: dict) -> tuple[int, float, str]:
    """(reply tokens, seconds to first token, text) of one streamed request."""
    import json

    t0, ttft, tokens, text = time.perf_counter(), None, 0, []
    async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "token" in (chunk.get("personaxis") or {}):
                tokens += 1
                ttft = ttft if ttft is not None else time.perf_counter() - t0
            if chunk["choices"]:
                text.append(chunk["choices"][0]["delta"].get("content") or "")
    return tokens, ttft or 0.0, "".join(text)


async def throughput(url: str, clients: int, per_client: int, max_tokens: int) -> tuple[float, list[float]]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def one(c: int) -> list[tuple[int, float]]:
            out = []
            for k in range(per_client):
                q = QUESTIONS[(c + k) % len(QUESTIONS)]
                body = {"messages": [{"role": "user", "content": q}], "max_tokens": max_tokens, "temperature": 0,
                        "personaxis": {"monitor": []}}  # fmt: skip
                n, ttft, _ = await stream_once(client, body)
                out.append((n, ttft))
            return out

        t0 = time.perf_counter()
        results = [x for xs in await asyncio.gather(*(one(c) for c in range(clients))) for x in xs]
        wall = time.perf_counter() - t0
    return sum(n for n, _ in results) / wall, [t for _, t in results]


async def load(url: str, n_layers: int, n: int, concurrency: int, max_tokens: int) -> dict:
    specs = [(q, m) for q in QUESTIONS for m in mixes(n_layers)]

    def body(i: int) -> dict:
        q, mix = specs[i % len(specs)]
        return {"messages": [{"role": "user", "content": q}], "max_tokens": max_tokens, "temperature": 0,
                "personaxis": mix}  # fmt: skip

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def ask(i: int) -> str:
            r = await client.post("/v1/chat/completions", json=body(i))
            r.raise_for_status()
            return r.json()["choices"][0]["message"]["content"]

        alone = [await ask(i) for i in range(len(specs))]
        queue = asyncio.Queue()
        for i in range(n):
            queue.put_nowait(i)
        errors, differ = [], 0

        async def worker() -> None:
            nonlocal differ
            while not queue.empty():
                i = queue.get_nowait()
                try:
                    if await ask(i) != alone[i % len(specs)]:
                        differ += 1
                except Exception as exc:  # counted, not raised: the run measures how many fail
                    errors.append(repr(exc))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"n": n, "errors": len(errors), "differ": differ, "wall": wall, "first_error": errors[:1]}


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    randoms = ", ".join(RANDOM_CONFIGS)
    parser.add_argument("--model", default="default", help=f"a model spec, or random weights: {randoms}")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="auto", help="auto: what `personaxis serve` loads (bf16 on a CPU)")
    parser.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=None,
                        help="as `personaxis serve --batch-invariant` (default: on a CPU)")  # fmt: skip
    parser.add_argument("--n", type=int, default=1000, help="requests in the load run (0: skip it)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64, help="reply length in the throughput runs")
    parser.add_argument("--load-tokens", type=int, default=24, help="reply length in the load run")
    parser.add_argument("--per-client", type=int, default=4, help="requests per client in the throughput runs")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the 1/4/8-client runs")
    args = parser.parse_args()

    server, url, info = start(args)
    print(f"model {info['name']} · {info['dtype']} · {info['device']} · server in its own process")
    try:
        asyncio.run(throughput(url, 1, 1, 8))  # warm-up
        # rounds of 1, 4 and 8 clients, interleaved, so that a slow spell of a shared machine hits every setting
        rates: dict[int, list[float]] = {1: [], 4: [], 8: []}
        ttfts: dict[int, list[float]] = {1: [], 4: [], 8: []}
        for _ in range(args.rounds):
            for clients in rates:
                rate, times = asyncio.run(throughput(url, clients, args.per_client, args.max_tokens))
                rates[clients].append(rate)
                ttfts[clients] += times
        for clients, values in rates.items():
            print(f"{clients} streaming clients: {statistics.median(values):8.1f} tok/s aggregate (median of "
                  f"{' / '.join(f'{v:.1f}' for v in values)}) · TTFT p50 {pct(ttfts[clients], 50) * 1000:6.0f} ms, "
                  f"p95 {pct(ttfts[clients], 95) * 1000:6.0f} ms")  # fmt: skip
        per_round = [eight / one for eight, one in zip(rates[8], rates[1], strict=True)]
        median = {clients: statistics.median(values) for clients, values in rates.items()}
        print(f"scaling (ratio of medians): 4 clients {median[4] / median[1]:.2f}× · 8 clients "
              f"{median[8] / median[1]:.2f}× of 1 (goal 8 ≥ 4×); 8 vs 1 per round: "
              f"{', '.join(f'{r:.2f}×' for r in per_round)}")  # fmt: skip
        if not args.n:
            return
        result = asyncio.run(load(url, info["n_layers"], args.n, args.concurrency, args.load_tokens))
        print(f"load: {result['n']} greedy requests, {args.concurrency} concurrent, mixed interventions, "
              f"{args.load_tokens} tokens: {result['errors']} errors, {result['differ']} differ from the same request "
              f"alone · {result['wall']:.1f} s ({result['n'] / result['wall']:.1f} req/s)")  # fmt: skip
        if result["first_error"]:
            print("first error:", result["first_error"][0])
    finally:
        server.terminate()
        server.join(timeout=30)


if __name__ == "__main__":
    main()

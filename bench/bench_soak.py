"""Soak benchmark: well-formed streaming clients, alone and then alongside a stream of abusive requests.

The server runs in its own process on loopback (as in bench_serve.py). Three phases, each the same well-formed load
(`--clients` concurrent streaming clients, `--requests` greedy requests each): before, during and after a fixed count
of abusive requests sent by `--abusers` concurrent tasks, cycling through: a seed beyond int64, NaN temperature,
`"max_tokens": true`, a 5000-digit integer, 100,000 levels of nesting, 20,000 messages in one body, a body over the
size limit, random bytes, invented `/v1/...` paths (with and without the key), slow readers (a stream read a line
every 0.2 s, then dropped), clients that disconnect mid-stream, and a body trickled in slowly. A second abuse round
(other random paths, no well-formed load) follows, to show that memory and the metrics stay flat.

Reported: p50/p95 request latency and time to first token of the well-formed clients in each phase and their ratio
to the first phase, errors the well-formed clients saw (goal 0), the abusive requests' answers by kind (goal: no
5xx), the server's RSS and its number of Prometheus series at the start and after each abuse round (goal: flat), and the
/healthz round trip during the abuse.

    python bench/bench_soak.py [--model tiny] [--clients 4] [--requests 12] [--abuse 400] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import random
import socket
import statistics
import sys
import time
from collections import Counter
from multiprocessing.connection import Connection
from pathlib import Path

import httpx
import torch
import uvicorn

from personaxis.model import ChatModel
from personaxis.serve import Limits, create_app

QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Explain what a prime number is.",
    "Write a haiku about the sea.",
]
KEY = "soak-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {"content-type": "application/json", **AUTH}


def load(spec: str) -> ChatModel:
    if spec == "tiny":  # the tests' 4-block random Llama: the bench measures the server, not the model
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tiny import build_tokenizer, tiny_llama

        tokenizer = build_tokenizer()
        return ChatModel(model=tiny_llama(len(tokenizer)), tokenizer=tokenizer, name="tiny-llama (random)")
    from personaxis.model import load_model

    return load_model(spec)


def serve(spec: str, port: int, info: Connection) -> None:
    model = load(spec)
    app = create_app(model, api_key=KEY, limits=Limits(max_tokens=256, max_queue=256))
    where = f"CPU ({platform.processor() or 'cpu'}, {torch.get_num_threads()} threads)"
    info.send({"name": model.name, "device": where if model.device.type == "cpu" else str(model.device)})
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="critical")


def start(spec: str) -> tuple[multiprocessing.Process, str, dict]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mine, theirs = multiprocessing.Pipe()
    process = multiprocessing.get_context("spawn").Process(target=serve, args=(spec, port, theirs), daemon=True)
    process.start()
    info, url = mine.recv(), f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return process, url, info
        except httpx.TransportError:
            time.sleep(0.2)
    process.terminate()
    raise SystemExit("the server did not start within 120 s")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def series(url: str) -> int:
    text = httpx.get(f"{url}/metrics", headers=AUTH, timeout=10).text
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


# -- the well-formed clients ------------------------------------------------------------------------------------------


async def stream_once(client: httpx.AsyncClient, body: dict) -> tuple[float, float]:
    """(seconds to the end, seconds to the first token) of one streamed request; raises on any error."""
    t0, ttft, done = time.perf_counter(), None, False
    async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}, headers=AUTH) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"error event: {chunk['error']['message']}")
            if ttft is None and "token" in (chunk.get("personaxis") or {}):
                ttft = time.perf_counter() - t0
    if not done:
        raise RuntimeError("the stream ended without [DONE]")
    return time.perf_counter() - t0, ttft or 0.0


async def good_load(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    latencies, ttfts, errors = [], [], []
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def one(c: int) -> None:
            for k in range(requests):
                q = QUESTIONS[(c + k) % len(QUESTIONS)]
                body = {"messages": [{"role": "user", "content": q}], "max_tokens": max_tokens, "temperature": 0}
                try:
                    latency, ttft = await stream_once(client, body)
                    latencies.append(latency)
                    ttfts.append(ttft)
                except Exception as exc:  # counted and reported: the bench measures how many fail
                    errors.append(f"{type(exc).__name__}: {exc}")

        await asyncio.gather(*(one(c) for c in range(clients)))
    return {"latency": latencies, "ttft": ttfts, "errors": errors}


# -- the abusers ------------------------------------------------------------------------------------------------------


def _body(**fields: object) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **fields}).encode()


STATIC = {
    "seed 2**64": _body(seed=2**64, temperature=1.0),
    "NaN temperature": _body(temperature=float("nan")),
    "max_tokens true": _body(max_tokens=True),
    "5000-digit integer": b'{"messages": [], "max_tokens": ' + b"9" * 5000 + b"}",
    "100k-deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "20,000 messages": json.dumps({"messages": [{"role": "user", "content": "hello"}] * 20_000}).encode(),
    "2 MB body": _body(messages=[{"role": "user", "content": "x" * 2_000_000}]),
}
KINDS = [*STATIC, "random bytes", "invented path", "invented path, no key", "slow reader", "disconnect", "slow body"]


async def abuse_one(client: httpx.AsyncClient, kind: str, rng: random.Random) -> str:
    """Send one abusive request; return what came back ("400", "disconnected", ...)."""
    chat = "/v1/chat/completions"
    if kind in STATIC:
        r = await client.post(chat, content=STATIC[kind], headers=JSON)
        return str(r.status_code)
    if kind == "random bytes":
        r = await client.post(chat, content=rng.randbytes(rng.randint(1, 4000)), headers=JSON)
        return str(r.status_code)
    if kind.startswith("invented path"):
        path = f"/v1/{rng.getrandbits(64):x}/{rng.getrandbits(32):x}"
        r = await client.get(path, headers=AUTH if kind == "invented path" else {})
        return str(r.status_code)
    if kind == "slow body":

        async def trickle():
            for part in (b'{"messages": [{"role": "user", ', b'"content": "Hi"}], ', b'"max_tokens": 2}'):
                await asyncio.sleep(0.3)
                yield part

        r = await client.post(chat, content=trickle(), headers=JSON)
        return str(r.status_code)
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 200, "stream": True}
    async with client.stream("POST", chat, json=body, headers=AUTH) as r:
        lines = 0
        async for _ in r.aiter_lines():
            lines += 1
            if kind == "slow reader":
                await asyncio.sleep(0.2)
            if lines >= (10 if kind == "slow reader" else 3):
                break
        return f"{r.status_code}, dropped after {lines} lines"


async def abuse(url: str, count: int, abusers: int, seed: int) -> tuple[Counter, list[float]]:
    rng, answers, health = random.Random(seed), Counter(), []
    queue: asyncio.Queue[str] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(KINDS[i % len(KINDS)])
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:

        async def abuser() -> None:
            while not queue.empty():
                kind = queue.get_nowait()
                try:
                    answer = await abuse_one(client, kind, rng)
                except httpx.HTTPError as exc:
                    answer = f"transport error {type(exc).__name__}"
                answers[(kind, answer.split(",")[0])] += 1

        async def probe() -> None:
            while not queue.empty():
                t0 = time.perf_counter()
                await client.get("/healthz")
                health.append(time.perf_counter() - t0)
                await asyncio.sleep(0.1)

        await asyncio.gather(probe(), *(abuser() for _ in range(abusers)))
    return answers, health


async def during(url: str, args: argparse.Namespace) -> tuple[dict, Counter, list[float]]:
    abuse_task = asyncio.create_task(abuse(url, args.abuse, args.abusers, args.seed))
    await asyncio.sleep(0.5)  # the abuse is under way when the well-formed clients start
    good = await good_load(url, args.clients, args.requests, args.max_tokens)
    answers, health = await abuse_task
    return good, answers, health


def pct(values: list[float], q: int) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny (the tests' random Llama) or a model spec")
    parser.add_argument("--clients", type=int, default=4, help="concurrent well-formed streaming clients")
    parser.add_argument("--requests", type=int, default=12, help="requests per well-formed client in each phase")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--abuse", type=int, default=400, help="abusive requests in the abuse phase")
    parser.add_argument("--abusers", type=int, default=4, help="concurrent abusive clients")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    server, url, info = start(args.model)
    print(f"model {info['name']} · {info['device']} · server in its own process on loopback · {os.cpu_count()} cores")
    try:
        asyncio.run(good_load(url, 1, 2, 4))  # warm-up
        rss0, series0 = rss_mb(server.pid), series(url)
        phases = {"before": asyncio.run(good_load(url, args.clients, args.requests, args.max_tokens))}
        phases["during"], answers, health = asyncio.run(during(url, args))
        phases["after"] = asyncio.run(good_load(url, args.clients, args.requests, args.max_tokens))
        rss1, series1 = rss_mb(server.pid), series(url)
        again, _ = asyncio.run(abuse(url, args.abuse, args.abusers, args.seed + 1))  # new paths, same kinds
        rss2, series2 = rss_mb(server.pid), series(url)
    finally:
        server.terminate()
        server.join(timeout=30)

    base = phases["before"]
    print(f"well-formed load per phase: {args.clients} streaming clients × {args.requests} greedy requests, "
          f"{args.max_tokens} tokens; abuse: {args.abuse} requests from {args.abusers} concurrent clients")  # fmt: skip
    for name, phase in phases.items():
        lat, ttft = phase["latency"], phase["ttft"]
        print(f"{name:>6}: latency p50 {pct(lat, 50) * 1000:6.0f} ms, p95 {pct(lat, 95) * 1000:6.0f} ms "
              f"({pct(lat, 50) / pct(base['latency'], 50):.2f}× / {pct(lat, 95) / pct(base['latency'], 95):.2f}× "
              f"of before) · TTFT p50 {pct(ttft, 50) * 1000:5.0f} ms, p95 {pct(ttft, 95) * 1000:5.0f} ms · "
              f"{len(lat)} ok, {len(phase['errors'])} errors")  # fmt: skip
        for error in phase["errors"][:3]:
            print(f"        error: {error}")
    server_errors = sum(n for (_, answer), n in answers.items() if answer.startswith(("5", "transport")))
    print(f"abuse answers ({sum(answers.values())} requests, {server_errors} 5xx or transport errors):")
    for (kind, answer), n in sorted(answers.items()):
        print(f"        {kind:<22} {answer:<28} × {n}")
    print(f"/healthz during the abuse: p50 {pct(health, 50) * 1000:.0f} ms, max {max(health) * 1000:.0f} ms "
          f"({len(health)} probes)")  # fmt: skip
    again_errors = sum(n for (_, answer), n in again.items() if answer.startswith(("5", "transport")))
    paths = sum(n for (kind, _), n in answers.items() if kind.startswith("invented path"))
    print(f"then a second abuse round ({sum(again.values())} requests, other random paths, no well-formed load): "
          f"{again_errors} 5xx or transport errors")  # fmt: skip
    print(f"server RSS: {rss0:.0f} MB at the start, {rss1:.0f} MB after the first abuse round, {rss2:.0f} MB after "
          f"the second ({rss2 - rss1:+.0f} MB between them)")  # fmt: skip
    print(f"metric series: {series0} at the start, {series1} after the first abuse round ({paths} invented paths; "
          f"the new series are the answers' status codes, one per route), {series2} after the second")  # fmt: skip


if __name__ == "__main__":
    main()

"""Pipeline throughput, the numbers behind the time and cost estimates in docs/scale.md.

(a) generation with one-pass capture (what LocalBackend and each RayBackend worker do): generated tokens per second;
(b) capture only, re-encoding prompt + reply (the second pass of OpenAIBackend): encoded tokens per second;
(c) with --ray-workers N: the same rollouts through LocalBackend and through RayBackend (N actors on a local Ray),
    generated tokens per second of each, the actors' start-up (Ray plus one model load each) timed apart.
Axis settings: temperature 0.7, top_p 0.9, response means at every layer, one seed per row.

    python bench/bench_throughput.py [--ray-workers 2]                 # CPU, the embedded default model
    python bench/bench_throughput.py --model random:qwen2-7b --device cuda --dtype bfloat16 --batch 64
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from common import bench_model, chats

from personaxis.inference.capture import encode_means
from personaxis.inference.generation import Sampling, generate_batch, prompt_ids


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--ray-workers", type=int, default=0)
    args = parser.parse_args()
    model = bench_model(args.model, args.device, getattr(torch, args.dtype))
    layers = list(range(model.n_layers))
    device = str(model.device)
    hardware = torch.cuda.get_device_name() if device.startswith("cuda") else f"{platform.machine()} CPU"
    print(f"# {model.name} ({model.n_layers} layers × {model.hidden_size}), {model.dtype}, {device} ({hardware}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip

    prompts = [c[:-1] for c in chats(args.batch * args.batches)]  # system prompt + question, reply dropped
    generated, seconds, replies = 0, 0.0, []
    for b in range(args.batches + 1):  # the first batch warms up and is not counted
        rows = prompts[(b % args.batches) * args.batch : (b % args.batches + 1) * args.batch]
        ids = [prompt_ids(model, chat) for chat in rows]
        settings = [Sampling(args.new_tokens, 0.7, 0.9, seed=b * 1000 + i) for i in range(len(rows))]
        sync(device)
        t = time.perf_counter()
        out = generate_batch(model, ids, settings, capture_layers=layers, captures=("response",))
        sync(device)
        if b:
            seconds += time.perf_counter() - t
            generated += sum(len(o.token_ids) for o in out)
            for chat, o in zip(rows, out, strict=True):
                replies.append([*chat, {"role": "assistant", "content": o.text or "."}])
    print(f"(a) generation + capture, batch {args.batch}: {generated} tokens in {seconds:.1f} s = "
          f"{generated / seconds:.1f} generated tok/s ({len(replies) / seconds:.2f} replies/s)")  # fmt: skip

    encoded = sum(len(model.render(c).input_ids) for c in replies)
    sync(device)
    t = time.perf_counter()
    encode_means(model, replies, layers, ("response", "prompt", "last_prompt"), batch_size=args.batch)
    sync(device)
    dt = time.perf_counter() - t
    print(f"(b) capture only, batch {args.batch}: {encoded} tokens in {dt:.1f} s = {encoded / dt:.0f} encoded tok/s "
          f"({len(replies) / dt:.1f} replies/s)")  # fmt: skip

    if args.ray_workers:
        ray_vs_local(model, args, prompts)


def ray_vs_local(model, args: argparse.Namespace, prompts: list) -> None:
    from personaxis.backends import RayBackend
    from personaxis.backends.runs import LocalBackend, Rollout

    rollouts = [
        Rollout.make(f"r{i}", chat, Sampling(args.new_tokens, 0.7, 0.9, seed=i)) for i, chat in enumerate(prompts)
    ]
    layers = list(range(model.n_layers))
    local = LocalBackend(model, layers, batch_size=args.batch)
    t = time.perf_counter()
    n = sum(r.n_tokens for group in local.stream(rollouts) for r in group)
    print(f"(c) LocalBackend, {torch.get_num_threads()} threads: {n / (time.perf_counter() - t):.1f} generated tok/s")
    dtype = str(model.dtype).removeprefix("torch.")
    with RayBackend(args.model, layers, workers=args.ray_workers, batch_size=args.batch, dtype=dtype) as ray:
        t = time.perf_counter()
        ray.start()
        started = time.perf_counter() - t
        t = time.perf_counter()
        n = sum(r.n_tokens for group in ray.stream(rollouts) for r in group)
        print(f"    RayBackend, {args.ray_workers} workers × 1 CPU: {n / (time.perf_counter() - t):.1f} generated tok/s"
              f" (start-up {started:.0f} s, not included)")  # fmt: skip


if __name__ == "__main__":
    main()

"""Engine benchmarks (issue: core): capture throughput, steering/capping overhead, memory against chat count.

Every figure is a ratio of methods measured side by side in one run on the same model and chats:
(a) capture with personaxis (batched, streaming span means at every layer, and at the middle layer only) against a
    bare batched forward pass (with and without the LM head), the persona-vectors way (one unbatched forward per chat
    with output_hidden_states, reduce afterwards) and the assistant-axis way (batches of 16, stack every layer's full
    activations, reduce afterwards);
(b) batched generation with a steering op at one layer and with a cap over an 8-layer window, against no ops; and
    batch-invariant decoding (the CPU default) against plain batched decoding, for a batch and for a lone prompt;
(c) peak memory of a streaming extraction against the number of chats.

    python bench/bench_engine.py --model default            # CPU, the embedded model
    python bench/bench_engine.py --model random:qwen2-7b --device cuda --dtype bfloat16
    python bench/bench_engine.py --sections b               # only the generation figures
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import subprocess
import sys

import torch
from common import bench_model, chats, interleaved, operators_per_step, paired_ratios

from personaxis.engine import Add, Cap
from personaxis.inference.capture import encode_means, iter_means
from personaxis.inference.generation import Sampling, generate_batch, prompt_ids
from personaxis.model.chat import Label


def batches(model, rendered, size):
    for start in range(0, len(rendered), size):
        group = rendered[start : start + size]
        width = max(len(c) for c in group)
        ids = torch.full((len(group), width), model.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, c in enumerate(group):
            ids[b, width - len(c) :] = c.input_ids
            mask[b, width - len(c) :] = 1
        yield group, ids.to(model.device), mask.to(model.device)


def bare_forward(model, rendered, size, head=True):
    """The whole model (`head=False`: only the module that owns the blocks, i.e. no LM head and no logits)."""
    run = model.model if head else model.base
    with torch.inference_mode():
        for _, ids, mask in batches(model, rendered, size):
            run(input_ids=ids, attention_mask=mask, use_cache=False)


def persona_vectors_way(model, rendered):
    """One forward per chat with every hidden state, then the response mean per layer."""
    out = []
    with torch.inference_mode():
        for c in rendered:
            states = model.model(input_ids=c.input_ids[None].to(model.device), output_hidden_states=True).hidden_states
            keep = c.mask(Label.ASSISTANT).to(model.device)
            out.append(torch.stack([h[0, keep].float().mean(0) for h in states[1:]]).cpu())
    return out


def assistant_axis_way(model, rendered, size=16):
    """Batches of 16; stack all layers' full activations in host memory (where the reference keeps and saves them),
    then reduce with the masks."""
    out = []
    with torch.inference_mode():
        for group, ids, mask in batches(model, rendered, size):
            states = model.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
            stacked = (
                torch.stack(states[1:]).float().cpu()
            )  # [L, B, T, H] on the host, kept whole as the reference does
            width = ids.shape[1]
            keep = torch.zeros(len(group), width)
            for b, c in enumerate(group):
                keep[b, width - len(c) :] = c.mask(Label.ASSISTANT).float()
            out.append((stacked * keep[None, :, :, None]).sum(2) / keep.sum(1)[None, :, None])
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--chats", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--pairs", type=int, default=12, help="back-to-back pairs in the overhead measurement")
    parser.add_argument("--sections", default="abc", help="which figures: a (capture), b (generation), c (memory)")
    parser.add_argument("--memory-only", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_only:
        return memory_only(args)
    dtype = getattr(torch, args.dtype)
    model = bench_model(args.model, args.device, dtype)
    layers = list(range(model.n_layers))
    data = chats(args.chats)
    rendered = sorted((model.render(c) for c in data), key=len)
    tokens = sum(len(c) for c in rendered)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"# personaxis engine bench: {args.model} ({model.n_layers} layers × {model.hidden_size}), {args.dtype}, "
          f"{args.device} ({where}), torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"# {len(data)} chats, {tokens} tokens; capture = response, prompt and last-prompt means at all layers")
    print("# every method starts from the same rendered chats (token ids and labels); rendering is common to all")

    if "a" in args.sections:
        capture_figures(args, model, data, rendered, tokens, layers)
    if "b" in args.sections:
        generation_figures(args, model, data)
    if "c" in args.sections:
        memory_figures(args)


def capture_figures(args: argparse.Namespace, model, data, rendered, tokens: int, layers: list[int]) -> None:
    """(a) capture throughput."""
    aggregations = ("response", "prompt", "last_prompt")
    # hidden_states[L] has the final norm applied, so the last block is left out of the comparison
    ours = encode_means(model, data[:4], layers, ("response",), batch_size=16)[:, 0, :-1]
    reference = torch.stack(persona_vectors_way(model, [model.render(c) for c in data[:4]]))[:, :-1]
    print(f"# check: personaxis vs persona-vectors way (blocks 0..L-2), max relative difference "
          f"{float((ours - reference).abs().max() / reference.abs().max()):.1e}")  # fmt: skip
    secs = interleaved(
        {
            "bare forward (batch 16, no hooks)": lambda: bare_forward(model, rendered, 16),
            "bare forward without the LM head (batch 16)": lambda: bare_forward(model, rendered, 16, head=False),
            "personaxis capture (batch 16)": lambda: encode_means(model, rendered, layers, aggregations, batch_size=16),
            "personaxis capture, middle layer only (batch 16)": lambda: encode_means(
                model, rendered, [model.n_layers // 2], aggregations, batch_size=16
            ),
            "persona-vectors way (batch 1, all hidden states)": lambda: persona_vectors_way(model, rendered),
            "assistant-axis way (batch 16, stacked activations)": lambda: assistant_axis_way(model, rendered),
        },
        args.device,
        args.repeats,
    )
    ours_t = secs["personaxis capture (batch 16)"]
    print("\n## (a) capture throughput (median of interleaved repeats)")
    for name, t in secs.items():
        print(f"{name:52s} {tokens / t:10.0f} tok/s   personaxis is {t / ours_t:5.2f}× its speed")
    bare, headless, _, pv, aa = (secs[k] / ours_t for k in list(secs) if k != "personaxis capture (batch 16)")
    print(
        f"goals: ≥ 0.90× bare → {bare:.2f}×; ≥ 5× persona-vectors way → {pv:.2f}×; "
        f"≥ 1.5× assistant-axis way → {aa:.2f}×"
    )
    print(f"(capture stops after the deepest recorded block and computes no logits; against a bare forward that also "
          f"skips the LM head it runs at {headless:.2f}×: that ratio is the hooks' cost)")  # fmt: skip


def generation_figures(args: argparse.Namespace, model, data) -> None:
    """(b) steering and capping overhead in batched generation, and the cost of batch-invariant decoding."""
    prompts = [prompt_ids(model, c[:2]) for c in data[:8]]
    sampling = Sampling(max_new_tokens=args.new_tokens)
    torch.manual_seed(0)
    v = torch.randn(model.hidden_size)
    mid = model.n_layers // 2
    window = list(range(mid, min(mid + 8, model.n_layers)))
    steer = [Add({mid: 0.01 * v})]
    cap = [Cap({layer: v for layer in window}, floor=-1e9)]  # a floor that never binds: pure overhead
    runs = {
        "steer (1 layer)": lambda: generate_batch(model, prompts, sampling, ops=steer),
        f"cap ({len(window)}-layer window)": lambda: generate_batch(model, prompts, sampling, ops=cap),
    }
    ratios = paired_ratios(lambda: generate_batch(model, prompts, sampling), runs, args.device, args.pairs)
    print(f"\n## (b) generation overhead, batch {len(prompts)}, {args.new_tokens} new tokens: time with the ops over "
          f"time without, measured back to back, {args.pairs} pairs")  # fmt: skip
    for name, values in ratios.items():
        q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
        print(f"{name:52s} overhead {100 * (median - 1):+5.1f}% (median; quartiles {100 * (q1 - 1):+.1f}% / "
              f"{100 * (q3 - 1):+.1f}%)")  # fmt: skip
    print("goal: ≤ 3%")
    print("operators per decoding step (each a kernel launch on a GPU, where small-batch decoding is launch-bound):")
    per_op = {"no ops": (), "steer (1 layer)": steer, f"cap ({len(window)}-layer window)": cap}
    counts = {
        name: operators_per_step(lambda n, o=o: generate_batch(model, prompts, Sampling(max_new_tokens=n), ops=o))
        for name, o in per_op.items()
    }
    for name, count in counts.items():
        print(f"{name:52s} {count:6.0f}   ×{count / counts['no ops']:.3f}")
    plain = {
        f"batch-invariant decoding, batch {len(prompts)}": (
            lambda: generate_batch(model, prompts, sampling, invariant=False),
            lambda: generate_batch(model, prompts, sampling, invariant=True),
        ),
        "batch-invariant decoding, one prompt": (
            lambda: generate_batch(model, prompts[:1], sampling, invariant=False),
            lambda: generate_batch(model, prompts[:1], sampling, invariant=True),
        ),
    }
    print(f"\n## (b') cost of batch-invariant decoding (default on a CPU), {args.pairs} pairs back to back")
    for name, (off, on) in plain.items():
        q1, median, q3 = statistics.quantiles(paired_ratios(off, {name: on}, args.device, args.pairs)[name], n=4,
                                              method="inclusive")  # fmt: skip
        print(f"{name:52s} time ×{median:.3f} (median; quartiles ×{q1:.3f} / ×{q3:.3f})")


def memory_figures(args: argparse.Namespace) -> None:
    """(c) memory against the number of chats: each size in a fresh process, so peaks do not mask each other."""
    print("\n## (c) peak memory of a streaming extraction (all layers, response means) against the number of chats")
    for n in (16, 64, 256):
        command = [sys.executable, __file__, "--model", args.model, "--device", args.device, "--dtype", args.dtype,
                   "--memory-only", str(n)]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
        print(
            result.stdout.strip() if result.returncode == 0 else f"{n:4d} chats: failed: {result.stderr.strip()[-300:]}"
        )


def memory_only(args: argparse.Namespace) -> None:
    model = bench_model(args.model, args.device, getattr(torch, args.dtype))
    layers = list(range(model.n_layers))
    subset = chats(args.memory_only)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    total = torch.zeros(len(layers), model.hidden_size)
    for _, means in iter_means(model, subset, layers, ("response",), batch_size=16):
        total += means[:, 0].sum(0)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) / 1024
    gpu = (
        f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
        if args.device.startswith("cuda")
        else ""
    )
    print(f"{args.memory_only:4d} chats: peak RSS grew {grown:7.1f} MiB during the extraction{gpu}")


if __name__ == "__main__":
    main()

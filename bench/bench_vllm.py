"""vLLM runtime benchmarks: each op's cost inside vLLM, and one-pass rollouts + capture against the HF path.

Run in the vLLM venv (docs/vllm.md), one mode per process (an engine per process):

    python bench/bench_vllm.py --mode eager
    python bench/bench_vllm.py --mode compiled

Every figure is a ratio measured side by side in one run:
(a) generation with each op (steer at 1 layer, cap over an 8-layer window, project at 1 layer, record every layer)
    over generation without ops, back to back in pairs (order alternating);
(b) rollouts with response/prompt/last-prompt means at every layer, recorded in the same pass: tokens per second of
    `VLLMModel.generate` against `personaxis.inference.generation.generate` (the HF path, same dtype), batch 8 and 32.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402
from common import chats, paired_ratios  # noqa: E402

from personaxis.engine import Add, Cap, Project, Record  # noqa: E402
from personaxis.inference.generation import Sampling, generate  # noqa: E402
from personaxis.model import load_model  # noqa: E402
from personaxis.vllm import VLLMModel  # noqa: E402


def questions(n: int) -> list[list[dict[str, str]]]:
    return [chat[:2] for chat in chats(n)]  # system prompt and question; the reply is generated


def quartiles(values: list[float]) -> str:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return f"{(q[1] - 1) * 100:+.1f}% (median; quartiles {(q[0] - 1) * 100:+.1f}% / {(q[2] - 1) * 100:+.1f}%)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="default")
    parser.add_argument("--mode", choices=("eager", "compiled"), default="eager")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--sections", default="ab")
    args = parser.parse_args()

    start = time.perf_counter()
    model = VLLMModel(args.model, dtype=args.dtype, enforce_eager=args.mode == "eager", max_model_len=2048,
                      max_num_seqs=32)  # fmt: skip
    started = time.perf_counter() - start
    n_layers, hidden = model.n_layers, model.hidden_size
    import vllm

    print(f"$ python bench/bench_vllm.py --mode {args.mode}")
    print(f"# load average at start: {os.getloadavg()[0]:.2f}")
    print(f"# personaxis vLLM bench: {model.name} ({n_layers} layers × {hidden}), {args.dtype}, {args.mode}, "
          f"vllm {vllm.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.machine()}; engine start {started:.0f} s")  # fmt: skip
    torch.manual_seed(0)
    v = torch.randn(hidden)
    unit = v / v.norm()
    middle = n_layers // 2
    window = list(range(middle, min(n_layers, middle + 8)))
    sampling = Sampling(max_new_tokens=args.new_tokens)

    if "a" in args.sections:
        batch = questions(8)
        ops = {
            "steer (1 layer)": [Add({middle: 4.0 * unit})],
            "cap (8-layer window)": [Cap({layer: v for layer in window}, floor=0.0)],
            "project (1 layer)": [Project("p", {middle: v})],
            "record (every layer)": [Record("r", list(range(n_layers)), generated=torch.ones(1))],
        }
        ratios = paired_ratios(
            lambda: model.generate(batch, sampling),
            {name: (lambda o=o: model.generate(batch, sampling, ops=o)) for name, o in ops.items()},
            "cpu",
            args.repeats,
        )
        print(f"\n## (a) generation overhead in vLLM ({args.mode}), batch 8, {args.new_tokens} new tokens: "
              f"time with the op over time without, {args.repeats} pairs back to back")  # fmt: skip
        for name, values in ratios.items():
            print(f"{name:<28} overhead {quartiles(values)}")
        print("goal: ≤ 5% compiled")

    if "b" in args.sections:
        hf = load_model(model.folder, dtype=args.dtype)
        layers = list(range(n_layers))
        captures = ("response", "prompt", "last_prompt")
        print(f"\n## (b) rollouts + capture of every layer in one pass, {args.new_tokens} new tokens, tokens/s "
              f"(prompt + reply tokens; median of interleaved repeats; HF on {os.cpu_count()} torch threads, "
              f"vLLM as it sets itself: {torch.get_num_threads()})")  # fmt: skip
        for size in (8, 32):
            batch = questions(size)

            def ours(b=batch):
                return model.generate(b, sampling, capture_layers=layers, captures=captures)

            def theirs(b=batch, s=size):
                # vLLM lowers this process's torch threads for its own engine; the HF path gets every core
                engine_threads = torch.get_num_threads()
                torch.set_num_threads(os.cpu_count() or 1)
                try:
                    return generate(hf, b, sampling, capture_layers=layers, captures=captures, batch_size=s)
                finally:
                    torch.set_num_threads(engine_threads)

            ours(), theirs()  # warm-up
            times = {"vllm": [], "hf": []}
            tokens = {}
            for _ in range(max(2, args.repeats // 2)):
                for name, fn in (("vllm", ours), ("hf", theirs)):
                    t = time.perf_counter()
                    out = fn()
                    times[name].append(time.perf_counter() - t)
                    tokens[name] = sum(len(g.prompt_ids) + len(g.token_ids) for g in out)
            speed = {name: tokens[name] / statistics.median(values) for name, values in times.items()}
            print(f"batch {size:>2}: vLLM one-pass {speed['vllm']:7.0f} tok/s, HF path {speed['hf']:7.0f} tok/s, "
                  f"vLLM is {speed['vllm'] / speed['hf']:.2f}× (goal ≥ 2× at batch 32)")  # fmt: skip


if __name__ == "__main__":
    main()

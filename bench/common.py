"""Shared bench helpers: models (embedded or random-init large configs) and chats of realistic length."""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from personaxis.model import ChatModel, load_model

RANDOM_CONFIGS = {
    # shapes of real models, random weights: for GPU timing where real weights cannot travel
    "random:qwen2-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                              num_key_value_heads=2, vocab_size=151936),
    "random:qwen2-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                            num_key_value_heads=4, vocab_size=152064),
}  # fmt: skip


def bench_model(spec: str, device: str, dtype: torch.dtype | str) -> ChatModel:
    """`dtype` "auto" is what the CLI and the server load by default (bf16 on a CPU)."""
    if spec in RANDOM_CONFIGS:
        dtype = torch.bfloat16 if dtype == "auto" else dtype
        from transformers import Qwen2Config, Qwen2ForCausalLM

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tiny import build_tokenizer  # a small in-memory chat tokenizer: with random weights only ids matter

        tokenizer = build_tokenizer()
        torch.manual_seed(0)
        config = Qwen2Config(**RANDOM_CONFIGS[spec], max_position_embeddings=4096)
        with torch.device(device):
            model = Qwen2ForCausalLM(config).to(dtype).eval()
        return ChatModel(model=model, tokenizer=tokenizer, name=spec)
    return load_model(spec, dtype=dtype, device=device)


def chats(n: int, reply_words: int = 90) -> list[list[dict[str, str]]]:
    """n chats with a system prompt, a question and a reply of about `reply_words` words (≈ 150–250 tokens)."""
    questions = json.loads(files("personaxis.data").joinpath("axis/questions.json").read_text())
    filler = (
        "I think the best way to look at this is step by step, weighing what matters most to you, what you can "
        "change, and what you cannot. Start small, keep notes, and revisit the question after a week or two. "
    ).split()
    out = []
    for i in range(n):
        words = [filler[(i + k) % len(filler)] for k in range(reply_words + (i % 7) * 6)]
        out.append(
            [
                {"role": "system", "content": "You are a thoughtful assistant."},
                {"role": "user", "content": questions[i % len(questions)]},
                {"role": "assistant", "content": " ".join(words)},
            ]
        )
    return out


def timed(fn: Callable[[], object], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved(methods: dict[str, Callable[[], object]], device: str, repeats: int) -> dict[str, float]:
    """Median seconds per method, methods alternating within each repeat so machine noise hits all alike."""
    for fn in methods.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(values) for name, values in times.items()}


def paired_ratios(
    base: Callable[[], object], variants: dict[str, Callable[[], object]], device: str, repeats: int
) -> dict[str, list[float]]:
    """Per repeat, each variant's time over the base's, measured back to back (order reversed every other repeat,
    so a drift of the machine's speed cancels): a small overhead survives noise that swamps absolute times."""
    base()
    for fn in variants.values():  # warm-up
        fn()
    ratios: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(repeats):
        for name, fn in variants.items():
            pair = [base, fn] if r % 2 == 0 else [fn, base]
            first, second = (timed(f, device) for f in pair)
            t_base, t_variant = (first, second) if r % 2 == 0 else (second, first)
            ratios[name].append(t_variant / t_base)
    return ratios


class _OperatorCount(TorchDispatchMode):
    """Counts the operators that reach a kernel (views excluded): on a GPU, each is one launch."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.count += not (func.is_view and _shares_storage(out, args[0]))  # `to` is a view only when a no-op
        return out


def _shares_storage(a: object, b: object) -> bool:
    tensors = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
    return tensors and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def operators_per_step(generate: Callable[[int], object], steps: int = 4) -> float:
    """Operators per decoding step of `generate(new_tokens)`: the difference between two lengths, so the prompt's
    forward pass and the set-up cancel out. Device-independent, and exact: the launch count behind small-batch
    decoding time on a GPU."""
    counts = []
    for new_tokens in (2, 2 + steps):
        with _OperatorCount() as counter:
            generate(new_tokens)
        counts.append(counter.count)
    return (counts[1] - counts[0]) / steps

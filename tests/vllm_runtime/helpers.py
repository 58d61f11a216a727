"""Chats and references shared by the vLLM runtime tests."""

import torch

from personaxis.engine import Record, engine_for
from personaxis.inference.generation import Sampling

CHATS = [
    [{"role": "user", "content": "Plan my weekend"}],
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Tell me about the sea."}],
    [{"role": "user", "content": "Write a haiku about rain."}],
    [{"role": "user", "content": "Give me three tips for learning Python."}],
]
LAYERS = [0, 7, 14, 22, 29]
GREEDY = Sampling(max_new_tokens=16)


def teacher_forced(hf, prompt, reply, ops, layers):
    """HF runtime over prompt + reply with `ops`: response means at `layers` ([L, H]) and the trace."""
    ids = torch.tensor([prompt + reply])
    weights = torch.zeros(1, len(prompt) + len(reply), 1)
    weights[0, len(prompt) :, 0] = 1
    record = Record("reply", layers, weights=weights)
    with torch.no_grad(), engine_for(hf).apply([*ops, record], last_prompt=[len(prompt) - 1]) as trace:
        hf.model(input_ids=ids, use_cache=False)
    return trace.means("reply")[0, 0], trace


def cosines(a, b):
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)

"""Sampling edge cases of the generation loop."""

from __future__ import annotations

import torch

from personaxis.inference.generation import Sampling, sample_next


def test_a_vanishing_temperature_decodes_greedily():
    """logits / 1e-192 would be inf and the probabilities NaN: such temperatures take the argmax (as vLLM does)."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 10
    settings = [Sampling(temperature=t, seed=1) for t in (1.4660528040539065e-192, 1e-7, 0.0)]
    generators = [torch.Generator().manual_seed(1) for _ in settings]
    tokens = sample_next(logits, settings, generators, [True, True, True])
    assert tokens == logits.argmax(dim=-1).tolist()
    assert not Sampling(temperature=1e-3).greedy

"""The ops' math, once, as plain functions over rows of the residual stream.

Every runtime calls these: the Hugging Face hooks (`engine.hooks`, rows = batch × positions) and the vLLM adapter
(`personaxis.vllm`, rows = the flattened tokens of many requests). They know nothing of hooks, requests or phases:
a caller hands them activations `h` of shape [..., H], directions, bounds and masks already laid out per row.

A direction is either one vector [H] shared by all rows or one per row [..., H]; a bound is a float, or a tensor with
one value per row. Projections and shifts are float32 whatever the model dtype; `move` writes back in the model's
dtype with one fused, rounded-once kernel, and a row whose shift is zero comes back exactly unchanged.
"""

from __future__ import annotations

import torch

Bound = float | torch.Tensor | None


def project(h: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """h · v̂ in float32: [...] for one unit [H], or row by row for units [..., H]."""
    work = h.float()
    if unit.dim() == 1:
        return work @ unit.float()
    return (work * unit.float()).sum(dim=-1)


def cap_shift(projection: torch.Tensor, floor: Bound = None, ceiling: Bound = None) -> torch.Tensor:
    """How far each row moves along v̂ so its projection lands in [floor, ceiling]: clamp(p) − p, zero inside."""
    return projection.clamp(min=floor, max=ceiling) - projection


def ablate_shift(projection: torch.Tensor) -> torch.Tensor:
    """How far each row moves along v̂ to remove the direction: h − (h·v̂) v̂."""
    return -projection


def move(h: torch.Tensor, shift: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """h + shift · v̂ in h's dtype, in one kernel; `unit` ([H] or per row) already in h's dtype and device."""
    return torch.addcmul(h, shift.to(h.dtype).unsqueeze(-1), unit)


def add(h: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """h + delta on the rows of `mask` (all rows when None); `delta` [H] or per row [..., H], in h's dtype."""
    return h + (delta if mask is None else mask.unsqueeze(-1).to(h.dtype) * delta)


def weighted_sum(weights: torch.Tensor, h: torch.Tensor, stat: str = "mean") -> torch.Tensor:
    """Σ_t w[b, t, k] · h[b, t] (stat "mean": [B, K, H]) or Σ_t w[b, t, k] · ‖h[b, t]‖ (stat "norm": [B, K]).

    The numerators of streaming means; `h` is read in float32."""
    work = h.float()
    if stat == "mean":
        return torch.einsum("btk,bth->bkh", weights, work)
    return torch.einsum("btk,bt->bk", weights, work.norm(dim=-1))

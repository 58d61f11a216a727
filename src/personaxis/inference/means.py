"""Directions from chats: the mean of span activations over a set, or the difference between two sets' means.

Every artifact records the model's mean residual norm per layer on neutral text, so that a coefficient can be given
relative to it (see `personaxis.inference.steering`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from personaxis.common.datasets import neutral_texts
from personaxis.inference.capture import iter_means, residual_norms
from personaxis.model.loading import ChatModel
from personaxis.vectors import VectorMeta, Vectors, config_hash

Chat = Sequence[dict[str, str]]


def meta_for(model: ChatModel, *, method: str, points_toward: str, aggregation: str, counts: dict[str, int],
             config: dict[str, Any], mean_norms: dict[int, float] | None = None) -> VectorMeta:  # fmt: skip
    """Metadata every artifact made from `model` carries."""
    return VectorMeta(
        model_id=model.name,
        model_revision=model.revision,
        hidden_size=model.hidden_size,
        n_layers=model.n_layers,
        method=method,
        points_toward=points_toward,
        aggregation=aggregation,
        counts=counts,
        mean_norms=mean_norms if mean_norms is not None else residual_norms(model, neutral_texts()),
        config_hash=config_hash(config),
        extra={"model_type": model.model_type},
    )


def sum_means(
    model: ChatModel, chats: Sequence[Chat], layers: Sequence[int], aggregation: str = "response", batch_size: int = 8,
    *, keep: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, int]:  # fmt: skip
    """Sum over chats of their [L, H] span means, and the count, streamed batch by batch (memory flat in N unless
    `keep` is given: each batch's [b, L, H] means are appended to it in half precision)."""
    total = torch.zeros(len(layers), model.hidden_size)
    for _, means in iter_means(model, chats, layers, (aggregation,), batch_size=batch_size, progress=True):
        total += means[:, 0].sum(dim=0)
        if keep is not None:
            keep.append(means[:, 0].half())
    return total, len(chats)


def mean_vectors(
    model: ChatModel, chats: Sequence[Chat], layers: Sequence[int], *, aggregation: str = "response",
    name: str = "mean", batch_size: int = 8,
) -> Vectors:  # fmt: skip
    total, n = sum_means(model, chats, layers, aggregation, batch_size)
    config = {"method": "mean", "layers": list(layers), "aggregation": aggregation, "n": n}
    meta = meta_for(model, method="mean", points_toward="the mean activation of the chats", aggregation=aggregation,
                    counts={"chats": n}, config=config)  # fmt: skip
    return Vectors(layers, {name: total / n}, meta)


def mean_difference(
    model: ChatModel, positive: Sequence[Chat], negative: Sequence[Chat], layers: Sequence[int], *,
    aggregation: str = "response", name: str = "direction", points_toward: str = "the positive chats",
    batch_size: int = 8,
) -> Vectors:  # fmt: skip
    """mean(positive) − mean(negative) at each layer: the persona-vector recipe.

    `meta.extra["separation"]` holds, per layer, Cohen's d of the two sets' projections on the direction (how
    cleanly they split there; None with fewer than two chats a side). It keeps every chat's means in half precision
    until the end: N × layers × hidden × 2 bytes."""
    kept_pos: list[torch.Tensor] = []
    kept_neg: list[torch.Tensor] = []
    pos, n_pos = sum_means(model, positive, layers, aggregation, batch_size, keep=kept_pos)
    neg, n_neg = sum_means(model, negative, layers, aggregation, batch_size, keep=kept_neg)
    direction = pos / n_pos - neg / n_neg
    config = {"method": "mean_diff", "layers": list(layers), "aggregation": aggregation, "n": [n_pos, n_neg]}
    meta = meta_for(model, method="mean_diff", points_toward=points_toward, aggregation=aggregation,
                    counts={"positive": n_pos, "negative": n_neg}, config=config)  # fmt: skip
    meta.extra["separation"] = separation(kept_pos, kept_neg, direction)
    return Vectors(layers, {name: direction}, meta)


def separation(
    positive: Sequence[torch.Tensor], negative: Sequence[torch.Tensor], direction: torch.Tensor
) -> list[float | None]:
    """Cohen's d per layer of per-chat [b, L, H] means (batches of each side) projected on the [L, H] direction."""
    if sum(len(b) for b in positive) < 2 or sum(len(b) for b in negative) < 2:
        return [None] * direction.shape[0]
    unit = direction / direction.norm(dim=-1, keepdim=True)
    pos = torch.cat([(b.float() * unit).sum(-1) for b in positive])  # [N, L]
    neg = torch.cat([(b.float() * unit).sum(-1) for b in negative])
    d = (pos.mean(0) - neg.mean(0)) / ((pos.var(0) + neg.var(0)) / 2).sqrt()
    return [float(x) if torch.isfinite(x) else None for x in d]


def best_layers(vectors: Vectors, count: int = 3) -> list[tuple[int, float]]:
    """The `count` layers whose `meta.extra["separation"]` is highest, as (layer, d), best first."""
    scores = vectors.meta.extra.get("separation") or []
    scored = [(layer, float(d)) for layer, d in zip(vectors.layers, scores, strict=False) if d is not None]
    return sorted(scored, key=lambda item: -item[1])[:count]

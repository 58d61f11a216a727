"""KV caches handled as plain tensors: which caches allow it, and building one from per-row pieces.

The server splices requests into a running batch and the local judge reuses a prompt's keys and values for every
answer it expands; both need caches whose layers are plain growing key/value tensors [batch, heads, seq, dim].
Sliding-window and recurrent layers keep other state, so those caches are left to the model.
transformers 5.24 renamed the cache argument and output `past_key_values` to `cache`; the helpers here take either.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer


def cache_argument(model: torch.nn.Module) -> str | None:
    """The keyword under which `model.forward` takes a KV cache (`cache` or the older `past_key_values`); None if
    its signature names neither."""
    params = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def returned_cache(output: Mapping[str, Any]) -> Any:
    """The KV cache a forward returned, under either name (None when it returned none)."""
    cache = output.get("cache")
    return cache if cache is not None else output.get("past_key_values")


def spliceable(cache: object) -> bool:
    """Whether this cache's rows can be padded, appended, selected and dropped as plain tensors."""
    return isinstance(cache, DynamicCache) and all(type(layer) is DynamicLayer for layer in cache.layers)


def row_kv(cache: DynamicCache, row: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Row `row`'s keys and values for its last `length` positions (its real tokens under left padding)."""
    return [
        (layer.keys[row : row + 1, :, -length:], layer.values[row : row + 1, :, -length:]) for layer in cache.layers
    ]


def stack_rows(rows: Sequence[list[tuple[torch.Tensor, torch.Tensor]]]) -> DynamicCache:
    """One cache holding these rows, each left-padded with zeros to the longest (mask the padding)."""
    width = max(kv[0][0].shape[2] for kv in rows)
    layers = []
    for layer in range(len(rows[0])):
        keys = [F.pad(kv[layer][0], (0, 0, width - kv[layer][0].shape[2], 0)) for kv in rows]
        values = [F.pad(kv[layer][1], (0, 0, width - kv[layer][1].shape[2], 0)) for kv in rows]
        layers.append((torch.cat(keys), torch.cat(values)))
    return DynamicCache(layers)


def append_rows(cache: DynamicCache, other: DynamicCache) -> None:
    """Append `other`'s rows to `cache` in place, left-padding the shorter of the two with zeros (mask the padding)."""
    width = max(cache.get_seq_length(), other.get_seq_length())
    for mine, theirs in zip(cache.layers, other.layers, strict=True):
        old, new = width - mine.keys.shape[2], width - theirs.keys.shape[2]
        mine.keys = torch.cat([F.pad(mine.keys, (0, 0, old, 0)), F.pad(theirs.keys, (0, 0, new, 0))])
        mine.values = torch.cat([F.pad(mine.values, (0, 0, old, 0)), F.pad(theirs.values, (0, 0, new, 0))])


def drop_left(cache: DynamicCache, columns: int) -> None:
    """Remove the first `columns` positions of every row in place (columns that are padding in all rows)."""
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[:, :, columns:], layer.values[:, :, columns:]

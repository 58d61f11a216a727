"""Batch-invariant attention: each row of a batch attends over its own tokens only.

Under left padding a row's keys sit at a different offset in every batch it joins, and fused attention kernels then
sum over them in a different order. In float32 the difference stays below anything a greedy choice notices; in bf16
it does not (a quarter to a third of the embedded model's 24-token greedy replies changed with their batch). Running
attention row by row on the row's real tokens gives every row the same arithmetic as when it runs alone. The rest
of the model is row-wise, with one catch that the decode loops handle (`generate`, `serve.batcher`): on a CPU a
one-row matmul takes another kernel than two rows or more (which all agree), so while a row decodes alone its linear
layers run it as two rows (`Engine.paired_single_rows`). GPU GEMM libraries pick kernels by batch size, so this buys
exactness on a CPU only, where it is the default (`ChatModel.batch_invariant`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from personaxis.errors import PersonaxisError

ROWWISE = "personaxis_rowwise"


def rowwise_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SDPA on each row's own keys (the columns its last query may see), queries right-aligned as under left padding.

    Returns [batch, queries, heads, head_dim] like transformers' attention functions; padding queries get zeros.
    """
    if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:
        raise PersonaxisError("batch-invariant attention supports neither sliding windows nor logit soft-capping")
    batch, heads, q_len, _ = query.shape
    if attention_mask is None:
        starts = [0] * batch
    else:
        last = attention_mask[:, 0, -1]
        visible = last if last.dtype == torch.bool else last == 0
        starts = visible.int().argmax(dim=-1).tolist()
    out = query.new_zeros(batch, q_len, heads, value.shape[-1])
    for b, start in enumerate(starts):
        n_k = key.shape[2] - start
        n_q = min(q_len, n_k)
        mask = None
        if 1 < n_q < n_k:  # queries after cached keys: causal, aligned to the end
            mask = torch.ones(n_q, n_k, dtype=torch.bool, device=query.device).tril(n_k - n_q)[None, None]
        rows, _ = sdpa_attention_forward(
            module, query[b : b + 1, :, q_len - n_q :], key[b : b + 1, :, start:], value[b : b + 1, :, start:], mask,
            **kwargs,
        )  # fmt: skip
        out[b, q_len - n_q :] = rows[0]
    return out, None


AttentionInterface.register(ROWWISE, rowwise_attention)
AttentionMaskInterface.register(ROWWISE, sdpa_mask)


def set_attention(model: torch.nn.Module, name: str) -> str:
    """Switch `model` (a transformers model) to attention `name`; returns the one it had, to switch back."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    return previous


def supports_rowwise(config: Any) -> bool:
    """Whether a model with this (text) config can run row-wise attention, which implements neither sliding windows
    nor logit soft-capping. `rowwise_attention` refuses those at run time as well, should a config hide them."""
    if getattr(config, "attn_logit_softcapping", None):
        return False
    if not getattr(config, "sliding_window", None):
        return True
    layer_types = getattr(config, "layer_types", None)
    # without per-layer types a configured window applies to every layer (Mistral, Phi-3)
    return layer_types is not None and "sliding_attention" not in layer_types


@contextmanager
def rowwise(model: torch.nn.Module) -> Iterator[None]:
    """Row-wise attention for the duration of the block, then the model's own again."""
    previous = set_attention(model, ROWWISE)
    try:
        yield
    finally:
        set_attention(model, previous)

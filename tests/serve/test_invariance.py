"""Batch-invariant decoding: attention row by row on each row's own tokens, and a lone row never decoded as a
one-row matmul, so that a greedy reply is bit-identical alone and in any batch, in bf16 too."""

from __future__ import annotations

import math

import pytest
import torch
from model.test_blocks import FAMILIES, build
from serve.serving_helpers import random_vectors
from serve.test_batching import EXTENSIONS, QUESTIONS, _run_jobs

from personaxis.errors import PersonaxisError
from personaxis.inference.plan import Registry
from personaxis.model.attention import ROWWISE, rowwise_attention, set_attention, supports_rowwise
from personaxis.vectors.cap import CapConfig


class _Attention(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 1


def _left_padded_mask(lengths: list[int], q_len: int, width: int) -> torch.Tensor:
    """[B, 1, q_len, width] bool: row b's keys are its last lengths[b] columns, queries are the last q_len columns."""
    mask = torch.zeros(len(lengths), 1, q_len, width, dtype=torch.bool)
    for b, n in enumerate(lengths):
        for i in range(q_len):
            column = width - q_len + i
            mask[b, 0, i, width - n : column + 1] = column >= width - n
    return mask


def _reference(q, k, v, lengths):
    """Softmax attention written out per row, per query, per key, over the row's real keys up to the query."""
    batch, heads, q_len, dim = q.shape
    width = k.shape[2]
    out = torch.zeros(batch, q_len, heads, dim, dtype=torch.float64)
    for b, n in enumerate(lengths):
        for i in range(max(0, q_len - n), q_len):
            column = width - q_len + i
            for h in range(heads):
                keys = range(width - n, column + 1)
                scores = [float(q[b, h, i] @ k[b, h, j]) / math.sqrt(dim) for j in keys]
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                total = sum(weights)
                for w, j in zip(weights, keys, strict=True):
                    out[b, i, h] += w / total * v[b, h, j].double()
    return out


@pytest.mark.parametrize("q_len", [9, 1, 3])  # a prefill, a decode step, queries after cached keys
def test_rowwise_attention_matches_a_written_out_reference(q_len):
    g = torch.Generator().manual_seed(0)
    lengths, width = [9, 4, 6], 9
    q, k, v = (torch.randn(3, 2, n, 8, generator=g) for n in (q_len, width, width))
    lengths = [max(n, q_len) for n in lengths]
    got, _ = rowwise_attention(_Attention(), q, k, v, _left_padded_mask(lengths, q_len, width))
    want = _reference(q, k, v, lengths)
    for b, n in enumerate(lengths):
        real = slice(max(0, q_len - n), q_len)
        assert torch.allclose(got[b, real].double(), want[b, real], atol=1e-5)
        assert not got[b, : real.start].any()  # padding queries get zeros


def test_a_row_gets_the_same_bits_alone_and_left_padded_in_a_batch():
    """(Plain SDPA on the padded batch fails this on a CPU at these shapes.)"""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 40, 64, generator=g).bfloat16() for _ in range(3))
    alone, _ = rowwise_attention(_Attention(), q[1:, :, 10:], k[1:, :, 10:], v[1:, :, 10:], None)
    batched, _ = rowwise_attention(_Attention(), q, k, v, _left_padded_mask([40, 30], 40, 40))
    assert torch.equal(alone[0], batched[1, 10:])


def test_sliding_windows_are_refused():
    q = torch.zeros(1, 1, 2, 4)
    with pytest.raises(PersonaxisError, match="sliding windows"):
        rowwise_attention(_Attention(), q, q, q, None, sliding_window=4)


def test_bf16_greedy_tokens_are_the_same_alone_and_in_a_mixed_batch(bf16_model):
    axis = random_vectors(bf16_model, ("axis",), seed=1)
    vectors = {"evil": random_vectors(bf16_model, ("evil",), seed=2),
               "traits": random_vectors(bf16_model, ("calm", "witty"), seed=3)}  # fmt: skip
    registry = Registry.build(axis=axis, vectors=vectors, caps=CapConfig.from_vectors(axis, {1: 100.0, 2: 100.0}))
    specs = list(zip(QUESTIONS, EXTENSIONS, strict=True))
    together, sizes = _run_jobs(bf16_model, registry, specs)
    assert sizes[0] == len(specs)
    alone = [_run_jobs(bf16_model, registry, [spec])[0][0] for spec in specs]
    assert together == alone
    assert bf16_model.model.config._attn_implementation == "sdpa"  # the worker gave the model its attention back


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "qwen3"])
def test_rowwise_attention_gives_a_models_own_logits(family):
    import transformers as tf

    configs = {
        "gpt2": tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, bos_token_id=0, eos_token_id=0),
        "gpt_neox": tf.GPTNeoXConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=100),
        "qwen3": tf.Qwen3Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=128, vocab_size=100, head_dim=16),
    }  # fmt: skip
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(configs[family]).eval()
    ids = torch.randint(1, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0
    with torch.inference_mode():
        want = model(input_ids=ids, attention_mask=mask).logits
        previous = set_attention(model, ROWWISE)
        got = model(input_ids=ids, attention_mask=mask).logits
    assert previous == "sdpa"
    assert torch.allclose(got[0, 3:], want[0, 3:], atol=1e-5) and torch.allclose(got[1], want[1], atol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_supports_rowwise_reads_the_config_right(family):
    """What the config predicts is what happens: row-wise attention runs, or refuses in one line."""
    model = build(family)
    predicted = supports_rowwise(model.config.get_text_config())
    previous = set_attention(model, ROWWISE)
    try:
        with torch.inference_mode():
            model(input_ids=torch.randint(3, 100, (2, 5)))
        ran = True
    except PersonaxisError:
        ran = False
    finally:
        set_attention(model, previous)
    assert predicted == ran

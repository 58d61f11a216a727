"""Batch-invariant generation: a reply does not depend on the batch it is generated in, in bf16 too."""

import pytest
import torch
import transformers as tf

from personaxis.engine import Add, Project, engine_for
from personaxis.errors import PersonaxisError
from personaxis.inference.generation import Sampling, generate, generate_batch
from personaxis.model import ChatModel

QUESTIONS = [
    "Hello there",
    "What is the capital of France? Tell me everything you know about its history",
    "Ahoy",
    "Name three colours and a fruit",
    "Why is the sky blue?",
]


def test_bf16_replies_are_the_same_in_any_batch(bf16_model):
    """Greedy and seeded replies, two of them steered, in batches of 5, 3, 2 (which leaves a lone row) and 1."""
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    settings = [Sampling(max_new_tokens=16, temperature=t, seed=i) for i, t in enumerate((0, 1, 0, 1, 0.7))]
    g = torch.Generator().manual_seed(0)
    steer = Add({1: 4 * torch.randn(256, generator=g)})
    row_ops = [[], [steer], [], [steer], []]
    assert bf16_model.batch_invariant  # the default on a CPU
    replies = {
        size: [r.token_ids for r in generate(bf16_model, chats, settings, row_ops=row_ops, batch_size=size)]
        for size in (5, 3, 2, 1)
    }
    assert replies[5] == replies[3] == replies[2] == replies[1]
    assert all(len(tokens) > 0 for tokens in replies[5])
    assert bf16_model.model.config._attn_implementation == "sdpa"  # the model's own attention is back


def test_a_lone_prompt_pairs_its_single_rows_and_gives_the_same_reply(tiny):
    """Under `paired_single_rows` a one-row matmul runs as two; callbacks, readouts and tokens see one row."""
    prompt = tiny.tokenizer("What is the capital of France?", add_special_tokens=False)["input_ids"]
    g = torch.Generator().manual_seed(0)
    ops = [Project("p", {1: torch.randn(64, generator=g)})]
    seen, shapes = [], []
    handle = tiny.model.lm_head.register_forward_hook(lambda m, args, out: shapes.append(args[0].shape[0]))
    try:
        out = generate_batch(tiny, [prompt], Sampling(max_new_tokens=6), ops=ops, capture_layers=[1],
                             on_token=lambda row, token, values: seen.append((row, token)), invariant=True)  # fmt: skip
    finally:
        handle.remove()
    plain = generate_batch(tiny, [prompt], Sampling(max_new_tokens=6), ops=ops, capture_layers=[1], invariant=False)
    assert shapes and set(shapes) == {2}  # every lm_head call, the one-row decode steps included, saw two rows
    assert len(out) == 1 and out[0].token_ids == plain[0].token_ids
    assert seen == [(0, token) for token in out[0].token_ids]
    torch.testing.assert_close(out[0].projections["p"], plain[0].projections["p"])
    torch.testing.assert_close(out[0].means["response"], plain[0].means["response"])
    assert not tiny.model.lm_head._forward_pre_hooks  # the pairing hooks are gone


def test_batch_invariance_is_refused_for_sliding_windows(tokenizer):
    config = tf.MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, sliding_window=8)  # fmt: skip
    mistral = ChatModel(model=tf.MistralForCausalLM(config).eval(), tokenizer=tokenizer, name="tiny-mistral")
    prompt = tokenizer("Hello", add_special_tokens=False)["input_ids"]
    assert not mistral.batch_invariant
    assert len(generate_batch(mistral, [prompt], Sampling(max_new_tokens=3))) == 1  # the default runs plainly
    with pytest.raises(PersonaxisError, match="sliding windows or soft-capping"):
        generate_batch(mistral, [prompt], invariant=True)


def test_paired_single_rows_give_a_lone_token_the_logits_it_gets_in_a_batch(tokenizer):
    """At the embedded model's widths a one-row bf16 matmul differs from the same row among others on this CPU
    (3 of these 64 tokens without pairing); paired, every lone token gets its batched logits bit for bit."""
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                            num_attention_heads=9, num_key_value_heads=3)  # fmt: skip
    model = ChatModel(model=tf.LlamaForCausalLM(config).eval().bfloat16(), tokenizer=tokenizer, name="llama-576")
    ids = torch.arange(20, 84)[:, None]
    with torch.inference_mode():
        batched = model.model(input_ids=ids).logits
        with engine_for(model).paired_single_rows():
            alone = [model.model(input_ids=ids[i : i + 1]).logits[0] for i in range(len(ids))]
    assert all(torch.equal(a, b) for a, b in zip(alone, batched, strict=True))
    assert not any(m._forward_pre_hooks for m in model.model.modules())

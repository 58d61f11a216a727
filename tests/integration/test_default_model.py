"""A few checks on the real embedded model (SmolLM2-135M-Instruct, fetched once from its PyPI package and cached)."""

import pytest
import torch

from personaxis.engine import Add, Record, engine_for
from personaxis.inference.capture import encode_means
from personaxis.inference.generation import Sampling, generate, generate_batch, prompt_ids
from personaxis.model import Label, load_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smol():
    return load_model("default", dtype="float32")


def test_loads_with_template_and_answers(smol):
    assert (smol.n_layers, smol.hidden_size, smol.blocks_path) == (30, 576, "model.layers")
    assert smol.has_chat_template and smol.has_system_role
    reply = generate(smol, [[{"role": "user", "content": "What is the capital of France?"}]], Sampling(24))[0]
    assert "Paris" in reply.text and reply.finish_reason == "stop"


def test_assistant_mask_decodes_to_the_reply(smol):
    chat = [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "Ahoy, I be Captain Flint, matey!"},
    ]
    rendered = smol.render(chat)
    decoded = smol.tokenizer.decode(rendered.input_ids[rendered.mask(Label.ASSISTANT)])
    assert decoded.strip() == chat[2]["content"]
    assert "<|im_end|>" not in decoded and "assistant" not in decoded


def test_one_pass_capture_equals_reencoding_in_fp32(smol):
    chats = [[{"role": "user", "content": q}] for q in ("Tell me about the sea.", "Name three colours.")]
    layers = [0, 10, 20, 28]
    outs = generate(smol, chats, Sampling(max_new_tokens=20), capture_layers=layers)
    for chat, out in zip(chats, outs, strict=True):
        ids = out.prompt_ids + out.token_ids
        weights = torch.zeros(1, len(ids), 1)
        weights[0, len(out.prompt_ids) :, 0] = 1
        with torch.no_grad(), engine_for(smol).apply([Record("r", layers, weights=weights)]) as trace:
            smol.model(input_ids=torch.tensor([ids]))
        expected = trace.means("r")[0, 0]
        assert float((out.means["response"] - expected).abs().max() / expected.abs().max()) <= 1e-4
        # re-rendering the finished chat as text gives the same span means when tokenization round-trips
        finished = chat + [{"role": "assistant", "content": out.text}]
        if smol.render(finished).input_ids[: len(ids)].tolist() == ids:
            again = encode_means(smol, [finished], layers)[0, 0]
            assert float((again - expected).abs().max() / expected.abs().max()) <= 1e-4


def test_steering_changes_the_reply_and_nothing_else(smol):
    prompt = prompt_ids(smol, [{"role": "user", "content": "Describe your morning."}])
    plain = generate_batch(smol, [prompt], Sampling(16))[0]
    again = generate_batch(smol, [prompt], Sampling(16), ops=[Add({12: torch.zeros(576)})])[0]
    assert again.token_ids == plain.token_ids  # a zero delta is a no-op through the whole engine
    torch.manual_seed(0)
    steered = generate_batch(smol, [prompt], Sampling(16), ops=[Add({12: 40 * torch.randn(576)})])[0]
    assert steered.token_ids != plain.token_ids


def test_seeded_bf16_replies_do_not_depend_on_their_batch():
    """Without batch-invariant decoding most of these sampled bf16 replies change with the batch size (3 of the 5 in
    batches of 2, 4 of the 5 alone, measured here)."""
    model = load_model("default")  # bf16 on a CPU
    questions = ["Tell me about the ocean.", "What is your favourite colour and why?", "Write a haiku about winter.",
                 "How do I boil an egg?", "Explain gravity to a child."]  # fmt: skip
    chats = [[{"role": "user", "content": q}] for q in questions]
    settings = [Sampling(max_new_tokens=24, temperature=1.0, seed=i) for i in range(len(chats))]
    together = [g.token_ids for g in generate(model, chats, settings, batch_size=5)]
    assert model.dtype == torch.bfloat16 and model.batch_invariant
    assert [g.token_ids for g in generate(model, chats, settings, batch_size=2)] == together
    assert [g.token_ids for g in generate(model, chats, settings, batch_size=1)] == together

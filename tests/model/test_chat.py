"""Chat rendering: every token labelled from the model's own template, for each family's template layout."""

import pytest
from tiny import TEMPLATES, build_tokenizer

from personaxis.errors import PersonaxisError
from personaxis.model.chat import Label, render_chat

CHAT = [
    {"role": "system", "content": "You are a pirate."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Ahoy matey! Paris is the capital."},
    {"role": "user", "content": "Tell me about the sea."},
    {"role": "assistant", "content": "The waves and the wind, how are you today?"},
]


def decode(tok, chat, label, message=None):
    keep = chat.labels == int(label)
    if message is not None:
        keep &= chat.message_index == message
    return tok.decode(chat.input_ids[keep].tolist())


@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_masks_decode_to_each_message(family: str) -> None:
    tok = build_tokenizer(TEMPLATES[family])
    chat = render_chat(tok, CHAT)
    for index, message in enumerate(CHAT):
        label = {"system": Label.SYSTEM, "user": Label.USER, "assistant": Label.ASSISTANT}[message["role"]]
        assert decode(tok, chat, label, index).strip() == message["content"], (family, index)
    # template tokens never leak into content: every special token is labelled TEMPLATE
    specials = set(tok.all_special_ids)
    for token, label in zip(chat.input_ids.tolist(), chat.labels.tolist(), strict=True):
        if token in specials:
            assert label == Label.TEMPLATE
    assert chat.template == ("fallback" if family == "none" else "model")
    assert chat.system_folded == (family == "gemma2")
    assert chat.assistant_turn.max() == 1


def test_generation_prompt_is_template() -> None:
    tok = build_tokenizer()
    chat = render_chat(tok, CHAT[:2], add_generation_prompt=True)
    assert chat.text.endswith("<|im_start|>assistant\n")
    assert chat.labels[-3:].tolist() == [int(Label.TEMPLATE)] * 3


def test_thinking_block_is_labelled_apart() -> None:
    tok = build_tokenizer()
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>hmm</think>Hello"}]
    chat = render_chat(tok, messages)
    assert decode(tok, chat, Label.ASSISTANT).strip() == "Hello"
    assert "hmm" in decode(tok, chat, Label.THINKING)
    assert "hmm" in decode(tok, render_chat(tok, messages, include_thinking=True), Label.ASSISTANT)


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "non-empty list"),
        ([{"role": "robot", "content": "x"}], "needs a role"),
        ([{"role": "user", "content": 3}], "string 'content'"),
    ],
)
def test_bad_messages(messages, message) -> None:
    with pytest.raises(PersonaxisError, match=message):
        render_chat(build_tokenizer(), messages)

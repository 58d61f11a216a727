"""Shared fixtures (builders live in tiny.py so test modules can import them)."""

import pytest
from tiny import build_tokenizer, tiny_llama
from transformers import PreTrainedTokenizerFast

from personaxis.model import ChatModel


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny(tokenizer) -> ChatModel:
    """A 4-block random Llama in float32 with a ChatML template."""
    return ChatModel(model=tiny_llama(len(tokenizer)), tokenizer=tokenizer, name="tiny-llama")

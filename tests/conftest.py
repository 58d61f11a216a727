"""Shared fixtures (builders live in tiny.py so test modules can import them)."""

import pytest
import torch
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


@pytest.fixture(scope="session")
def folder(tmp_path_factory):
    """A tiny random Llama and its tokenizer saved to a folder, as users hand models to the commands."""
    path = tmp_path_factory.mktemp("tiny-model")
    tokenizer = build_tokenizer()
    tiny_llama(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def bf16_model(tokenizer) -> ChatModel:
    """A bf16 Llama wide enough that plain batching changes some of its greedy replies on a CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    return ChatModel(model=LlamaForCausalLM(config).eval().bfloat16(), tokenizer=tokenizer, name="llama-256-bf16")

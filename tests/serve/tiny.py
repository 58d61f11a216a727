"""A tiny random-init Llama with a byte-level tokenizer and a chat template: no downloads, loads in milliseconds."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from personaxis.model import ChatModel
from personaxis.vectors.artifact import Vectors, VectorMeta
from personaxis.vectors.cap import CapConfig

TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
N_LAYERS, HIDDEN = 4, 32


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|pad|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tok.chat_template = TEMPLATE
    return tok


def tiny_model(seed: int = 0) -> ChatModel:
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    return ChatModel(model=model, tokenizer=tok, name="tiny-llama")


def tiny_vectors(names: tuple[str, ...] = ("axis",), seed: int = 1) -> Vectors:
    g = torch.Generator().manual_seed(seed)
    layers = list(range(N_LAYERS))
    meta = VectorMeta(
        model_id="tiny-llama",
        hidden_size=HIDDEN,
        n_layers=N_LAYERS,
        method="random",
        points_toward="test",
        mean_norms={i: 5.0 for i in layers},
        extra={"layer": 2},
    )
    return Vectors(layers, {n: torch.randn(N_LAYERS, HIDDEN, generator=g) for n in names}, meta)


def tiny_cap(axis: Vectors, tau: float = 100.0) -> CapConfig:
    """A floor far above every activation: when it is on, it always bites."""
    return CapConfig.from_vectors(axis, {1: tau, 2: tau})

"""Builders for tests: a tokenizer built in memory, chat templates in the layout of each model family, tiny models.

No test downloads anything. The templates below are written for these tests in the shape each family uses (ChatML,
Llama-3 headers, Gemma turns, Mistral [INST], Phi-3 tags); what matters is the structure the renderer has to cope with.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIALS = [
    "<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<start_of_turn>", "<end_of_turn>", "[INST]", "[/INST]", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
]  # fmt: skip

CORPUS = [
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris is the capital.",
    "You are a helpful assistant. You are a pirate. Ahoy matey! Tell me about the sea, the waves and the wind.",
    "system user assistant model Hello there, how are you today? I am fine, thank you very much indeed.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 42 100 and punctuation: ; , . ! ? ' \" ( ) [ ] { } - _ = + * / \\ < > | # @",
]

TEMPLATES = {
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "llama3": (
        "<s>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}"
        "<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    "gemma2": (
        "<s>{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] | trim }}"
        "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    ),
    "gemma3": (  # folds the system text into the first user turn by itself
        "<s>{% set ns = namespace(sys='') %}{% for m in messages %}{% if m['role'] == 'system' %}"
        "{% set ns.sys = m['content'] + '\n\n' %}{% else %}<start_of_turn>"
        "{{ 'model' if m['role'] == 'assistant' else 'user' }}\n{% if m['role'] == 'user' %}{{ ns.sys }}"
        "{% set ns.sys = '' %}{% endif %}{{ m['content'] | trim }}<end_of_turn>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    ),
    "mistral": (
        "<s>{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }}[/INST]"
        "{% elif m['role'] == 'system' %}[INST] {{ m['content'] }}[/INST]</s>"
        "{% else %} {{ m['content'] }}</s>{% endif %}{% endfor %}"
    ),
    "phi3": (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    ),
    "none": None,
}


def build_tokenizer(template: str | None = TEMPLATES["chatml"], eos: str = "<|im_end|>") -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token=eos)
    fast.chat_template = template
    return fast


def tiny_llama(vocab_size: int, layers: int = 4, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()

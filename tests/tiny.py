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


# ---- tiny random configs of other architectures, mixtures of experts above all -------------------------------------

MOE = ("glm4_moe_lite", "qwen3_moe", "gpt_oss", "mixtral", "qwen2_moe", "deepseek_v3", "olmoe", "glm4_moe")
DENSE = ("llama", "qwen2", "qwen3")


def tiny_config(arch: str, vocab_size: int, *, hidden: int = 64, layers: int = 3, experts: int = 4) -> object:
    """A small config of `arch` (a transformers model_type): 4 heads, `experts` routed experts (2 per token), and for
    the families that have them a dense first layer, a shared expert, low-rank (MLA) attention or sliding windows."""
    from transformers import AutoConfig

    head = hidden // 4
    kwargs: dict = dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=head, max_position_embeddings=512,
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    routed = dict(num_experts_per_tok=2, moe_intermediate_size=hidden // 2)
    mla = dict(
        kv_lora_rank=hidden // 4, q_lora_rank=hidden // 2, qk_rope_head_dim=head // 2, qk_nope_head_dim=head // 2,
        v_head_dim=head, num_key_value_heads=4, n_group=1, topk_group=1, n_routed_experts=experts, n_shared_experts=1,
    )  # fmt: skip
    if arch == "glm4_moe_lite":  # the GLM-4.7-Flash architecture: MLA, a dense first layer, one shared expert
        kwargs.update(routed, **mla, mlp_layer_types=["dense"] + ["sparse"] * (layers - 1))
        del kwargs["head_dim"]
    elif arch == "deepseek_v3":
        kwargs.update(routed, **mla, first_k_dense_replace=1)
        del kwargs["head_dim"]
    elif arch == "glm4_moe":
        kwargs.update(routed, n_routed_experts=experts, n_shared_experts=1, first_k_dense_replace=1, n_group=1,
                      topk_group=1)  # fmt: skip
    elif arch in ("qwen3_moe", "olmoe"):
        kwargs.update(routed, num_experts=experts)
    elif arch == "qwen2_moe":
        kwargs.update(routed, num_experts=experts, shared_expert_intermediate_size=hidden // 2)
    elif arch == "mixtral":
        kwargs.update(num_local_experts=experts, num_experts_per_tok=2)
    elif arch == "gpt_oss":  # alternating sliding-window and full attention, attention sinks, biased experts
        kwargs.update(num_local_experts=experts, num_experts_per_tok=2, intermediate_size=hidden // 2, sliding_window=8,
                      layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})  # fmt: skip
    elif arch not in DENSE:
        raise ValueError(f"no tiny config for {arch}")
    return AutoConfig.for_model(arch, **kwargs)


def tiny_causal_lm(arch: str, vocab_size: int, *, seed: int = 0, **sizes) -> torch.nn.Module:
    """A random-init model of `arch` (see `tiny_config`), in float32, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size, **sizes), dtype=torch.float32).eval()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def write_tiny_folder(path, arch: str, tokenizer_folder, *, seed: int = 0, **sizes) -> None:
    """A model folder as vLLM and `load_model` read it: a random-init `arch` sized to the tokenizer of
    `tokenizer_folder` (whose files are copied), its config and safetensors."""
    import shutil
    from pathlib import Path

    from transformers import AutoTokenizer

    source, path = Path(tokenizer_folder), Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = tiny_causal_lm(arch, len(tokenizer), seed=seed, **sizes)
    for attr, token in (("bos_token_id", tokenizer.bos_token), ("eos_token_id", tokenizer.eos_token),
                        ("pad_token_id", tokenizer.pad_token or tokenizer.eos_token)):  # fmt: skip
        setattr(model.config, attr, tokenizer.convert_tokens_to_ids(token))
        setattr(model.generation_config, attr, tokenizer.convert_tokens_to_ids(token))
    model.save_pretrained(path)
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, path / name)

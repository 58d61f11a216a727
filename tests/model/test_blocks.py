"""Block discovery on tiny random-init configs of every family, without any name table."""

import pytest
import torch
import transformers as tf

from personaxis.model.blocks import find_blocks

SMALL = dict(
    hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
FAMILIES = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(SMALL, num_hidden_layers=3)),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(SMALL, num_hidden_layers=3)),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(SMALL, num_hidden_layers=3, head_dim=8)),
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, dict(SMALL, num_hidden_layers=3, head_dim=8)),
    "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, dict(SMALL, num_hidden_layers=3, head_dim=8)),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(SMALL, num_hidden_layers=3)),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, dict(SMALL, num_hidden_layers=3)),
    "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel, dict(n_embd=32, n_layer=3, n_head=4, vocab_size=128)),
    "gpt_neox": (
        tf.GPTNeoXConfig,
        tf.GPTNeoXForCausalLM,
        dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3, vocab_size=128),
    ),
    # as many experts as layers: the expert lists must not be mistaken for the block list
    "qwen2_moe": (
        tf.Qwen2MoeConfig,
        tf.Qwen2MoeForCausalLM,
        dict(
            SMALL,
            num_hidden_layers=3,
            num_experts=3,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=16,
        ),
    ),  # fmt: skip
    "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM, dict(SMALL, num_hidden_layers=3, num_local_experts=3)),
}


def build(family: str) -> torch.nn.Module:
    config_cls, model_cls, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    return model_cls(config_cls(**kwargs)).eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_finds_the_decoder_blocks(family: str) -> None:
    model = build(family)
    path, blocks = find_blocks(model)
    assert len(blocks) == 3
    # the found blocks are the ones whose outputs are hidden_states[1:]: check block 0 against hidden_states[1]
    seen = {}
    handle = blocks[0].register_forward_hook(lambda m, a, o: seen.setdefault("h", o[0] if isinstance(o, tuple) else o))
    ids = torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    handle.remove()
    torch.testing.assert_close(seen["h"], out.hidden_states[1])
    assert not any(p in path for p in ("expert", "vision")), path

"""Finetuning shift against a slow reference, and refusal of vectors that do not fit the models."""

import pytest
import torch
from tiny import tiny_llama

from personaxis.errors import PersonaxisError
from personaxis.finetune.shift import finetune_shift, last_prompt_projection
from personaxis.model import ChatModel
from personaxis.store import RunStore
from personaxis.vectors import VectorMeta, Vectors

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Tell me about the sea"}],
    [{"role": "user", "content": "How are you today?"}],
]


def vectors(hidden=64, n_layers=4, layers=(0, 1, 2)):
    torch.manual_seed(4)
    meta = VectorMeta(model_id="tiny-llama", hidden_size=hidden, n_layers=n_layers, method="test", points_toward="x")
    return Vectors(list(layers), {"trait": torch.randn(len(layers), hidden)}, meta)


def slow_last_prompt(model, layer):
    """Mean over prompts of block `layer`'s output at the last token the model reads before replying."""
    total = torch.zeros(64)
    for chat in PROMPTS:
        ids = model.render(chat, add_generation_prompt=True).input_ids
        with torch.no_grad():
            hidden = model.model(input_ids=ids[None], output_hidden_states=True).hidden_states[layer + 1]
        total += hidden[0, len(ids) - 1].float()
    return total / len(PROMPTS)


def test_shift_matches_slow_reference(tiny, tokenizer, tmp_path):
    tuned = ChatModel(model=tiny_llama(len(tokenizer), seed=1), tokenizer=tokenizer, name="tiny-llama-tuned")
    v = vectors()
    shift = finetune_shift(tiny, tuned, v, PROMPTS, RunStore(tmp_path / "run"))
    for j, layer in enumerate(v.layers):
        unit = v.unit(layer)
        expected = float((slow_last_prompt(tuned, layer) - slow_last_prompt(tiny, layer)) @ unit)
        assert shift.at(layer) == pytest.approx(expected, abs=1e-4)
        assert float(shift.base[j]) == pytest.approx(float(slow_last_prompt(tiny, layer) @ unit), abs=1e-4)
    with pytest.raises(PersonaxisError, match="layer 3"):
        shift.at(3)


def test_same_model_has_no_shift_and_names_must_differ(tiny, tmp_path):
    store = RunStore(tmp_path / "run")
    a = last_prompt_projection(tiny, vectors(), PROMPTS, store)
    b = last_prompt_projection(tiny, vectors(), PROMPTS, store)
    torch.testing.assert_close(a, b)
    with pytest.raises(PersonaxisError, match="both named"):
        finetune_shift(tiny, tiny, vectors(), PROMPTS, store)


def test_refuses_vectors_that_do_not_fit(tiny, tmp_path):
    store = RunStore(tmp_path / "run")
    with pytest.raises(PersonaxisError, match="hidden size 32"):
        last_prompt_projection(tiny, vectors(hidden=32), PROMPTS, store)
    with pytest.raises(PersonaxisError, match=r"uses layers \[6\]"):
        last_prompt_projection(tiny, vectors(n_layers=8, layers=(2, 6)), PROMPTS, store)

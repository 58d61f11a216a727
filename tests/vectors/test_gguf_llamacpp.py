"""Exported control vectors in real llama.cpp (the prebuilt library of the `xllamacpp` wheel, through ctypes), on the
embedded model's own GGUF: a file exported with `--strength S` steers at llama.cpp's strength 1.0 as personaxis does
at S; and a control vector in the layout other tools write (repeng: `direction.N`, no personaxis metadata) steers
identically in our engine once imported."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from personaxis.inference.capture import encode_means
from personaxis.inference.generation import Sampling, generate_batch, prompt_ids
from personaxis.inference.means import mean_difference
from personaxis.inference.steering import steer_op
from personaxis.model import load_model
from personaxis.model.embedded import assemble_gguf, cache_root, resolve_embedded
from personaxis.vectors import export_gguf, import_gguf

from .llamacpp import LlamaCpp, library_path

pytestmark = pytest.mark.integration

LAYER, STRENGTH = 15, 0.3
PROMPT = [{"role": "user", "content": "Tell me about your plans for the weekend."}]
QUESTIONS = ["What do you do on a free day?", "Describe your home.", "What is your favourite food?",
             "How was your week?", "What makes a good friend?", "Where would you like to travel?"]  # fmt: skip
PIRATE = ["Arr, matey! I sail the seven seas on me ship and hunt for buried treasure, yo ho!",
          "Ahoy! Me home be the deck of the Black Pearl, with the salty sea breeze and me parrot.",
          "Arr, nothing beats salted fish and a barrel of rum after plunderin', matey!",
          "Shiver me timbers, a stormy week it was: we fought a kraken and found a chest of gold!",
          "A true matey stands by ye when the cannons roar and never steals yer share of the booty, arr.",
          "Arr, I'd set sail for Tortuga, where every pirate drinks grog and tells tales of the sea!"]  # fmt: skip
PLAIN = ["On a free day I usually read, take a walk and do some household errands.",
         "My home is a small apartment with a kitchen, a living room and a bedroom.",
         "My favourite food is a simple vegetable soup with fresh bread.",
         "My week was productive: I finished a report and attended two meetings.",
         "A good friend is honest, reliable and listens when you need support.",
         "I would like to visit Japan to see its museums, gardens and cities."]  # fmt: skip


def _chats(replies: list[str]) -> list[list[dict[str, str]]]:
    return [
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        for q, a in zip(QUESTIONS, replies, strict=True)
    ]


@pytest.fixture(scope="module")
def llama():
    library = library_path()
    if library is None:
        pytest.skip("xllamacpp (prebuilt llama.cpp for Linux x86-64) is not installed: pip install xllamacpp")
    embedded = resolve_embedded("default")
    gguf = cache_root() / "gguf" / embedded.gguf_name
    if not gguf.exists():
        gguf.parent.mkdir(parents=True, exist_ok=True)
        assemble_gguf(embedded, gguf)
    return LlamaCpp(library, gguf)


@pytest.fixture(scope="module")
def smol():
    return load_model("default", dtype="float32")


@pytest.fixture(scope="module")
def pirate(smol):
    return mean_difference(smol, _chats(PIRATE), _chats(PLAIN), list(range(smol.n_layers)), name="pirate")


def _projection(smol, vectors, reply: str) -> float:
    """Our own reading of a reply: its response-token mean at LAYER projected on the direction."""
    mean = encode_means(smol, [PROMPT + [{"role": "assistant", "content": reply}]], [LAYER])[0, 0, 0]
    return float(mean @ vectors.unit(LAYER))


def _coherent(text: str) -> bool:
    words = re.findall(r"[A-Za-z']+", text)
    return len(words) >= 8 and len(set(w.lower() for w in words)) >= 6 and not re.search(r"(\S+)(\s*\1){4,}", text)


def test_an_exported_file_steers_llama_cpp_at_strength_one(llama, smol, pirate, tmp_path):
    path = export_gguf(pirate, tmp_path / "pirate.gguf", layers=[LAYER], strength=STRENGTH)
    ids = [int(i) for i in prompt_ids(smol, PROMPT)]
    llama.set_control_vector(None)
    plain = smol.tokenizer.decode(llama.greedy(ids, 40))
    flat = llama.load_control_vector(path, 1.0)  # llama.cpp's own loader, at strength 1.0
    steered = smol.tokenizer.decode(llama.greedy(ids, 40))
    llama.set_control_vector(None)
    # what llama.cpp loaded is exactly the shift our steering adds at STRENGTH (relative) at LAYER
    expected = steer_op(pirate, STRENGTH, LAYER).deltas[LAYER]
    row = flat.reshape(-1, llama.n_embd)[LAYER - 1]
    np.testing.assert_allclose(row, expected.numpy(), rtol=1e-5, atol=1e-6)
    assert not flat.reshape(-1, llama.n_embd)[: LAYER - 1].any()
    # ... and it moves llama.cpp's greedy reply along the direction, coherently
    assert steered != plain, steered
    before, after = _projection(smol, pirate, plain), _projection(smol, pirate, steered)
    print(f"llama.cpp plain ({before:.2f}): {plain!r}\nllama.cpp steered ({after:.2f}): {steered!r}")
    assert after > before + 0.5, (before, after, plain, steered)
    assert _coherent(steered), steered


def test_a_repeng_layout_file_steers_identically_once_imported(smol, pirate, tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "repeng.gguf"
    writer = GGUFWriter(path, "controlvector")  # as repeng's ControlVector.export_gguf writes it
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_uint32("controlvector.layer_count", 2)
    deltas = {layer: steer_op(pirate, STRENGTH, layer).deltas[layer] for layer in (LAYER, LAYER + 1)}
    for layer, delta in deltas.items():
        writer.add_tensor(f"direction.{layer}", delta.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    imported = import_gguf(path, model_id=smol.name, n_layers=smol.n_layers)
    assert imported.layers == [LAYER, LAYER + 1]
    ids = prompt_ids(smol, PROMPT)
    ours = generate_batch(smol, [ids], Sampling(24), ops=[steer_op(pirate, STRENGTH, [LAYER, LAYER + 1])])[0]
    theirs = generate_batch(smol, [ids], Sampling(24), ops=[steer_op(imported, 1.0, units="raw")])[0]
    assert theirs.token_ids == ours.token_ids
    for layer, delta in deltas.items():
        torch.testing.assert_close(imported.direction(layer), delta)

"""`import personaxis as px`: one import finds everything, stays light, and its context managers work on a
`ChatModel` or a plain Hugging Face model, nest, and leave the model untouched."""

import subprocess
import sys

import pytest
import torch
from serve.serving_helpers import random_vectors

import personaxis as px
from personaxis.engine import Add, Cap, engine_for
from personaxis.vectors import CapConfig

CHATS = [[{"role": "user", "content": "Plan my weekend"}], [{"role": "user", "content": "Hi"}]]


def _python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_every_name_resolves_and_the_import_stays_light():
    assert _python("import sys, personaxis as px; print('torch' in sys.modules, px.__version__)") == "False 0.1.0"
    for name in px.__all__:
        assert getattr(px, name) is not None, name
    assert set(px.__all__) <= set(dir(px))


def test_no_public_name_is_also_a_submodule():
    """`import personaxis.X` sets X on the package: a function of that name would be replaced by the module."""
    import pkgutil

    submodules = {info.name for info in pkgutil.iter_modules(px.__path__)}
    assert not submodules & set(px.__all__)
    code = "import personaxis.inference.generation, personaxis.inference.steering, personaxis as px; "
    code += "print(px.generate, px.steer)"
    assert "function generate" in _python(code)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_steer_on_a_plain_hf_model_is_the_engine_op_and_leaves_it_untouched(tiny):
    hf = tiny.model  # what a notebook has: a transformers model, no personaxis wrapper
    vectors = random_vectors(tiny, ("v",), seed=1)
    ids = torch.randint(20, len(tiny.tokenizer), (2, 6), generator=torch.Generator().manual_seed(0))
    before, hooks = _logits(hf, ids), _hooks(hf)  # transformers may keep hooks of its own
    with px.steer(hf, vectors, 0.2, 2):
        assert _hooks(hf) > hooks
        steered = _logits(hf, ids)
    with engine_for(tiny).apply([px.steer_op(vectors, 0.2, 2)]):
        reference = _logits(hf, ids)
    torch.testing.assert_close(steered, reference, rtol=0, atol=0)
    assert not torch.allclose(steered, before)
    assert _hooks(hf) == hooks
    torch.testing.assert_close(_logits(hf, ids), before, rtol=0, atol=0)


def test_blocks_nest_as_one_apply_with_the_outer_ops_first(tiny):
    vectors = random_vectors(tiny, ("v",), seed=2)
    config = CapConfig.from_vectors(vectors, {1: 3.0, 2: 3.0})
    ids = torch.randint(20, len(tiny.tokenizer), (2, 6), generator=torch.Generator().manual_seed(1))
    with px.steer(tiny, vectors, 0.3, 1), px.cap(tiny, config) as capped, px.monitor(tiny, vectors, 2) as trace:
        nested = _logits(tiny.model, ids)
    ops = [px.steer_op(vectors, 0.3, 1), px.cap_op(config), px.project_op(vectors, 2)]
    with engine_for(tiny).apply(ops) as together:
        reference = _logits(tiny.model, ids)
    torch.testing.assert_close(nested, reference, rtol=0, atol=0)
    torch.testing.assert_close(trace.projections("v"), together.projections("v"), rtol=0, atol=0)
    assert capped.cap_hits is not None and torch.equal(capped.cap_hits, together.cap_hits)
    assert isinstance(ops[0], Add) and isinstance(ops[1], Cap)


def test_px_generate_inside_a_block_equals_generate_with_the_op(tiny):
    vectors = random_vectors(tiny, ("v",), seed=3)
    sampling = px.Sampling(max_new_tokens=8)
    with px.steer(tiny, vectors, 0.5, 2):
        inside = px.generate(tiny, CHATS, sampling)
    given = px.generate(tiny, CHATS, sampling, ops=[px.steer_op(vectors, 0.5, 2)])
    plain = px.generate(tiny, CHATS, sampling)
    assert [g.token_ids for g in inside] == [g.token_ids for g in given]
    assert [g.token_ids for g in inside] != [g.token_ids for g in plain]


def test_load_model_takes_a_model_already_loaded(tiny):
    model = px.load_model(tiny.model, tokenizer=tiny.tokenizer)
    assert isinstance(model, px.ChatModel) and model.model is tiny.model and model.n_layers == tiny.n_layers
    assert px.generate(model, CHATS[:1], px.Sampling(max_new_tokens=4))[0].token_ids
    assert px.load_model(tiny) is tiny
    with pytest.raises(px.PersonaxisError, match="expected a model spec or a torch model, got int"):
        px.load_model(42)

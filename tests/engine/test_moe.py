"""The engine on tiny random mixtures of experts (and the dense families beside them), against references in the test.

Each architecture is a random-init config of a few layers (`tiny.tiny_config`): GLM-4.7-Flash's `glm4_moe_lite` (MLA
attention, a dense first layer, a shared expert), `qwen3_moe`, `gpt_oss` (sliding windows, attention sinks), and the
other MoE families of transformers that build in milliseconds. An op's reference is a plain forward hook written here,
one token at a time; the engine must give the same block outputs and logits, and leave the model as it found it.
"""

from dataclasses import replace

import pytest
import torch
from tiny import MOE, tiny_causal_lm

from personaxis.engine import Ablate, Add, Cap, Project, Record, engine_for
from personaxis.engine.hooks import _rewrap, _unwrap
from personaxis.inference.generation import Sampling, generate_batch
from personaxis.model import ChatModel
from personaxis.model.blocks import find_blocks

H = 64  # tiny_config's default hidden size
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module", params=MOE)
def moe(request, tokenizer) -> ChatModel:
    return ChatModel(model=tiny_causal_lm(request.param, len(tokenizer)), tokenizer=tokenizer, name=request.param)


@pytest.fixture()
def ids(moe):
    torch.manual_seed(1)
    return torch.randint(20, len(moe.tokenizer), (2, 11))  # longer than gpt_oss's sliding window of 8


def hooked_forward(model: ChatModel, ids: torch.Tensor, edits=None):
    """Logits and every block's output ([L] of [B, S, H]) of a plain forward, `edits[layer](h)` replacing the output
    of block `layer` (registered first, so the readers registered after it see the edited output)."""
    handles, outputs = [], {}
    for layer, edit in (edits or {}).items():
        handles.append(
            model.blocks[layer].register_forward_hook(lambda m, a, out, e=edit: _rewrap(out, e(_unwrap(out))))
        )
    for layer, block in enumerate(model.blocks):
        handles.append(block.register_forward_hook(lambda m, a, out, i=layer: outputs.setdefault(i, _unwrap(out))))
    try:
        with torch.no_grad():
            logits = model.model(input_ids=ids, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits, [outputs[i] for i in range(model.n_layers)]


def engine_forward(model: ChatModel, ids: torch.Tensor, ops):
    """Logits and every block's output through the engine, read by its own recorder (segments = positions)."""
    batch, width = ids.shape
    record = Record("tokens", range(model.n_layers), weights=torch.eye(width).expand(batch, width, width).clone())
    with torch.no_grad(), engine_for(model).apply([*ops, record]) as trace:
        logits = model.model(input_ids=ids, use_cache=False).logits
    means = trace.means("tokens")  # [B, S, L, H]
    return logits, [means[:, :, layer] for layer in range(model.n_layers)]


def per_token(fn):
    """An edit of a block output that applies `fn` to each token's vector, one by one: slow and plain."""

    def edit(h):
        return torch.stack([torch.stack([fn(x) for x in row]) for row in h])

    return edit


def reference_cap(x, u, floor, ceiling):
    p = float(x @ u)
    if floor is not None and p < floor:
        return x + (floor - p) * u
    if ceiling is not None and p > ceiling:
        return x - (p - ceiling) * u
    return x


def test_the_config_is_a_mixture_of_experts_and_its_blocks_are_found(moe):
    """The decoder layers, not a list of experts inside one of them (as many as the layers in these configs)."""
    path, blocks = find_blocks(moe.model)
    assert path == moe.blocks_path == "model.layers"
    assert blocks is moe.model.model.layers and len(blocks) == moe.n_layers == 3
    assert any("expert" in name for name, _ in blocks[-1].named_parameters())


def test_record_is_hidden_states_i_plus_1(moe, ids):
    with torch.no_grad():
        states = moe.model(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(states) == moe.n_layers + 1
    _, recorded = engine_forward(moe, ids, [])
    for layer in range(moe.n_layers - 1):  # the last entry of hidden_states has the final norm applied
        torch.testing.assert_close(recorded[layer], states[layer + 1], **TOL)
    _, plain = hooked_forward(moe, ids)
    torch.testing.assert_close(recorded[-1], plain[-1], **TOL)


def _ops_and_references(seed: int, plain: list[torch.Tensor]):
    """Ops and their references; the cap window is the middle half of the unedited projections on its direction at
    block 0, so that it lifts some tokens, lowers others and leaves the rest, whatever the scale of the stream."""
    g = torch.Generator().manual_seed(seed)
    v, w = torch.randn(H, generator=g), torch.randn(H, generator=g)
    u, uw = v / v.norm(), w / w.norm()
    delta = 2 * torch.randn(H, generator=g)
    low, high = (float(q) for q in torch.quantile(plain[0] @ uw, torch.tensor([0.25, 0.75])))
    return {
        "add": ([Add({1: delta})], {1: per_token(lambda x: x + delta)}),
        "ablate": ([Ablate({0: v})], {0: per_token(lambda x: x - (x @ u) * u)}),
        "cap_floor": ([Cap({1: v}, floor=0.5)], {1: per_token(lambda x: reference_cap(x, u, 0.5, None))}),
        "cap_window": (
            [Cap({0: w, 1: w}, floor=low, ceiling=high)],
            {i: per_token(lambda x: reference_cap(x, uw, low, high)) for i in (0, 1)},
        ),  # fmt: skip
        "add_then_cap": (
            [Add({1: delta}), Cap({1: v}, ceiling=0.0)],
            {1: per_token(lambda x: reference_cap(x + delta, u, None, 0.0))},
        ),  # fmt: skip
    }


@pytest.mark.parametrize("kind", ["add", "ablate", "cap_floor", "cap_window", "add_then_cap"])
def test_interventions_equal_a_hand_written_hook_through_the_experts(moe, ids, kind):
    """Every block's output and the logits: the layers above the edit route the edited stream through the experts."""
    _, plain = hooked_forward(moe, ids)
    ops, edits = _ops_and_references(2, plain)[kind]
    logits, outputs = engine_forward(moe, ids, ops)
    ref_logits, ref_outputs = hooked_forward(moe, ids, edits)
    for layer in range(moe.n_layers):
        torch.testing.assert_close(outputs[layer], ref_outputs[layer], **TOL)
    torch.testing.assert_close(logits, ref_logits, **TOL)
    edited = min(edits)
    assert not torch.allclose(ref_outputs[edited], plain[edited], **TOL)  # the op did move the stream
    if kind == "ablate":
        u = ops[0].directions[0] / ops[0].directions[0].norm()
        assert float((outputs[0] @ u).abs().max()) < 1e-4


def test_project_equals_a_dot_product_and_leaves_logits_bit_identical(moe, ids):
    g = torch.Generator().manual_seed(3)
    v = {layer: torch.randn(H, generator=g) for layer in range(moe.n_layers)}
    bare, plain = hooked_forward(moe, ids)
    with torch.no_grad(), engine_for(moe).apply([Project("p", v)]) as trace:
        hooked = moe.model(input_ids=ids, use_cache=False).logits
    assert torch.equal(bare, hooked)
    got = trace.projections("p")
    for layer in range(moe.n_layers):
        expected = torch.tensor([[float(x @ v[layer]) / float(v[layer].norm()) for x in row] for row in plain[layer]])
        torch.testing.assert_close(got[:, :, layer], expected, **TOL)


def _vanilla_generate(moe, ids):
    with torch.no_grad():
        out = moe.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True)  # fmt: skip
    return out.sequences, torch.stack(out.logits)


def test_ops_leave_the_model_untouched(moe, ids):
    def hooks():
        return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in moe.model.modules()]

    attention = moe.model.config._attn_implementation
    before_hooks, (before_tokens, before_logits) = hooks(), _vanilla_generate(moe, ids)
    g = torch.Generator().manual_seed(4)
    v = torch.randn(H, generator=g)
    ops = [
        Add({0: 3 * v}, when="response"),
        Cap({1: v}, floor=0.5),
        Ablate({2: v}, when="prompt"),
        Project("p", {1: v}),
    ]
    prompts = ids.tolist()
    steered = generate_batch(moe, prompts, Sampling(max_new_tokens=6), ops=ops, capture_layers=[0, 2])
    assert all(g.cap_hits > 0 for g in steered)
    after_tokens, after_logits = _vanilla_generate(moe, ids)
    assert hooks() == before_hooks
    assert torch.equal(before_tokens, after_tokens) and torch.equal(before_logits, after_logits)
    assert moe.model.config._attn_implementation == attention


def prompts_for(tokenizer):
    texts = ["Hello there", "What is the capital of France? Tell me about the sea and the wind", "Ahoy"]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_rows_with_different_ops_equal_each_row_alone(moe):
    prompts = prompts_for(moe.tokenizer)
    g = torch.Generator().manual_seed(5)
    v, w = torch.randn(H, generator=g), torch.randn(H, generator=g)
    specs = [[Add({1: 4 * v / v.norm()})], [Cap({1: w}, floor=1.0)], []]
    read = Project("p", {0: w, 2: w})  # one readout over every row
    mixed = [replace(op, rows=(row,)) for row, spec in enumerate(specs) for op in spec]
    sampling = Sampling(max_new_tokens=8)
    together = generate_batch(moe, prompts, sampling, ops=[*mixed, read], capture_layers=[0, 1, 2])
    for prompt, spec, batched in zip(prompts, specs, together, strict=True):
        (alone,) = generate_batch(moe, [prompt], sampling, ops=[*spec, read], capture_layers=[0, 1, 2])
        assert alone.token_ids == batched.token_ids
        assert alone.cap_hits == batched.cap_hits
        torch.testing.assert_close(alone.projections["p"], batched.projections["p"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(alone.means["response"], batched.means["response"], rtol=1e-4, atol=1e-5)
    assert together[1].cap_hits > 0


def test_kv_cached_generation_with_ops_equals_recomputing_without_a_cache(moe):
    """Steering, capping and recording the reply under the KV cache equals one cache-free forward over the whole
    chat with the same edit on the reply positions (the last prompt token and after), by the hook written here."""
    prompt = prompts_for(moe.tokenizer)[1]  # 14 tokens: past gpt_oss's window of 8
    g = torch.Generator().manual_seed(6)
    v, delta = torch.randn(H, generator=g), 3 * torch.randn(H, generator=g)
    u = v / v.norm()
    ops = [Add({0: delta}, when="response"), Cap({1: v}, floor=0.25, when="response")]
    (out,) = generate_batch(moe, [prompt], Sampling(max_new_tokens=8), ops=ops, capture_layers=[0, 1, 2])
    full = torch.tensor([prompt + out.token_ids])
    first = len(prompt) - 1

    def on_reply(fn):
        def edit(h):
            h = h.clone()
            h[:, first:] = per_token(fn)(h[:, first:])
            return h

        return edit

    edits = {0: on_reply(lambda x: x + delta), 1: on_reply(lambda x: reference_cap(x, u, 0.25, None))}
    logits, outputs = hooked_forward(moe, full, edits)
    assert logits[0, first:-1].argmax(-1).tolist() == out.token_ids
    reference = torch.stack([outputs[layer][0, len(prompt) :].mean(0) for layer in range(moe.n_layers)])
    torch.testing.assert_close(out.means["response"], reference, rtol=1e-4, atol=1e-5)
    assert out.cap_hits > 0

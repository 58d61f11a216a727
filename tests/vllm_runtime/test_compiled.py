"""The same ops under vLLM's default CPU compilation (torch.compile; no --enforce-eager).

The layer hooks are traced once and the custom op `personaxis::layer_ops` stays one opaque node of the compiled
graph, reading the plan prepared before each forward. Results must equal the HF runtime as in eager mode.
"""

import pytest
import torch
from vllm_runtime.helpers import CHATS, GREEDY, LAYERS, cosines, teacher_forced

from personaxis.engine import Add, Cap, Project
from personaxis.inference.generation import prompt_ids

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def compiled(default_folder):
    from personaxis.vllm import VLLMModel

    model = VLLMModel(default_folder, dtype="float32", enforce_eager=False, max_model_len=1024, max_num_seqs=8)
    assert model.llm.llm_engine.vllm_config.compilation_config.mode != 0  # compiled, not eager
    yield model
    model.close()


def test_compiled_ops_equal_the_hf_runtime(compiled, hf_fp32):
    from vllm import SamplingParams

    torch.manual_seed(0)
    axis = torch.randn(compiled.hidden_size)
    prompts = [prompt_ids(compiled, chat) for chat in CHATS]
    vanilla = compiled.llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(max_tokens=16, temperature=0, stop_token_ids=compiled._stops),
        use_tqdm=False,
    )
    plain = compiled.generate(CHATS, GREEDY)
    for out, mine in zip(vanilla, plain, strict=True):
        assert [t for t in out.outputs[0].token_ids if t not in compiled._stops] == mine.token_ids

    tau = 2.0
    ops = [Add({10: 3.0 * axis / axis.norm()}, when="response"), Cap({16: axis}, floor=tau), Project("p", {16: axis})]
    out = compiled.generate(CHATS, GREEDY, ops=ops, capture_layers=LAYERS)
    assert sum(g.cap_hits for g in out) > 0
    for prompt, generation in zip(prompts, out, strict=True):
        means, trace = teacher_forced(hf_fp32, prompt, generation.token_ids, ops, LAYERS)
        assert float(cosines(generation.means["response"], means).min()) >= 0.9999
        assert (generation.projections["p"] >= tau - 1e-4).all()

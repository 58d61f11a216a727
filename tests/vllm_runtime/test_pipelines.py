"""The pipelines with vLLM as the generator (`--generator vllm`): rollouts and their means in one pass, written
through the run store, resumable, with the same artifacts whether rerun or resumed.

Bit-identical resumes need what they need on the HF runtime (tests/test_crash_safety.py): one sequence at a time, so
that a sample's floats do not depend on what else is pending, and here also no prefix cache (a prefix computed for
another request is the same KV only to rounding). With batching, a resumed run agrees to ~1e-6 instead."""

import shutil
import sqlite3

import pytest
import torch
from test_crash_safety import same_artifacts

from personaxis.axis.build import BuildConfig, build_axis
from personaxis.axis.library import load_roles
from personaxis.axis.rollouts import CAPTURES, ROLLOUT_STAGE
from personaxis.backends.runs import LocalBackend
from personaxis.store import RunStore

pytestmark = pytest.mark.vllm

ROLES = [r for r in load_roles() if r.name in ("pirate", "librarian", "demon", "therapist")]
QUESTIONS = ["Who are you?", "What do you do all day?"]
CONFIG = BuildConfig(questions=2, max_tokens=12, judge="none", min_count=1, traits=0, batch_size=1)


@pytest.fixture(scope="module")
def runtime(default_folder):
    from personaxis.vllm import VLLMModel

    model = VLLMModel(
        default_folder, dtype="float32", enforce_eager=True, max_model_len=1024, max_num_seqs=1,
        enable_prefix_caching=False,
    )  # fmt: skip
    yield model
    model.close()


def _build(hf, runtime, run, calls):
    backend = LocalBackend(runtime, range(runtime.n_layers), CAPTURES, batch_size=1)
    generate = runtime.generate

    def counted(chats, *args, **kwargs):
        calls.append(len(chats))
        return generate(chats, *args, **kwargs)

    proxy = {"__getattr__": lambda _, name: getattr(runtime, name), "generate": staticmethod(counted)}
    backend.model = type("Counted", (), proxy)()
    return build_axis(hf, run, CONFIG, roles=ROLES, questions=QUESTIONS, backend=backend, progress=False)


def test_axis_build_on_vllm_is_one_pass_and_resumes_to_the_same_artifacts(runtime, hf_fp32, tmp_path):
    calls: list[int] = []
    result = _build(hf_fp32, runtime, tmp_path / "a", calls)
    n = sum(calls)
    assert n == result.summary["counts"]["role_replies"] + result.summary["counts"]["default_replies"]
    assert result.summary["roles"]["kept"] == sorted(r.name for r in ROLES)

    records = list(RunStore(tmp_path / "a").items(ROLLOUT_STAGE))
    assert len(records) == n
    for _, record in records:  # the means were read in the generating pass (their parity: test_runtime.py)
        for name in CAPTURES:
            means = record.tensors[name]
            assert means.shape == (runtime.n_layers, runtime.hidden_size) and bool(torch.isfinite(means).all())

    # rerun: everything comes from the store, nothing is generated
    calls.clear()
    _build(hf_fp32, runtime, tmp_path / "a", calls)
    assert calls == []

    # resume after losing half the replies: only those are generated, and the artifacts are the same bytes
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "artifacts")
    with sqlite3.connect(tmp_path / "b" / "records.sqlite") as db:
        keys = [k for (k,) in db.execute("SELECT key FROM records WHERE stage = ?", (ROLLOUT_STAGE,))]
        db.executemany("DELETE FROM records WHERE stage = ? AND key = ?", [(ROLLOUT_STAGE, k) for k in keys[::2]])
    _build(hf_fp32, runtime, tmp_path / "b", calls)
    assert sum(calls) == len(keys[::2])
    assert same_artifacts(tmp_path / "a", tmp_path / "b") == 0.0


def test_the_records_of_vllm_and_the_hf_runtime_never_share_a_key(runtime, hf_fp32):
    ours = LocalBackend(runtime, [1, 2], ("response",)).identity()
    theirs = LocalBackend(hf_fp32, [1, 2], ("response",)).identity()
    assert ours.pop("runtime") == "vllm" and "runtime" not in theirs
    assert ours == theirs  # otherwise the same: model, revision, dtype, layers, captures

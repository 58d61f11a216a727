"""Resumable stages: results are stored per sample, a rerun redoes nothing, and a new setting makes new records."""

import torch

from personaxis.backends.runs import LocalBackend, Rollout, longest_first, run_captures, run_rollouts
from personaxis.inference.capture import encode_means
from personaxis.inference.generation import Sampling
from personaxis.store import RunStore


class CountingBackend(LocalBackend):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.generated = 0

    def stream(self, rollouts):
        self.generated += len(rollouts)
        yield from super().stream(rollouts)


def rollouts(n=3, max_new_tokens=4):
    return [
        Rollout.make(f"r{i}", [{"role": "user", "content": f"Hello there {i}"}], Sampling(max_new_tokens), index=i)
        for i in range(n)
    ]


def test_rollouts_resume_and_rekey(tiny, tmp_path):
    store = RunStore(tmp_path / "run")
    backend = CountingBackend(tiny, [0, 2], captures=("response", "last_prompt"), batch_size=2)
    first = run_rollouts(store, rollouts(2), backend, progress=False)
    assert backend.generated == 2
    again = run_rollouts(store, rollouts(3), backend, progress=False)
    assert backend.generated == 3  # only the new sample was generated
    assert again["r0"].data["text"] == first["r0"].data["text"]
    assert again["r1"].tensors["response"].shape == (2, 64)
    assert again["r2"].data["labels"] == {"index": 2}
    run_rollouts(store, rollouts(3, max_new_tokens=5), backend, progress=False)
    assert backend.generated == 6  # a changed setting is a different sample
    assert store.count("rollouts") == 6


def test_captures_match_encode_and_resume(tiny, tmp_path):
    store = RunStore(tmp_path / "run")
    chats = {
        "a": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}],
        "b": [{"role": "user", "content": "What is the capital?"}, {"role": "assistant", "content": "Paris"}],
    }
    records = run_captures(store, tiny, chats, [1, 3], progress=False)
    expected = encode_means(tiny, list(chats.values()), [1, 3], ("response", "prompt", "last_prompt"))
    for i, cid in enumerate(chats):
        torch.testing.assert_close(records[cid].tensors["response"], expected[i, 0])
        torch.testing.assert_close(records[cid].tensors["last_prompt"], expected[i, 2])
    assert run_captures(store, tiny, chats, [1, 3], progress=False).keys() == records.keys()
    assert store.count("captures") == 2


def test_batches_run_the_largest_budget_then_the_longest_prompt_first_and_cover_every_rollout_once():
    sizes = [(64, 5), (64, 9), (256, 1), (64, 9), (256, 3), (64, 7), (64, 2)]
    batches = longest_first(sizes, 3)
    assert batches == [[4, 2, 1], [3, 5, 0], [6]]  # ties keep their order
    assert sorted(i for b in batches for i in b) == list(range(len(sizes)))
    assert longest_first([], 4) == []


def test_the_local_backend_generates_the_largest_rollouts_first(tiny):
    chats = [[{"role": "user", "content": "Hi " * n}] for n in (1, 8, 3, 2)]
    budgets = (2, 2, 2, 3)
    backend = LocalBackend(tiny, [0], batch_size=1)
    rollouts = [Rollout.make(f"r{i}", c, Sampling(b)) for i, (c, b) in enumerate(zip(chats, budgets, strict=True))]
    done = [r.rollout.id for batch in backend.stream(rollouts) for r in batch]
    assert done == ["r3", "r1", "r2", "r0"]

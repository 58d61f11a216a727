"""RayBackend on a local Ray with two CPU workers: the same results as LocalBackend, even when a worker is killed."""

from dataclasses import replace

import pytest
import torch
from backends.helpers import threads

from personaxis.backends import RayBackend, backend_from_options
from personaxis.backends.runs import LocalBackend, Rollout, run_rollouts
from personaxis.errors import PersonaxisError
from personaxis.inference.generation import Sampling
from personaxis.model import load_model
from personaxis.store import RunStore

ray = pytest.importorskip("ray")

LAYERS = [0, 2, 3]
CAPTURES = ("response", "last_prompt")
PROMPTS = ["Hello there", "What is the capital of France?", "Tell me about the sea, the waves and the wind", "Ahoy"]


def rollouts(n: int, temperature: float = 0.0) -> list[Rollout]:
    return [
        Rollout.make(
            f"r{i}",
            [
                {"role": "system", "content": "You are a pirate."},
                {"role": "user", "content": PROMPTS[i % 4] * (1 + i % 3)},
            ],
            Sampling(max_new_tokens=5 + i % 4, temperature=temperature, top_p=0.9, seed=i if temperature else None),
            index=i,
        )
        for i in range(n)
    ]


def run_local(store: RunStore, items: list[Rollout], local: LocalBackend) -> dict:
    with threads(1):
        return run_rollouts(store, items, local, progress=False)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for rid in a:
        assert a[rid].data == b[rid].data
        assert a[rid].tensors.keys() == b[rid].tensors.keys()
        for name, tensor in a[rid].tensors.items():
            assert torch.equal(tensor, b[rid].tensors[name]), (rid, name)


@pytest.fixture(scope="module")
def cluster(local_ray, tiny_folder):
    with RayBackend(tiny_folder, LAYERS, CAPTURES, workers=2, batch_size=3) as backend:
        yield backend


@pytest.fixture(scope="module")
def local(tiny_folder) -> LocalBackend:
    return LocalBackend(load_model(tiny_folder), LAYERS, CAPTURES, batch_size=3)


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_same_results_as_local(cluster, local, tmp_path, temperature):
    items = rollouts(14, temperature)
    assert cluster.identity() == local.identity()  # so a run can move between executors and keep its records
    expected = run_local(RunStore(tmp_path / "local"), items, local)
    got = run_rollouts(RunStore(tmp_path / "ray"), items, cluster, progress=False)
    assert_same(got, expected)
    assert len({r.data["text"] for r in got.values()}) > 1


def test_a_killed_worker_is_replaced_and_its_shard_redone(cluster, local, tmp_path):
    items = rollouts(16, temperature=1.0)
    expected = run_local(RunStore(tmp_path / "local"), items, local)
    before = replace(cluster.stats)

    class KillOneWorker:
        """Kills a worker as soon as the first group is back, while it still holds shards."""

        def identity(self):
            return cluster.identity()

        def stream(self, pending):
            for n, group in enumerate(cluster.stream(pending)):
                if n == 0:
                    ray.kill(cluster.actors[0])
                yield group

    store = RunStore(tmp_path / "ray")
    got = run_rollouts(store, items, KillOneWorker(), progress=False)
    lost, started = cluster.stats.actors_lost - before.actors_lost, cluster.stats.actors_started - before.actors_started
    redone, shards = cluster.stats.redone - before.redone, cluster.stats.shards - before.shards
    assert lost == 1 and started == 1 and redone >= 1 and shards == 6 + redone
    assert_same(got, expected)
    assert store.count("rollouts") == len(items)


def test_workers_that_cannot_be_placed_time_out(cluster, tiny_folder):
    extra = RayBackend(tiny_folder, LAYERS, workers=1, start_timeout=3)  # both CPUs are held by `cluster`
    with pytest.raises(PersonaxisError, match="did not start within 3 s"):
        extra.identity()


def test_options_choose_the_backend(local_ray, tiny_folder, tiny):  # after the others: starts no workers
    assert isinstance(backend_from_options(tiny, LAYERS), LocalBackend)
    ray_backend = backend_from_options(str(tiny_folder), LAYERS, executor="ray", workers=2, batch_size=4)
    assert isinstance(ray_backend, RayBackend) and not ray_backend.actors  # workers start on first use
    assert ray_backend.options["batch_size"] == 4 and ray_backend.workers == 2

"""The pipelines on a local Ray with two CPU workers: `axis build --executor ray` gives the local build's artifacts,
and a local-model judge sharded over the actors gives the local judge's answers."""

import time

import pytest
from backends.helpers import threads
from cli_runner import invoke as run_cli

from personaxis.backends import RayBackend, RayJudge
from personaxis.errors import PersonaxisError
from personaxis.judge import LocalJudge, trait_prompt
from personaxis.judge.spec import judge_from_spec
from personaxis.model import load_model
from personaxis.store import RunStore

pytest.importorskip("ray")

BUILD = "axis build -m {m} --roles 3 --questions 2 --max-tokens 4 --judge none --min-count 1 --traits 1 "
BUILD += "--dtype float32 --batch-size 3 --run {run}"


def build(monkeypatch, capsys, folder, run, *extra: str) -> None:
    with threads(1):  # as each Ray worker runs: the thread count changes float rounding
        code, _, err = run_cli(monkeypatch, capsys, *BUILD.format(m=folder, run=run).split(), *extra)
    assert code == 0, err


def released(ray, timeout: float = 10.0) -> bool:
    """Both CPUs free again (a killed actor's resources come back shortly after)."""
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0) < 2:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_axis_build_on_ray_equals_local(local_ray, tiny_folder, tmp_path, monkeypatch, capsys):
    build(monkeypatch, capsys, tiny_folder, tmp_path / "local")
    build(monkeypatch, capsys, tiny_folder, tmp_path / "ray", "--executor", "ray", "--workers", "2")
    assert released(local_ray)  # the command closed its backend: the actors are gone
    local, ray = RunStore(tmp_path / "local"), RunStore(tmp_path / "ray")
    assert local.count("rollouts") == ray.count("rollouts") > 40
    for key, record in local.items("rollouts"):
        other = ray.get("rollouts", key)
        assert other is not None and other.data == record.data
        assert other.tensors["response"].nan_to_num().equal(record.tensors["response"].nan_to_num())
    files = sorted(p.name for p in (tmp_path / "local" / "artifacts").iterdir())
    assert files == ["axis.safetensors", "pca.safetensors", "roles.safetensors", "traits.safetensors"]
    for name in files:  # byte for byte
        assert (tmp_path / "ray/artifacts" / name).read_bytes() == (tmp_path / "local/artifacts" / name).read_bytes()


def test_judge_sharded_over_actors_equals_local_judge(local_ray, tiny_folder, tmp_path):
    model = load_model(tiny_folder)
    local = judge_from_spec("local:same", same=model)
    assert isinstance(local, LocalJudge)
    prompts = [trait_prompt("Rate how much this is like a pirate.", f"Question {i}?", "Arr " * i) for i in range(11)]
    with RayBackend(tiny_folder, [0], workers=2, dtype="float32") as backend:
        judge = RayJudge(backend, cache=RunStore(tmp_path))
        assert judge.judge_id == local.judge_id and not backend.actors  # the id (and cache) without starting workers
        got = judge.number_probs(prompts, 100)
        assert len(backend.actors) == 2 and backend.stats.shards == 0  # judging is not counted as rollout shards
        labels = judge.classify_many(prompts[:5], ["0", "1", "2", "3"])
    with threads(1):
        expected = local.number_probs(prompts, 100)
        expected_labels = local.classify_many(prompts[:5], ["0", "1", "2", "3"])
    assert sum(len(e.probs) for e in expected) > 100  # a random model spreads mass over many numbers: a real check
    for g, e in zip(got, expected, strict=True):  # equal up to the float rounding of other batch compositions
        assert g.error is None and g.raw == e.raw and g.probs.keys() == e.probs.keys()
        assert g.probs == pytest.approx(e.probs, rel=1e-4, abs=1e-12)
    assert [(r.label, r.failed) for r in labels] == [(r.label, r.failed) for r in expected_labels]
    assert judge.stats.requests == 16 and RunStore(tmp_path).count("judge") == 16  # cached by the driver


def test_workers_must_agree_with_the_identity_known_beforehand(local_ray, tiny_folder):
    backend = RayBackend(tiny_folder, [0], workers=1, dtype="float32")
    backend._identity = {**backend.identity(), "dtype": "torch.bfloat16"}  # as if the keys had promised another dtype
    with pytest.raises(PersonaxisError, match="Ray workers loaded .* as .*torch.float32.*, not .*torch.bfloat16"):
        backend.start()
    assert not backend.actors and released(local_ray)

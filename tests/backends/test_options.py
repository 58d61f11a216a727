"""backend_from_options: one call for every pipeline, and wrong mixes of options fail before any work."""

import pytest

from personaxis.backend_cli import BackendOptions, judge_on
from personaxis.backends import OpenAIBackend, RayBackend, RayJudge, backend_from_options
from personaxis.errors import PersonaxisError
from personaxis.runs import LocalBackend


def test_each_choice(tiny, tiny_folder):
    local = backend_from_options(tiny, [1], ("response",), batch_size=3)
    assert isinstance(local, LocalBackend) and local.batch_size == 3 and local.model is tiny
    assert isinstance(backend_from_options(tiny_folder, [1]), LocalBackend)  # a spec is loaded
    remote = backend_from_options(tiny, [1], generator="openai", base_url="http://127.0.0.1:1/v1")
    assert isinstance(remote, OpenAIBackend) and remote.model_name == tiny.name and remote.model is tiny
    named = backend_from_options(tiny, [1], generator="openai", base_url="http://h/v1", generator_model="served")
    assert named.identity()["generator"] == "openai-compatible:served"
    ray = backend_from_options(tiny_folder, [1], executor="ray", ray_address="auto", workers=4)
    assert isinstance(ray, RayBackend) and (ray.workers, ray.ray_address) == (4, "auto") and not ray.actors
    assert backend_from_options(tiny, [1], executor="ray").options["dtype"] == "float32"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"executor": "spark"}, "unknown executor 'spark'"),
        ({"generator": "vllm"}, "unknown generator 'vllm'"),
        ({"workers": 4}, "--workers need --executor ray"),
        ({"ray_address": "auto"}, "--ray-address and --workers need --executor ray"),
        ({"base_url": "http://h/v1"}, "--base-url and --generator-model need --generator openai"),
        ({"generator": "openai"}, "needs --base-url"),
        ({"generator": "openai", "base_url": "http://h/v1", "executor": "ray"}, "use it with --executor local"),
        ({"executor": "ray", "workers": 0}, "--workers must be at least 1"),
    ],
)
def test_wrong_mixes(tiny, options, message):
    with pytest.raises(PersonaxisError, match=message):
        backend_from_options(tiny, [1], **options)


def test_ray_identity_and_judge_need_no_workers(tiny, tiny_folder):
    """With the dtype known (always so from the pipeline commands), a Ray backend's identity, and with it the keys
    and the judge id, is known without starting Ray; the workers must then agree with it when they start."""
    backend = backend_from_options(tiny, [0, 2], ("response", "prompt"), executor="ray", workers=2)
    local = LocalBackend(tiny, [0, 2], ("response", "prompt"))
    assert backend.identity() == local.identity() and not backend.actors
    assert RayBackend(tiny_folder, [1], dtype="bfloat16").identity()["dtype"] == "torch.bfloat16"
    with pytest.raises(PersonaxisError, match="unknown dtype 'float8'"):
        RayBackend(tiny_folder, [1], dtype="float8")
    judge = judge_on(backend, "local:same", cache=None, model=tiny)
    assert isinstance(judge, RayJudge) and judge.judge_id == "local:tiny-llama" and not backend.actors
    assert judge_on(backend, "openai:judge@http://h/v1", cache=None, model=tiny) is None
    assert judge_on(local, "local:same", cache=None, model=tiny) is None


def test_command_options_open_and_close_one_backend(tiny):
    closed = []
    with BackendOptions().open(tiny, range(2), ("response",), batch_size=3) as backend:
        assert isinstance(backend, LocalBackend) and backend.batch_size == 3 and backend.layers == [0, 1]
    options = BackendOptions(executor="ray", workers=2)
    options.check()
    with options.open(tiny, [1], ("response",), batch_size=5) as backend:
        backend.close = lambda: closed.append(True)
        assert isinstance(backend, RayBackend) and backend.workers == 2 and backend.options["batch_size"] == 5
    assert closed == [True]
    with pytest.raises(PersonaxisError, match="--base-url and --generator-model need --generator openai"):
        BackendOptions(base_url="http://h/v1").check()

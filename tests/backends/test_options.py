"""backend_from_options: one call for every pipeline, and wrong mixes of options fail before any work."""

import pytest

from personaxis.backends import OpenAIBackend, RayBackend, backend_from_options
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
    ],
)
def test_wrong_mixes(tiny, options, message):
    with pytest.raises(PersonaxisError, match=message):
        backend_from_options(tiny, [1], **options)

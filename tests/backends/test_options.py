"""backend_from_options: one call for every pipeline, and wrong mixes of options fail before any work."""

import pytest

from personaxis.backends import OpenAIBackend, RayBackend, RayJudge, backend_from_options
from personaxis.backends.runs import LocalBackend
from personaxis.cli.options import BackendOptions, judge_on
from personaxis.errors import PersonaxisError


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
        ({"generator": "mlx"}, "unknown generator 'mlx'"),
        ({"generator": "vllm", "executor": "ray"}, "--generator vllm runs vLLM in this process"),
        ({"vllm_args": "{}"}, "--vllm-args needs --generator vllm"),
        ({"generator": "vllm", "vllm_args": "{enforce_eager: 1}"}, "--vllm-args is not JSON"),
        ({"generator": "vllm", "vllm_args": "[1]"}, "--vllm-args must be a JSON object"),
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


def test_generator_vllm_without_vllm_is_one_line_before_any_work(tiny):
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is not None and spec.origin is not None:
        pytest.skip("vLLM is installed here")
    with pytest.raises(PersonaxisError, match=r"vLLM is not installed: pip install 'personaxis\[vllm\]'"):
        backend_from_options(tiny, [1], generator="vllm", vllm_args='{"enforce_eager": true}')


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


def test_every_command_with_generator_vllm_says_what_to_install_before_loading(monkeypatch, capsys, tmp_path):
    import importlib.util

    from cli_runner import invoke

    spec = importlib.util.find_spec("vllm")
    if spec is not None and spec.origin is not None:
        pytest.skip("vLLM is installed here")
    missing = tmp_path / "missing"  # nothing is read before the generator is checked
    commands = [
        ["axis", "build", "-m", missing, "--quick", "--run", tmp_path / "run"],
        ["trait", "extract", "evil", "-m", missing, "--run", tmp_path / "run"],
        ["drift", "-m", missing, "--axis", missing],
        ["cap", "sweep", "-m", missing, "--axis", missing, "--run", tmp_path / "run"],
        ["screen", missing, "--trait-vectors", missing, "-m", missing],
    ]
    for args in commands:
        code, _, err = invoke(monkeypatch, capsys, *args, "--generator", "vllm")
        assert code == 2 and "vLLM is not installed" in err and err.strip().count("\n") == 0, (args, err)
    assert not (tmp_path / "run").exists()
    serve = [
        (["--engine", "vllm"], "vLLM is not installed"),
        (["--engine", "tgi"], "unknown engine 'tgi'"),
        (["--vllm-args", "{}"], "--vllm-args needs --engine vllm"),
        (["--engine", "vllm", "--batch-invariant"], "--batch-invariant is a setting of the HF engine"),
    ]
    for args, message in serve:
        code, _, err = invoke(monkeypatch, capsys, "serve", "-m", missing, *args)
        assert code == 2 and message in err and err.strip().count("\n") == 0, (args, err)

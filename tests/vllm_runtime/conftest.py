"""vLLM tests run where vLLM is installed (its own venv: see .ci/run); elsewhere they skip, saying why."""

import importlib.util
import os

import pytest

_spec = importlib.util.find_spec("vllm")
HAS_VLLM = _spec is not None and _spec.origin is not None  # a namespace folder of that name is not vLLM

# A real vLLM engine in this process, on the CPU: small KV cache, fp32
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def pytest_collection_modifyitems(config, items):
    if HAS_VLLM:
        return
    skip = pytest.mark.skip(reason="vLLM is not installed here (CI runs these in its vLLM venv: pytest -m vllm)")
    for item in items:
        if item.get_closest_marker("vllm") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def default_folder():
    from personaxis.model.embedded import fetch_embedded, resolve_embedded

    return str(fetch_embedded(resolve_embedded("default")))


@pytest.fixture(scope="session")
def hf_fp32(default_folder):
    """The same weights on the HF runtime, fp32: the reference for parity."""
    from personaxis.model import load_model

    return load_model(default_folder, dtype="float32")


@pytest.fixture(scope="module")
def runtime(default_folder):
    """A vLLM engine on the default model for one test module (fp32, eager, 8 sequences at once), closed after it."""
    from personaxis.vllm import VLLMModel

    model = VLLMModel(default_folder, dtype="float32", enforce_eager=True, max_model_len=1024, max_num_seqs=8)
    yield model
    model.close()

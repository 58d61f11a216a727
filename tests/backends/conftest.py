from pathlib import Path

import pytest
from backends.helpers import save_tiny


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray with two CPUs for the whole session (starting one costs ~20 s); backends join it."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """The tiny test model saved to a folder, loadable by path from any process."""
    return save_tiny(tmp_path_factory.mktemp("tiny-model"))

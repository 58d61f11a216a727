from pathlib import Path

import pytest
from backends.helpers import save_tiny


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """The tiny test model saved to a folder, loadable by path from any process."""
    return save_tiny(tmp_path_factory.mktemp("tiny-model"))

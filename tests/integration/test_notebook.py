"""examples/quickstart.ipynb runs top to bottom on the embedded model, in a real kernel, so that it cannot rot."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

NOTEBOOK = Path(__file__).parents[2] / "examples" / "quickstart.ipynb"


def test_the_quickstart_notebook_runs(tmp_path):
    nbformat = pytest.importorskip("nbformat", reason="needs the test extra (nbclient)")
    nbclient = pytest.importorskip("nbclient", reason="needs the test extra (nbclient)")
    pytest.importorskip("ipykernel", reason="needs the test extra (ipykernel)")
    notebook = nbformat.read(shutil.copy(NOTEBOOK, tmp_path / NOTEBOOK.name), as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on the first failing cell
    printed = "\n".join(
        output.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    )
    assert "smollm2-135m-instruct 30 layers" in printed
    assert "steering layer " in printed and "strength +0.30: projection " in printed, printed
    assert (tmp_path / "pirate.safetensors").is_file() and (tmp_path / "pirate.gguf").is_file()
    import personaxis as px

    chosen = int(printed.split("steering layer ")[1].split()[0])
    assert px.import_gguf(tmp_path / "pirate.gguf").layers == [chosen]  # the file holds the layer it steered at

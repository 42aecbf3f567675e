"""The notebooks run top to bottom on the shipped models, and are committed without outputs."""

import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_four_notebooks():
    assert [p.name for p in NOTEBOOKS] == [
        "01_quickstart.ipynb", "02_faithfulness.ipynb", "03_layerwise.ipynb", "04_circuits.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name} has outputs: clear them"


def test_notebook_kernel_runs_this_interpreter(tmp_path):
    """The notebooks run in the virtualenv under test (``make test`` runs two, one per
    transformer-lens line): jupyter starts the "python3" kernel with ``sys.executable``."""
    import sys

    import transformer_lens

    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import sys, transformer_lens; print(sys.executable, transformer_lens.__file__)")])
    NotebookClient(notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    printed = "".join(o["text"] for o in notebook.cells[0].outputs if o.get("name") == "stdout").split()
    assert printed == [sys.executable, transformer_lens.__file__]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(notebook, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    seconds = time.perf_counter() - start
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors
    # every figure cell rendered a plotly figure
    figures = [c for c in code if "mechnorm.plot." in c.source.splitlines()[-1]]
    for cell in figures:
        assert any("application/vnd.plotly.v1+json" in o.get("data", {}) for o in cell.outputs), cell.source
    print(f"{path.name}: {seconds:.1f} s")

"""The notebooks run top to bottom on the shipped models, and are committed executed, with
static PNG figures (GitHub shows no plotly.js) and a size a reviewer can read.

Re-execute them with ``experiments/execute_notebooks.py``.
"""

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


MAX_KB = 400  # a few hundred KB: figures are PNG, not plotly.js


def _figure_cells(notebook):
    """Code cells whose last line draws a figure (a mechnorm.plot call)."""
    return [c for c in notebook.cells if c.cell_type == "code" and c.source.strip()
            and "mechnorm.plot." in c.source.strip().splitlines()[-1]]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_executed_with_static_figures(path):
    notebook = nbformat.read(path, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), f"{path.name}: run experiments/execute_notebooks.py"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    figures = _figure_cells(notebook)
    assert figures, path.name
    for cell in figures:
        assert any("image/png" in o.get("data", {}) for o in cell.outputs), cell.source
    assert path.stat().st_size <= MAX_KB * 1024, f"{path.name} is {path.stat().st_size // 1024} KB"
    stderr = "".join(o.get("text", "") for c in code for o in c.outputs if o.get("name") == "stderr")
    assert "IProgress not found" not in stderr and "did not converge" not in stderr


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
    # every figure cell rendered a static image; no tqdm widget warning, no unconverged IG
    for cell in _figure_cells(notebook):
        assert any("image/png" in o.get("data", {}) for o in cell.outputs), cell.source
    stderr = "".join(o.get("text", "") for c in code for o in c.outputs if o.get("name") == "stderr")
    assert "IProgress not found" not in stderr and "did not converge" not in stderr
    print(f"{path.name}: {seconds:.1f} s")

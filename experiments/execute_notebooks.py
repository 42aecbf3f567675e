"""Execute the notebooks in place so they are committed with their outputs (static PNG figures).

GitHub cannot run plotly.js, so each notebook's first cell sets plotly's renderer to ``png``
(kaleido, which needs a Chromium: ``make browser``). Widget state and cell timings are not
stored, so a re-run changes only what the code prints. Run after the code has settled:

    .venv/bin/python experiments/execute_notebooks.py            # all four
    .venv/bin/python experiments/execute_notebooks.py 02         # the ones whose name contains "02"

Each notebook must stay under ``tests/test_notebooks.py``'s size limit; the sizes are printed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def execute(path: Path, timeout: int = 600) -> float:
    """Run ``path`` top to bottom in the ``python3`` kernel (this interpreter) and save it in place."""
    notebook = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(notebook, timeout=timeout, kernel_name="python3", record_timing=False, store_widget_state=False,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    notebook.metadata.pop("widgets", None)
    nbformat.write(notebook, path)
    return time.perf_counter() - start


def main(argv: list[str]) -> None:
    from tqdm.auto import tqdm

    paths = sorted((ROOT / "notebooks").glob("*.ipynb"))
    paths = [p for p in paths if not argv or any(a in p.name for a in argv)]
    for path in tqdm(paths, desc="notebooks", unit="notebook"):
        seconds = execute(path)
        print(f"{path.name}: {seconds:.0f} s, {path.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main(sys.argv[1:])

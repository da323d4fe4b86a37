"""Every notebook in notebooks/ runs top to bottom offline (on the embedded tiny models), so none rots.
Their cells assert what they show (restore is bit-exact, the fine-tune lowers the deviation, FID is finite)."""

import time
from pathlib import Path

import pytest

from helpers import require_module

nbformat = require_module("nbformat")
nbclient = require_module("nbclient")
require_module("ipykernel")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 600


def test_there_are_notebooks():
    assert {p.stem for p in NOTEBOOKS} >= {"01_quickstart", "02_finetune", "03_fid"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    notebook = nbformat.read(str(path), as_version=4)
    assert not any(cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), \
        f"{path.name}: commit notebooks without outputs"
    start = time.perf_counter()
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()   # raises CellExecutionError with the failing cell and its traceback
    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    print(f"{path.name}: {time.perf_counter() - start:.1f} s")

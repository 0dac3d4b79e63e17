"""The notebooks run top to bottom, offline, on the CPU, from nothing prepared.

Each runs in a fresh kernel of this interpreter with a temporary working directory and ``TMPDIR``, so whatever
it writes stays out of the repository.
"""

import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["01_data", "02_tsm", "03_vitask"])
def test_notebook_runs_without_errors(name, tmp_path, monkeypatch):
    env = {
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TMPDIR": str(tmp_path),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # the kernel inherits this process's environment
    monkeypatch.chdir(tmp_path)
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, on the first error

    # jupyter_client starts the kernelspec's `python` as this very interpreter (the venv's ipykernel)
    assert nb.cells[0].outputs[0]["text"].strip() == sys.executable
    errors = [
        out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs if out.output_type == "error"
    ]
    assert not errors

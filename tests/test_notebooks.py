"""The notebooks run top to bottom on a tiny budget (nbclient), so they cannot rot."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["composing_trainers", "trl_alignment", "released_tokens"])
def test_notebook_runs(name, tmp_path, monkeypatch):
    monkeypatch.setenv("SOFTALIGN_NOTEBOOK_BUDGET", "tiny")
    monkeypatch.setenv("SOFTALIGN_ROOT", str(ROOT))
    monkeypatch.setenv("SOFTALIGN_NOTEBOOK_DIR", str(tmp_path))
    notebook = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]

"""``notebooks/similar_items.ipynb`` runs top to bottom on a tiny export."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from towerrec import PROJECT_ROOT

NOTEBOOK = Path(PROJECT_ROOT) / "notebooks" / "similar_items.ipynb"


@pytest.mark.slow
def test_similar_items_notebook_executes(exports, monkeypatch):
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("TOWERREC_EXPORT", str(exports["hnsw"]))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # one grid per query, warm and cold
    assert any("cold results" in o.get("data", {}).get("text/plain", "") for o in outputs)

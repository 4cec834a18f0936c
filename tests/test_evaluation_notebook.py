"""notebooks/evaluation_report.ipynb runs top to bottom on a tiny reproduction's output and plots."""

from __future__ import annotations

import pytest
from test_reproduce import reproduce_tiny

from towerrec import PROJECT_ROOT

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = PROJECT_ROOT / "notebooks" / "evaluation_report.ipynb"


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_notebook_runs_on_reproduce_output(tmp_path_factory, monkeypatch):
    out = reproduce_tiny(tmp_path_factory.getbasetemp() / "reproduce_tiny")
    monkeypatch.setenv("TOWERREC_REPORT_DIR", str(out))  # the kernel inherits the environment
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # recall@K, warm/cold, segments
    text = "".join(o.get("text", "") for o in outputs)
    assert f"{out / 'reproduce.json'}: 4 models" in text

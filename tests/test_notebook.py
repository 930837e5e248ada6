"""The quickstart notebook runs top to bottom (so it cannot rot)."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    # Inline figures, whatever the caller (CI sets Agg) has in the environment.
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "accuracy" not in text and "mse" in text  # the MAML evaluation table printed
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4


def test_the_committed_notebook_keeps_its_outputs_and_nothing_noisy():
    # Committed executed (notebooks/make_quickstart.py), so that it reads on a repository
    # page; no warnings or errors among its outputs.
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code)
    outputs = [o for c in code for o in c.get("outputs", [])]
    assert [o for o in outputs if "image/png" in o.get("data", {})]
    assert not [o for o in outputs if o.get("output_type") == "error"
                or o.get("name") == "stderr"]
    assert not code[0].get("outputs")  # the imports print nothing

"""docs/notebooks/cohort.ipynb runs top to bottom (what ``jupyter nbconvert --execute`` does) on
the embedded cluster, small: 4 slides of 1024 x 1024, the mean model."""

from __future__ import annotations

import os

import pytest

from tests.deploy.conftest import REPO

nbformat = pytest.importorskip("nbformat", reason="the [jupyter] extra is not installed")
nbclient = pytest.importorskip("nbclient", reason="the [jupyter] extra is not installed")

NOTEBOOK = REPO / "docs" / "notebooks" / "cohort.ipynb"


@pytest.mark.slow
def test_cohort_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("NIC_NOTEBOOK_DIR", str(tmp_path / "work"))
    monkeypatch.delenv("NIC_SCHEDULER_FILE", raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]
    text = "".join(out.get("text", "") for out in outputs)
    assert "dashboard: http://127.0.0.1:" in text and "4/4 slides" in text
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) >= 3  # PCA-RGB view, heatmap, ROC curve
    assert (tmp_path / "work" / "run" / "metrics.json").exists()

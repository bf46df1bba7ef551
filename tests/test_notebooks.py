"""The example notebooks run top to bottom with their small settings."""

from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def execute(name: str) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    errors = [output for cell in notebook.cells for output in cell.get("outputs", []) if output.get("output_type") == "error"]
    assert errors == []


def test_calibration_notebook_runs():
    execute("01-calibration")


@pytest.mark.slow
def test_scaling_notebook_runs():
    execute("02-scaling")


@pytest.mark.slow
@pytest.mark.docker
@pytest.mark.torch
def test_sim_vs_real_notebook_runs(docker_client, worker_image):
    execute("03-sim-vs-real")

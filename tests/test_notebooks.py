"""The notebooks under ``notebooks/`` run top to bottom (nbclient) against the smoke run and stay free of outputs.

Each notebook runs in a fresh ``python3`` kernel whose kernelspec is installed into a temporary directory for this
interpreter (``JUPYTER_PATH`` puts it first), so the kernel is this venv's Python whatever kernels the machine has.
The working directory is a temporary one: the notebooks find their run and data through ``DWCP_RUNS`` / ``DWCP_RUN``
/ ``DWCP_DATA`` or, when those are unset, through a ``lightning_logs/`` above the working directory.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
ipykernel_spec = pytest.importorskip("ipykernel.kernelspec")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
NAMES = ["01_data", "02_results", "03_onnx_inference", "04_migration_planning"]
KERNEL = "python3"
ENV_VARS = ("DWCP_RUNS", "DWCP_RUN", "DWCP_DATA")
MAX_BYTES = 60_000  # stored notebooks are source only


def read(name: str):
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


@pytest.fixture(scope="module")
def jupyter_dirs(tmp_path_factory) -> dict[str, str]:
    """Environment for the kernels: a kernelspec running ``sys.executable``, and private config/runtime dirs so that
    nothing in the user's home (IPython startup files, Jupyter config) changes what runs."""
    base = tmp_path_factory.mktemp("jupyter")
    ipykernel_spec.install(kernel_name=KERNEL, prefix=str(base))  # -> base/share/jupyter/kernels/python3
    share = base / "share" / "jupyter"
    spec = json.loads((share / "kernels" / KERNEL / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable
    return {
        "JUPYTER_PATH": os.pathsep.join(filter(None, [str(share), os.environ.get("JUPYTER_PATH")])),
        "JUPYTER_CONFIG_DIR": str(base / "config"),
        "JUPYTER_RUNTIME_DIR": str(base / "runtime"),
        "IPYTHONDIR": str(base / "ipython"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "MPLBACKEND": "Agg",  # headless CI: the notebooks must still render their figures inline
    }


def execute(name: str, cwd: Path, env: dict[str, str], monkeypatch) -> object:
    """Run a copy of the notebook (nbclient raises CellExecutionError on the first failing cell)."""
    for key in ENV_VARS:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    nb = read(name)
    check = (
        "import sys\n"
        f"assert sys.prefix == {sys.prefix!r}, sys.prefix\n"
        f"assert sys.executable == {sys.executable!r}, sys.executable"
    )
    nb.cells.insert(0, nbformat.v4.new_code_cell(check))
    client = nbclient.NotebookClient(
        nb, kernel_name=KERNEL, timeout=120, startup_timeout=120, resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()
    return nb


def outputs(nb, kind: str) -> list:
    return [
        o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", []) if kind in o.get("data", {})
    ]


def printed(nb) -> str:
    return "".join(o.get("text", "") for cell in nb.cells for o in cell.get("outputs", []))


def assert_rendered(nb, name: str, figures: int = 1, tables: int = 1) -> None:
    errors = [o for cell in nb.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{name}: {errors[0].get('ename')}: {errors[0].get('evalue')}"
    assert len(outputs(nb, "image/png")) >= figures, f"{name}: no figure rendered"
    assert len(outputs(nb, "text/html")) >= tables, f"{name}: no table rendered"


@pytest.mark.parametrize("name", NAMES)
def test_stored_without_outputs(name):
    path = NOTEBOOKS / f"{name}.ipynb"
    text = path.read_text()
    nb = read(name)
    nbformat.validate(nb)
    assert path.stat().st_size < MAX_BYTES, f"{path.name}: {path.stat().st_size} bytes"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: cell {i} has stored outputs (clear them)"
            assert cell.execution_count is None, f"{path.name}: cell {i} has an execution count"
    assert nb.metadata.kernelspec.name == KERNEL
    assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells), "no papermill 'parameters' cell"
    for machine_path in {str(ROOT), str(Path.home()), "/tmp/"} - {"/", ""}:
        assert machine_path not in text, f"{path.name}: absolute path {machine_path!r} of this machine"


def test_data_notebook(tmp_path, jupyter_dirs, monkeypatch):
    nb = execute("01_data", tmp_path, jupyter_dirs, monkeypatch)
    assert_rendered(nb, "01_data", figures=4, tables=2)


def test_results_notebook(tmp_path, jupyter_dirs, smoke_run, monkeypatch):
    nb = execute("02_results", tmp_path, {**jupyter_dirs, "DWCP_RUNS": str(smoke_run)}, monkeypatch)
    assert_rendered(nb, "02_results", figures=3, tables=3)
    assert str(smoke_run) in printed(nb)


def test_onnx_notebook(tmp_path, jupyter_dirs, smoke_run, small_csv, monkeypatch):
    env = {**jupyter_dirs, "DWCP_RUN": str(smoke_run), "DWCP_DATA": str(small_csv)}
    nb = execute("03_onnx_inference", tmp_path, env, monkeypatch)
    assert_rendered(nb, "03_onnx_inference", figures=1, tables=3)
    text = printed(nb)
    assert str(smoke_run) in text
    assert "is not the file this model was trained on" in text  # small.csv is not the smoke run's data


def test_planning_notebook(tmp_path, jupyter_dirs, smoke_run, monkeypatch):
    nb = execute("04_migration_planning", tmp_path, {**jupyter_dirs, "DWCP_RUN": str(smoke_run)}, monkeypatch)
    assert_rendered(nb, "04_migration_planning", figures=2, tables=2)
    text = printed(nb)
    assert str(smoke_run) in text and "pre-copy (Clark et al." in text and "coverage_within_3_points" in text


def test_notebooks_find_the_newest_run(tmp_path, jupyter_dirs, smoke_run, monkeypatch):
    """Without the environment variables: the newest lightning_logs/version_* above the working directory, and the
    data file named in its metadata."""
    logs = tmp_path / "lightning_logs"
    (logs / "version_0").mkdir(parents=True)  # older, unfinished: no report.json, no model.onnx
    (logs / "version_1").symlink_to(smoke_run, target_is_directory=True)
    cwd = tmp_path / "notebooks"
    cwd.mkdir()
    for name in ("02_results", "03_onnx_inference"):
        nb = execute(name, cwd, jupyter_dirs, monkeypatch)
        assert_rendered(nb, name)
        text = printed(nb)
        assert "version_1" in text
        assert "not the file this model was trained on" not in text

"""Packaging: the built-in configs ship inside the package, a serving install (no extras) forecasts without torch, and
the subcommands that need the training stack say so in one line.

The install tests are slow (they build the project and create virtual environments) and run from a folder outside
the repository, so that nothing is found through the source tree."""

from __future__ import annotations

import fnmatch
import io
import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib.resources import files
from pathlib import Path

import pandas as pd
import pytest
import yaml

from dwcp_lstm import cli
from dwcp_lstm.cli import cli_main
from dwcp_lstm.serve import Predictor

ROOT = Path(__file__).resolve().parent.parent
REPO_CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
SERVING_ONLY = ("torch", "lightning", "scipy", "sklearn", "onnx", "matplotlib", "jsonargparse", "yaml", "pyarrow")


# -- fast ------------------------------------------------------------------------------------------------------------
def test_builtin_configs_are_the_package_dwcp_lstm_configs():
    packaged = files("dwcp_lstm.configs")
    listed = {p.name for p in packaged.iterdir()}
    assert "default.yaml" in REPO_CONFIGS and set(REPO_CONFIGS) <= listed
    assert Path(str(packaged)) / "default.yaml" == cli.DEFAULT_CONFIG and cli.DEFAULT_CONFIG.is_file()
    # the wheel takes what package-data names: every file of configs/ must match it (a .yml would be left out)
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"]["dwcp_lstm.configs"] == "configs"
    patterns = setuptools["package-data"]["dwcp_lstm.configs"]
    for path in (ROOT / "configs").iterdir():
        if path.name not in ("__init__.py", "__pycache__"):
            assert any(fnmatch.fnmatch(path.name, p) for p in patterns), f"{path} would not ship in the wheel"


@pytest.mark.parametrize(
    ("argv", "missing", "message"),
    [
        (["fit", "--trainer.max_epochs=1"], {"torch", "lightning"}, "'fit' needs the training stack (missing: torch"),
        (["export", "--run", "x"], {"onnx"}, "'export' needs the training stack (missing: onnx):"),
        (["generate", "--samples", "10"], {"scipy"}, "'generate' needs the training stack (missing: scipy):"),
        (["bogus"], {"torch"}, "'bogus' is unknown here: this install runs 'forecast' and 'plan' only"),
    ],
)
def test_a_missing_training_stack_is_one_line(monkeypatch, capsys, argv, missing, message):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a))
    with pytest.raises(SystemExit) as exc:
        cli_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {message}"), err
    assert err[0].endswith("pip install -c constraints.txt 'dwcp_lstm[train]'"), err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: --model, --input"),
        (["--model", "m", "--input", "i", "--bogus", "1"], "unrecognized arguments: --bogus 1"),
        (["--model", "m", "--input", "i", "--threads", "two"], "argument --threads: invalid int value: 'two'"),
        (["--model", "m", "--input", "i", "--duplicates", "last"], "argument --duplicates: invalid choice: 'last'"),
        (["--model"], "argument --model: expected one argument"),
    ],
)
def test_forecast_flags_are_parsed_by_argparse_with_one_line_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        cli_main(["forecast", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: {message}"), err


# -- slow: real installs ---------------------------------------------------------------------------------------------
def source_copy(dest: Path) -> Path:
    """What a build reads (pyproject, README, the package, the configs), copied so the build leaves the tree alone."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    for name in ("dwcp_lstm", "configs"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def run(cmd: list, cwd: Path, timeout: float = 900, **env: str) -> subprocess.CompletedProcess:
    """``cmd`` outside the repository, with nothing of the source tree on the path unless ``env`` puts it there."""
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env={**clean, **env}, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_serving_install_forecasts_without_torch(smoke_run, small_csv, tmp_path):
    """``pip install .`` (no extras, versions from constraints.txt) into a fresh venv: the console script forecasts
    exactly what the in-process predictor does, and torch is not there at all."""
    away = tmp_path / "elsewhere"
    away.mkdir()
    src = source_copy(tmp_path / "src")
    venv = tmp_path / "venv"
    made = run([sys.executable, "-m", "venv", venv], away)
    assert made.returncode == 0, made.stderr
    py, script = venv / "bin" / "python", venv / "bin" / "dwcp-lstm"
    installed = run([py, "-m", "pip", "install", "-q", "-c", ROOT / "constraints.txt", src], away)
    assert installed.returncode == 0, installed.stderr[-3000:]

    for module in SERVING_ONLY:
        absent = run([py, "-c", f"import {module}"], away)
        assert absent.returncode != 0 and "ModuleNotFoundError" in absent.stderr, (module, absent.stderr)
    where = run([py, "-c", "import dwcp_lstm.cli as c; print(c.__file__); print(c.DEFAULT_CONFIG.is_file())"], away)
    assert where.returncode == 0, where.stderr
    cli_file, found = where.stdout.split()
    assert Path(cli_file).is_relative_to(venv) and "site-packages" in cli_file and found == "True", where.stdout

    proc = run([script, "forecast", "--model", smoke_run, "--input", small_csv], away)
    assert proc.returncode == 0, proc.stderr
    got = pd.read_csv(io.StringIO(proc.stdout))
    predictor = Predictor.from_run(smoke_run)
    assert list(got.columns) == ["node_id", "peer_id", "timestamp", *predictor.all_columns]
    src_df = pd.read_csv(small_csv).sort_values(["node_id", "peer_id", "timestamp"])
    links = list(src_df.groupby(["node_id", "peer_id"]))
    assert len(got) == len(links) == 4
    for row, ((node, peer), link) in zip(got.itertuples(), links, strict=True):
        assert (row.node_id, row.peer_id, row.timestamp) == (node, peer, link["timestamp"].max())
        expected = predictor.predict(link)
        assert [getattr(row, c) for c in predictor.all_columns] == pytest.approx(list(expected.values()), rel=1e-5)

    planned = run([script, "plan", "--model", smoke_run, "--input", small_csv, "--memory-gib", "8", "--json"], away)
    assert planned.returncode == 0, planned.stderr  # the planner is torch-free too
    assert len(json.loads(planned.stdout)["links"]) == 4

    parquet = tmp_path / "telemetry.parquet"
    pd.read_csv(small_csv).to_parquet(parquet)  # here, with the test's pyarrow
    refused = run([script, "forecast", "--model", smoke_run, "--input", parquet], away)
    assert refused.returncode == 2 and refused.stderr.strip() == (
        f"error: {parquet}: Parquet needs pyarrow: pip install 'dwcp_lstm[parquet]' (or use CSV)"
    ), refused.stderr

    for argv, what in ((["fit"], "'fit' needs"), (["generate"], "'generate' needs")):
        refused = run([script, *argv], away)
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 2 and len(lines) == 1, refused.stderr
        assert lines[0].startswith(f"error: {what} the training stack (missing: "), lines
        assert lines[0].endswith("pip install -c constraints.txt 'dwcp_lstm[train]'") and refused.stdout == "", lines


@pytest.mark.slow
def test_wheel_ships_the_configs_and_fit_finds_them_outside_the_repo(tmp_path):
    """A non-editable wheel, installed with --target beside .venv's training stack: ``dwcp-lstm fit`` resolves the
    built-in default (and a packaged config given by path) from the installed package, run from another folder."""
    away = tmp_path / "elsewhere"
    away.mkdir()
    src = source_copy(tmp_path / "src")
    built = run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path, src],
                away)  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("dwcp_lstm-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    assert {f"dwcp_lstm/configs/{c}" for c in REPO_CONFIGS} <= names
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    base = sorted(r.split(">")[0].split("[")[0] for r in requires if "extra ==" not in r)
    assert base == ["numpy", "onnxruntime", "pandas"], requires
    assert any(r.startswith("torch") and 'extra == "train"' in r for r in requires), requires

    site = tmp_path / "site"
    installed = run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, wheel], away)
    assert installed.returncode == 0, installed.stderr[-3000:]
    where = run([sys.executable, "-c", "import dwcp_lstm.cli as c; print(c.__file__); print(c.DEFAULT_CONFIG)"],
                away, PYTHONPATH=str(site))  # fmt: skip
    assert where.stdout.split() == [str(site / "dwcp_lstm" / "cli.py"), str(site / "dwcp_lstm/configs/default.yaml")]

    default = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    proc = run([site / "bin" / "dwcp-lstm", "fit", "--print_config"], away, PYTHONPATH=str(site))
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["trainer"]["max_epochs"] == default["trainer"]["max_epochs"]
    assert cfg["model"]["lstm_sizes"] == default["model"]["lstm_sizes"]
    smoke = site / "dwcp_lstm" / "configs" / "smoke.yaml"
    proc = run([sys.executable, "-m", "dwcp_lstm", "fit", "--config", smoke, "--print_config"], away,
               PYTHONPATH=str(site))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert yaml.safe_load(proc.stdout)["trainer"]["max_epochs"] == 2

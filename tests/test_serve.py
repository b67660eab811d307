"""The torch-free predictor: parity with the PyTorch module, input checks, the model/metadata contract, the
`forecast` subcommand."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dwcp_lstm.cli import cli_main
from dwcp_lstm.contract import CONTRACT_KEY, CONTRACT_KEYS, embed_contract, external_data_hashes, external_path
from dwcp_lstm.errors import ConfigError, ModelFileError
from dwcp_lstm.serve import Predictor, cmd_forecast, forecast_table, load_metadata
from dwcp_lstm.tables import DataError, sha256_of

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def predictor(smoke_run: Path) -> Predictor:
    return Predictor.from_run(smoke_run)


@pytest.fixture(scope="module")
def history(smoke_run: Path) -> pd.DataFrame:
    """The smoke run's own data (real windows of the distribution it was trained on), one column per field."""
    meta = json.loads((smoke_run / "model_metadata.json").read_text())
    return pd.read_csv(meta["data"]["path"])


@pytest.fixture(scope="module")
def torch_forecaster(smoke_run: Path):
    from dwcp_lstm.module import DwcpForecaster

    module = DwcpForecaster.load_from_checkpoint(smoke_run / "checkpoints" / "best.ckpt", weights_only=True)
    return module.raw_forecaster().cpu().eval(), module.tscale.numpy()


def one_link(df: pd.DataFrame, i: int = 0) -> pd.DataFrame:
    keys = df[["node_id", "peer_id"]].drop_duplicates().iloc[i]
    return df[(df.node_id == keys.node_id) & (df.peer_id == keys.peer_id)].reset_index(drop=True)


def rel_err(a: np.ndarray, b: np.ndarray, tscale: np.ndarray) -> float:
    """|a - b| / max(|b|, 1e-3 x target sd): the metadata's parity measure (no blow-up near zero)."""
    return float((np.abs(a - b) / np.maximum(np.abs(b), 1e-3 * tscale)).max())


# -- parity with the PyTorch module ---------------------------------------------------------------------------------
def test_predictor_matches_torch_on_real_windows(predictor, history, torch_forecaster):
    import torch

    raw, tscale = torch_forecaster
    link = one_link(history)
    x = link[predictor.features].to_numpy(np.float32)  # [rows, F]
    w = predictor.window
    windows = np.stack([x[i : i + w] for i in range(0, len(x) - w + 1, 7)])  # [B, W, F]
    with torch.no_grad():
        expected = raw(torch.from_numpy(windows)).numpy()  # [B, T]
    assert rel_err(predictor.predict_windows(windows), expected, tscale) < 1e-4

    # one series as a DataFrame: the last window, by column name (extra columns and column order do not matter)
    shuffled = link[list(reversed(link.columns))]
    single = predictor.predict(shuffled)
    assert list(single) == predictor.all_columns  # the forecast, then the bounds of every level
    assert predictor.all_columns[: len(predictor.targets)] == predictor.targets
    assert predictor.all_columns[len(predictor.targets)] == "throughput_mbps_lo80"
    with torch.no_grad():
        last = raw(torch.from_numpy(x[None, -w:])).numpy()[0]
    point = np.array([single[t] for t in predictor.targets])
    assert rel_err(point, last, tscale) < 1e-4
    for level in ("80", "95"):  # a bound on each side of the forecast
        assert all(single[f"{t}_lo{level}"] <= single[t] <= single[f"{t}_hi{level}"] for t in predictor.targets)

    # rolling: one forecast per window, indexed by the window's last row
    rolling = predictor.predict_rolling(link)
    assert len(rolling) == len(link) - w + 1
    assert rolling.index[0] == w - 1 and list(rolling.columns) == predictor.all_columns
    assert rolling.attrs["units"]["rtt_ms"] == "ms"
    np.testing.assert_allclose(rolling.iloc[-1].to_numpy(), list(single.values()), rtol=1e-6)

    # a batch [B, W, F] gives a DataFrame, an array [rows, F] a dict
    batch = predictor.predict(windows[:3], columns=predictor.features)
    assert isinstance(batch, pd.DataFrame) and batch.shape == (3, len(predictor.all_columns))
    assert predictor.predict(x, columns=predictor.features) == pytest.approx(single, rel=1e-6)


def test_serve_imports_neither_torch_nor_lightning_nor_onnx():
    # a serving install has numpy, pandas and onnxruntime only
    mods = "('torch', 'lightning', 'onnx')"
    code = f"import sys, dwcp_lstm.serve, dwcp_lstm.contract; print(sorted(m for m in {mods} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


# -- bad input ------------------------------------------------------------------------------------------------------
def test_bad_history_is_a_one_line_data_error(predictor, history):
    link = one_link(history)
    x = link[predictor.features].to_numpy(np.float32)
    w = predictor.window
    with pytest.raises(DataError, match=r"missing required column 'rtt_ms'"):
        predictor.predict(link.drop(columns="rtt_ms"))
    reordered = [predictor.features[1], predictor.features[0], *predictor.features[2:]]
    with pytest.raises(DataError, match=r"reordered columns"):
        predictor.predict(x[:, [1, 0, *range(2, x.shape[1])]], columns=reordered)
    with pytest.raises(DataError, match=r"reordered columns"):
        predictor.predict(x[None, :w], columns=reordered)
    with pytest.raises(DataError, match=rf"5 rows given, the model needs at least {w}"):
        predictor.predict(link.iloc[:5])
    with pytest.raises(DataError, match=rf"windows have 5 steps, the model needs {w}"):
        predictor.predict_windows(x[None, :5])
    with pytest.raises(DataError, match=r"expected an array \[rows, 9\]"):
        predictor.predict(x[:, :4])
    nan = link.copy()
    nan.loc[3, "jitter_ms"] = np.nan
    with pytest.raises(DataError, match=r"column 'jitter_ms' row 4: NaN"):
        predictor.predict(nan)
    bad = x.copy()
    bad[2, predictor.features.index("rtt_ms")] = np.inf
    with pytest.raises(DataError, match=r"column 'rtt_ms' row 3: inf"):
        predictor.predict(bad)
    with pytest.raises(DataError, match=r"window 1 step 3 column 'rtt_ms': inf"):
        predictor.predict_windows(bad[None, :w])
    assert not np.isnan(link["jitter_ms"]).any()  # the caller's frame is never modified


def copy_run(smoke_run: Path, dest: Path) -> Path:
    dest.mkdir()
    for name in ("model.onnx", "model_metadata.json"):
        shutil.copy(smoke_run / name, dest / name)
    return dest


def test_model_whose_sha256_differs_is_refused(smoke_run, tmp_path):
    run = copy_run(smoke_run, tmp_path / "run")
    with open(run / "model.onnx", "r+b") as f:  # flip one byte in the middle of the weights
        f.seek(f.seek(0, 2) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ModelFileError, match=r"model\.onnx: sha256 .* does not match model_metadata\.json"):
        Predictor.from_run(run)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.pop("window_size"), r"missing key 'window_size'"),
        (lambda m: m.update(window_size=0), r"key 'window_size' must be > 0, got 0"),
        (lambda m: m.update(window_size="20"), r"key 'window_size' must be int, got str"),
        (lambda m: m.update(features=[]), r"key 'features' must not be empty"),
        (lambda m: m.update(targets=[{"unit": "ms"}]), r"key 'targets\[0\]' must be an object"),
        (lambda m: m["input"].pop("name"), r"missing key 'input.name'"),
        (lambda m: m["input"].update(shape=["batch", 10, 9]), r"key 'input.shape' is \['batch', 10, 9\]"),
        (lambda m: m["output"].update(shape=4), r"key 'output.shape' must be list, got int"),  # was a TypeError
        (lambda m: m.update(model_sha256="abc"), r"key 'model_sha256' must be 64 lowercase hex digits"),
        (lambda m: m.update(format="pickle"), r"key 'format' is 'pickle'"),
        (lambda m: m.update(format="dwcp_lstm.onnx/1"), r"key 'format' is 'dwcp_lstm.onnx/1'.*export the model again"),
        (lambda m: m.pop("series"), r"missing key 'series'"),
        (lambda m: m.update(series=5), r"key 'series' must be object, got int"),
        (lambda m: m["series"].update(columns="node_id"), r"key 'series.columns' must be list, got str"),
        (lambda m: m["series"].update(columns=["node_id", ""]), r"key 'series.columns' must list non-empty strings"),
        (lambda m: m["series"].update(columns=["node_id"] * 2), r"key 'series.columns' lists a column twice"),
        (lambda m: m["series"].update(time_column="node_id"), r"key 'series.time_column' must be a non-empty name"),
        (lambda m: m["series"].pop("time_column"), r"missing key 'series.time_column'"),
        (lambda m: m["series"].update(max_gap=float("nan")), r"key 'series.max_gap' must be a finite number"),
        (lambda m: m["series"].update(max_gap=True), r"key 'series.max_gap' must be number, got bool"),
        (lambda m: m["series"].update(max_gap="3"), r"key 'series.max_gap' must be number, got str"),
        (lambda m: m["series"].update(cadence_s=-300), r"key 'series.cadence_s' must be a number of seconds > 0"),
        (lambda m: m["series"].update(cadence_s=True), r"key 'series.cadence_s' must be a number of seconds > 0"),
        (lambda m: m.update(target_mode="levels"), r"key 'target_mode' must be one of delta, level, got 'levels'"),
        (lambda m: m.pop("target_mode"), r"missing key 'target_mode'"),
        (lambda m: m["features"][0].update(unit=5), r"key 'features\[0\].unit' must be str, got int"),
        (lambda m: m.update(external_data=[]), r"key 'external_data' must be object, got list"),
        (lambda m: m.update(external_data={"w.bin": "00"}), r"key 'external_data' must map file names to 64"),
    ],
)
def test_bad_metadata_is_refused(smoke_run, tmp_path, edit, message):
    assert_edited_metadata_is_refused(smoke_run, tmp_path, edit, message)


def assert_edited_metadata_is_refused(smoke_run: Path, tmp_path: Path, edit, message: str) -> None:
    """Copy the run, apply ``edit`` to its metadata, and expect the predictor to refuse it with ``message``."""
    run = copy_run(smoke_run, tmp_path / "run")
    meta = json.loads((run / "model_metadata.json").read_text())
    edit(meta)
    (run / "model_metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match=r"model_metadata\.json: " + message):
        Predictor.from_run(run)


def test_unreadable_metadata_is_refused(smoke_run, tmp_path):
    run = copy_run(smoke_run, tmp_path / "run")
    (run / "model_metadata.json").write_text("{not json")
    with pytest.raises(ModelFileError, match=r"model_metadata\.json: not valid JSON"):
        Predictor.from_run(run)
    (run / "model_metadata.json").unlink()
    with pytest.raises(ModelFileError, match=r"model_metadata\.json: file not found"):
        load_metadata(run / "model_metadata.json")


# -- the contract embedded in model.onnx ----------------------------------------------------------------------------
def test_export_embeds_the_metadata_contract(smoke_run):
    import onnxruntime as ort

    meta = json.loads((smoke_run / "model_metadata.json").read_text())
    sess = ort.InferenceSession(str(smoke_run / "model.onnx"), providers=["CPUExecutionProvider"])
    embedded = json.loads(sess.get_modelmeta().custom_metadata_map[CONTRACT_KEY])
    assert embedded == {k: meta[k] for k in CONTRACT_KEYS}
    assert meta["format"] == "dwcp_lstm.onnx/2" and meta["external_data"] == {}


def swap(items: list, i: int = 0, j: int = 1) -> None:
    items[i], items[j] = items[j], items[i]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        # valid metadata that no longer describes the graph: the forecasts would be silently wrong
        (
            lambda m: swap(m["features"]),
            r"key 'features\[0\]\.name' is 'rtt_ms' but the contract embedded in model\.onnx "
            r"says 'throughput_mbps': the metadata was edited or belongs to another model",
        ),
        (lambda m: swap(m["targets"], 1, 3), r"key 'targets\[1\]\.name' is 'jitter_ms'"),
        (lambda m: m["features"][1].update(unit="s"), r"key 'features\[1\]\.unit' is 's' .* says 'ms'"),
        (lambda m: (m.update(window_size=10), m["input"].update(shape=["batch", 10, 9])), r"key 'window_size' is 10"),
        (lambda m: m.update(target_mode="level"), r"key 'target_mode' is 'level'"),
        (lambda m: swap(m["series"]["columns"]), r"key 'series\.columns\[0\]' is 'peer_id'"),
        (lambda m: m["series"].update(columns=["node_id"]), r"key 'series\.columns' is \['node_id'\]"),
        (lambda m: m["series"].update(time_column="time"), r"key 'series\.time_column' is 'time'"),
        (lambda m: m["series"].update(max_gap=5.0), r"key 'series\.max_gap' is 5\.0 .* says 3\.0"),
        (lambda m: m["series"].update(max_gap=3), r"key 'series\.max_gap' is 3 .* says 3\.0"),  # compared as JSON text
        (lambda m: m["input"].update(name="x"), r"key 'input\.name' is 'x'"),
        (lambda m: m["input"].update(shape=[None, 20, 9]), r"key 'input\.shape\[0\]' is None"),
        (lambda m: m["intervals"].update(levels=[0.8, 0.9]), r"key 'intervals\.levels\[1\]' is 0\.9"),
    ],
)
def test_metadata_that_differs_from_the_embedded_contract_is_refused(smoke_run, tmp_path, edit, message):
    assert_edited_metadata_is_refused(smoke_run, tmp_path, edit, message)


def rewrite_model(run: Path, change) -> dict:
    """Load ``run/model.onnx`` with onnx, apply ``change(model)``, save it back and re-sign the metadata's sha256."""
    import onnx

    model = onnx.load(str(run / "model.onnx"), load_external_data=False)
    change(model)
    (run / "model.onnx").write_bytes(model.SerializeToString())
    meta = json.loads((run / "model_metadata.json").read_text())
    meta["model_sha256"] = sha256_of(run / "model.onnx")
    (run / "model_metadata.json").write_text(json.dumps(meta))
    return meta


def append_to_output(target: str, op: str, constant: np.ndarray, *inputs: np.ndarray):
    """A change for :func:`rewrite_model`: graph output ``target`` becomes ``op(target, constant, *inputs)``, its
    declared name, type and shape unchanged (what onnxruntime does not enforce)."""
    from onnx import helper, numpy_helper

    def change(model) -> None:
        g = model.graph
        for node in g.node:
            node.output[:] = [f"{target}_orig" if o == target else o for o in node.output]
            node.input[:] = [f"{target}_orig" if i == target else i for i in node.input]
        names = [f"{target}_c{k}" for k in range(1 + len(inputs))]
        g.initializer.extend(numpy_helper.from_array(v, n) for v, n in zip((constant, *inputs), names, strict=True))
        g.node.append(helper.make_node(op, [f"{target}_orig", *names], [target]))

    return change


def test_a_nan_interval_bound_is_refused(smoke_run, two_links, tmp_path, capsys):
    """Only the forecast output was checked for NaN/inf: a graph whose 'lower' bound is NaN gave empty bound cells
    (forecast, --rolling, --online) and "nan Mbit/s" in plan, exit 0. Every output is checked, and named."""
    run = copy_run(smoke_run, tmp_path / "run")
    rewrite_model(run, append_to_output("lower", "Mul", np.array(np.nan, np.float32)))
    for flags in ([], ["--rolling"], ["--online"]):
        err = run_cli_error(["forecast", "--model", str(run), "--input", str(two_links), *flags], capsys)
        assert "window 1: graph output 'lower' of 'throughput_mbps_lo80' is nan" in err and "altered?" in err, err
    err = run_cli_error(["plan", "--model", str(run), "--input", str(two_links), "--memory-gib", "16"], capsys)
    assert "graph output 'lower'" in err, err


def test_a_graph_output_with_other_rows_than_windows_is_refused(smoke_run, predictor, history, two_links, tmp_path,
                                                                capsys):  # fmt: skip
    """A graph giving one row for a batch of windows (its declared shape ['batch', 4] is not enforced) raised a
    ValueError traceback in forecast: each output's rows are checked against the batch right after the run."""
    run = copy_run(smoke_run, tmp_path / "run")
    one = (np.array([0], np.int64), np.array([1], np.int64), np.array([0], np.int64))  # starts, ends, axes
    rewrite_model(run, append_to_output("forecast", "Slice", *one))
    p = Predictor.from_run(run)
    x = one_link(history)[p.features].to_numpy(np.float32)
    windows = np.stack([x[i : i + p.window] for i in range(4)])
    for call in (p.predict_windows, p.predict):
        with pytest.raises(ModelFileError, match=r"model\.onnx: graph output 'forecast' has 1 rows for 4 windows"):
            call(windows)
    err = run_cli_error(["forecast", "--model", str(run), "--input", str(two_links), "--rolling"], capsys)
    assert "model.onnx: graph output 'forecast' has 1 rows for " in err, err


def test_onnxruntime_prints_nothing_before_the_error_line(smoke_run, two_links, tmp_path, capfd):
    """A tampered graph made onnxruntime write a coloured [W:onnxruntime ...] line to stderr ahead of the one
    ``error:`` line: its log is set to fatal only."""
    run = copy_run(smoke_run, tmp_path / "run")
    rewrite_model(run, append_to_output("forecast", "Unsqueeze", np.array([-1], np.int64)))  # [batch, 4, 1]
    with pytest.raises(SystemExit):
        cli_main(["forecast", "--model", str(run), "--input", str(two_links)])
    err = [line for line in capfd.readouterr().err.splitlines() if not line.startswith("warning: ")]
    assert len(err) == 1 and err[0].startswith("error: ") and "graph output 'forecast' is" in err[0], err


def test_special_files_are_named_as_such(smoke_run, two_links, tmp_path, capsys):
    """--input, --model or --metadata given a FIFO, /dev/zero or /proc/self/environ said "file is empty" or "file
    not found" (a FIFO could also block the reader): each is refused as not a regular file, before it is opened."""
    import os

    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.csv"
    zero.symlink_to("/dev/zero")
    environ = tmp_path / "environ.csv"
    environ.symlink_to("/proc/self/environ")
    model = str(smoke_run / "model.onnx")
    for path, what in ((fifo, "a pipe, device or socket"), (zero, "a pipe, device or socket"),
                       (environ, "a /proc or /sys file")):  # fmt: skip
        for args in (["--model", str(smoke_run), "--input", str(path)],
                     ["--model", str(path), "--input", str(two_links)],
                     ["--model", model, "--metadata", str(path), "--input", str(two_links)]):  # fmt: skip
            err = run_cli_error(["forecast", *args], capsys)
            assert err.startswith(f"error: {path}: not a regular file ({what}"), err


def test_model_without_an_embedded_contract_is_refused(smoke_run, tmp_path):
    run = copy_run(smoke_run, tmp_path / "run")
    rewrite_model(run, lambda m: m.ClearField("metadata_props"))  # as exported before dwcp_lstm.onnx/2
    with pytest.raises(ModelFileError, match=r"model\.onnx: no embedded contract .*export the model again"):
        Predictor.from_run(run)
    rewrite_model(run, lambda m: m.metadata_props.add(key=CONTRACT_KEY, value="[1, 2"))
    with pytest.raises(ModelFileError, match=r"model\.onnx: embedded contract is not valid JSON"):
        Predictor.from_run(run)


def external_run(smoke_run: Path, dest: Path, location: str = "weights.bin", side_folder: Path | None = None) -> Path:
    """The smoke model saved with its weights in an external-data file, the contract and metadata signed for it by
    the project's own helpers. ``side_folder``: where the side file really lies (for locations that escape)."""
    import onnx

    run = copy_run(smoke_run, dest)
    model = onnx.load(str(run / "model.onnx"))
    onnx.save_model(
        model,
        str(run / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    if side_folder is not None:
        (run / "weights.bin").replace(side_folder / "weights.bin")

        def relocate(m) -> None:
            from onnx.external_data_helper import _get_all_tensors, uses_external_data

            for t in filter(uses_external_data, _get_all_tensors(m)):
                next(e for e in t.external_data if e.key == "location").value = location

        rewrite_model(run, relocate)
        external = {location: sha256_of(side_folder / "weights.bin")}
    else:
        external = external_data_hashes(run / "model.onnx")
    meta = json.loads((run / "model_metadata.json").read_text())
    meta["external_data"] = external
    embed_contract(run / "model.onnx", {k: meta[k] for k in CONTRACT_KEYS})
    meta["model_sha256"] = sha256_of(run / "model.onnx")
    (run / "model_metadata.json").write_text(json.dumps(meta))
    return run


def test_external_data_is_hashed_and_checked(smoke_run, predictor, history, tmp_path):
    run = external_run(smoke_run, tmp_path / "run")
    meta = json.loads((run / "model_metadata.json").read_text())
    assert list(meta["external_data"]) == ["weights.bin"] and (run / "model.onnx").stat().st_size < 100_000
    x = one_link(history)[predictor.features].to_numpy(np.float32)[None, -predictor.window :]
    ext = Predictor.from_run(run)  # intact: the same forecasts as the single-file model
    np.testing.assert_array_equal(ext.predict_windows(x), predictor.predict_windows(x))

    with open(run / "weights.bin", "r+b") as f:  # one byte of the weights altered
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(
        ModelFileError, match=r"weights\.bin: sha256 .* does not match model_metadata\.json key 'external_data'"
    ):
        Predictor.from_run(run)
    (run / "weights.bin").unlink()
    with pytest.raises(ModelFileError, match=r"weights\.bin: external-data file not found"):
        Predictor.from_run(run)

    # the side file is intact but the metadata no longer lists it: onnxruntime reads only listed, checked side files
    run = external_run(smoke_run, tmp_path / "run2")
    meta = json.loads((run / "model_metadata.json").read_text())
    meta["external_data"] = {}
    (run / "model_metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match=r"graph reads an external-data file model_metadata\.json does not list"):
        Predictor.from_run(run)
    # ... even when the graph's own contract agrees (both rewritten): the side file is never read unchecked, so
    # altering it cannot change the forecasts (found by fuzzing: forecasts moved, exit 0)
    embed_contract(run / "model.onnx", {k: meta[k] for k in CONTRACT_KEYS})
    meta["model_sha256"] = sha256_of(run / "model.onnx")
    (run / "model_metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match=r"graph reads an external-data file model_metadata\.json does not list"):
        Predictor.from_run(run)


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_external_data_outside_the_model_folder_is_refused(smoke_run, tmp_path, where):
    outside = tmp_path / "outside"
    outside.mkdir()
    location = "../outside/weights.bin" if where == "parent" else str(outside / "weights.bin")
    run = external_run(smoke_run, tmp_path / "run", location, side_folder=outside)
    with pytest.raises(ModelFileError, match=r"model_metadata\.json: external-data location .* escapes the model"):
        Predictor.from_run(run)
    with pytest.raises(ModelFileError, match=r"escapes the model's folder"):  # the exporter refuses such a graph too
        external_data_hashes(run / "model.onnx")


@pytest.mark.parametrize("location", ["../w.bin", "/etc/passwd", "sub/../w.bin", "C:w.bin", "a\\w.bin", "a\x00b"])
def test_external_data_locations_must_stay_inside_the_folder(tmp_path, location):
    with pytest.raises(ModelFileError, match=r"meta\.json: external-data location .* escapes the model's folder"):
        external_path(tmp_path, location, "meta.json")
    (tmp_path / "sub").mkdir()
    assert external_path(tmp_path, "sub/w.bin", "meta.json") == tmp_path / "sub" / "w.bin"
    (tmp_path / "link").symlink_to(tmp_path.parent)
    with pytest.raises(ModelFileError, match=r"escapes the model's folder \(a link outside\)"):
        external_path(tmp_path, "link/w.bin", "meta.json")


def test_a_non_finite_forecast_is_an_error_not_a_number(smoke_run, history):
    p = Predictor.from_run(smoke_run)

    class Overflowing:  # what a graph gives for inputs far outside its training range
        def run(self, names, feed):
            y = np.ones((len(feed[p.input_name]), len(p.targets)), np.float32)
            y[-1, 2] = np.inf
            return [y]

    p.session = Overflowing()
    x = one_link(history)[p.features].to_numpy(np.float32)[None, -p.window :]
    far = x.copy()
    far[..., p.features.index("rtt_ms")] *= 1e6
    p.extrapolate = True  # --extrapolate: the inputs reach the graph
    with pytest.raises(DataError, match=r"window 2: the forecast of 'packet_loss' is inf \(inputs far outside"):
        p.predict_windows(np.concatenate([x, far]))
    with pytest.raises(DataError, match=r"window 2: the forecast of 'packet_loss' is inf \(the graph computes it"):
        p.predict_windows(np.concatenate([x, x]))  # within the training range: the graph is to blame


def test_predict_takes_one_link_in_time_order(predictor, history):
    """Rows of two links, or of one out of order, were windowed as they came: a forecast of nothing, exit 0."""
    link = one_link(history).iloc[:40]
    both = pd.concat([link, one_link(history, 1).iloc[:40]])
    for call in (predictor.predict, predictor.predict_rolling):
        with pytest.raises(DataError, match=r"rows of 2 links \(node_id/peer_id\); predict one link at a time"):
            call(both)
        with pytest.raises(DataError, match=r"column 'timestamp' row 21: earlier than the row before; sort the rows"):
            call(pd.concat([link.iloc[20:], link.iloc[:20]]))
    assert predictor.predict(link) == predictor.predict(link.drop(columns=["node_id", "peer_id", "timestamp"]))
    cases = [  # what slipped through the first version of the check (fuzzing round 8)
        (link.set_index("timestamp").iloc[::-1], r"column 'timestamp' row 2: earlier than the row before"),
        (both.set_index(["node_id", "peer_id"]), r"rows of 2 links"),
        (pd.concat([link.iloc[:15]] * 2).sort_values("timestamp", kind="stable"), r"row 2: the same time as the row"),
        (pd.concat([link, link[["timestamp"]]], axis=1), r"column 'timestamp' appears more than once"),
        (link.assign(timestamp=link.timestamp + np.where(np.arange(40) >= 30, 10**6, 0)), r"row 31: a gap of 1.0003e"),
        (link.assign(timestamp=np.arange(40)), r"a row every 1 s, the model was trained on a row every 300 s"),
    ]
    for frame, message in cases:
        with pytest.raises(DataError, match=message):
            predictor.predict(frame)


def test_arrays_are_checked_like_tables(predictor, history):
    """Windows given as arrays skipped the physical-range check of tables (a negative throughput was forecast),
    and complex or timedelta arrays were cast silently (found by fuzzing)."""
    x = one_link(history)[predictor.features].to_numpy(np.float32)[None, :20].repeat(2, axis=0)  # [2, 20, F]
    x[1, 3, predictor.features.index("throughput_mbps")] = -5.0
    for call in (predictor.predict_windows, predictor.predict):
        with pytest.raises(DataError, match=r"window 2 step 4 column 'throughput_mbps': negative value -5"):
            call(x)
    huge = x[0].astype(np.float64)
    huge[2, 0] = 1e300  # became inf in the cast, reported as "inf" with a numpy warning
    with pytest.raises(DataError, match=r"value 1e\+300 at index \[2, 0\] is beyond float32 range"):
        predictor.predict(huge)
    for bad in (x[0].astype(np.complex64), x[0].astype("timedelta64[s]"), x[0] > 0, x > 0):  # bool was read as 0/1
        with pytest.raises(DataError, match=r"is not real numbers \(integer or float\)"):
            predictor.predict(bad)
    with pytest.raises(DataError, match=r"array of bool is not real numbers"):
        predictor.predict_windows(x > 0)
    link = one_link(history).iloc[:20]  # a complex column lost its imaginary part (a numpy ComplexWarning only)
    with pytest.raises(DataError, match=r"column 'rtt_ms' row 1: complex value \(.*\+1000j\), expected a real"):
        predictor.predict(link.assign(rtt_ms=link.rtt_ms.round() + 1000j))


def test_a_repeated_feature_column_is_refused(predictor, history):
    link = one_link(history)
    with pytest.raises(DataError, match=r"column 'rtt_ms' appears more than once"):
        predictor.predict(pd.concat([link, link[["rtt_ms"]] * 2], axis=1))


def test_an_empty_batch_and_multi_level_columns(predictor, history):
    """Found by fuzzing: ``predict`` on [0, W, F] raised a reshape ValueError (``predict_windows`` gave an empty
    array), and a frame with two levels of column names a TypeError."""
    empty = predictor.predict(np.zeros((0, predictor.window, len(predictor.features)), np.float32))
    assert len(empty) == 0 and list(empty.columns) == predictor.all_columns
    link = one_link(history)[predictor.features]
    link.columns = pd.MultiIndex.from_product([["metrics"], link.columns])
    with pytest.raises(DataError, match=r"^history: the columns have 2 levels; give one level of column names"):
        predictor.predict(link)


# -- the forecast subcommand ----------------------------------------------------------------------------------------
def run_cli_error(args: list[str], capsys) -> str:
    """The one error line of a refused command (exit 2)."""
    with pytest.raises(SystemExit) as exc:
        cli_main(args)
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning: ")]
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_forecast_uses_each_links_latest_segment(smoke_run, predictor, small_csv, tmp_path, capsys):
    """A link split by a gap gave one row per segment, the stale one's forecast among them, and only the stale
    one when its latest segment was short (found by fuzzing): each link is forecast from its present."""
    df = pd.read_csv(small_csv)
    links = df[["node_id", "peer_id"]].drop_duplicates()
    a, b = (df.merge(links.iloc[i : i + 1], on=["node_id", "peer_id"]).iloc[:120].copy() for i in (0, 1))
    for link, tail in ((a, 40), (b, 8)):  # a gap of a day before the last `tail` rows
        link.loc[link.index[-tail:], "timestamp"] += 86_400
    path = tmp_path / "gapped.csv"
    pd.concat([a, b]).to_csv(path, index=False)
    out = tmp_path / "f.csv"
    cli_main(["forecast", "--model", str(smoke_run / "model.onnx"), "--input", str(path), "--output", str(out)])
    err = capsys.readouterr().err
    assert f"link {b.node_id.iloc[0]}/{b.peer_id.iloc[0]}: 8 rows since its last gap, the model needs 20" in err
    got = pd.read_csv(out)
    assert got[["node_id", "timestamp"]].values.tolist() == [[a.node_id.iloc[0], a.timestamp.iloc[-1]]]
    expected = predictor.predict(a.iloc[-predictor.window :])
    assert got[predictor.all_columns].iloc[0].tolist() == pytest.approx(list(expected.values()), rel=1e-5)
    b.to_csv(path, index=False)
    err = run_cli_error(["forecast", "--model", str(smoke_run / "model.onnx"), "--input", str(path), "--output",
                         str(out)], capsys)  # fmt: skip
    assert "no link has 20 rows since its last gap (the model's window); the most is 8" in err


def test_link_ids_are_escaped_in_warnings_and_tables(smoke_run, small_csv, tmp_path, capsys):
    """A link id holding ESC or NUL reached the terminal raw in forecast's warning and plan's table (an ESC sequence
    recolours or clears it): they are escaped as the refusals' ascii() does."""
    df = pd.read_csv(small_csv, dtype={"node_id": str, "peer_id": str})
    links = df[["node_id", "peer_id"]].drop_duplicates()
    a, b = (df.merge(links.iloc[i : i + 1], on=["node_id", "peer_id"]).iloc[-40:].copy() for i in (0, 1))
    b = b.iloc[-8:].assign(node_id="node-\x1b[2J\x00x")  # too short for a window: warned about by name
    path = tmp_path / "esc.csv"
    pd.concat([a, b]).to_csv(path, index=False)
    cli_main(["forecast", "--model", str(smoke_run), "--input", str(path), "--output", str(tmp_path / "f.csv")])
    err = capsys.readouterr().err
    assert f"link node-\\x1b[2J\\x00x/{b.peer_id.iloc[0]}: 8 rows since its last gap" in err, err
    cli_main(["plan", "--model", str(smoke_run), "--input", str(path), "--memory-gib", "16"])
    captured = capsys.readouterr()
    assert "node-\\x1b[2J\\x00x->" in captured.out
    assert not any(c in captured.out + captured.err + err for c in "\x1b\x00")


@pytest.mark.parametrize("node", ["=cmd|' /C calc'!A0", "@SUM(1+1)*cmd|' /C calc'!A0", "+1+cmd|x", "-2+3+cmd|x", "\tx"])
def test_a_link_id_a_spreadsheet_would_run_is_refused_for_csv(smoke_run, small_csv, tmp_path, capsys, node):
    """forecast copied a link id such as ``=cmd|' /C calc'!A0`` into its CSV, where a spreadsheet runs it as a
    formula (CSV injection): refused for CSV output, naming the column and row, nothing written; Parquet keeps the
    id typed and is served; numeric ids with a sign are not formulas."""
    df = pd.read_csv(small_csv, dtype={"node_id": str, "peer_id": str})
    links = df[["node_id", "peer_id"]].drop_duplicates()
    a, b = (df.merge(links.iloc[i : i + 1], on=["node_id", "peer_id"]).iloc[-40:].copy() for i in (0, 1))
    b = b.assign(node_id=node)
    path = tmp_path / "ids.csv"
    pd.concat([a, b]).to_csv(path, index=False)
    out = tmp_path / "f.csv"
    args = ["forecast", "--model", str(smoke_run), "--input", str(path)]
    err = run_cli_error([*args, "--output", str(out)], capsys)
    assert f"{path}: column 'node_id' row 41: link id " in err and "runs as a formula" in err, err
    assert not out.exists()
    assert "runs as a formula" in run_cli_error(args, capsys)  # CSV on stdout too
    cli_main([*args, "--output", str(tmp_path / "f.parquet")])
    assert node in set(pd.read_parquet(tmp_path / "f.parquet")["node_id"])
    b = b.assign(node_id="-7")  # a number
    pd.concat([a, b]).to_csv(path, index=False)
    cli_main([*args, "--output", str(out)])
    assert len(pd.read_csv(out)) == 2


def test_a_boolean_feature_column_is_refused(predictor, smoke_run, two_links, tmp_path, capsys):
    """A Parquet bool column (or booleans with nulls, an object column) read as 0/1: rtt_ms True was 1 ms."""
    df = pd.read_csv(two_links)
    for i, values in enumerate(([True] * len(df), [None, *[False] * (len(df) - 1)])):
        path = tmp_path / f"flags{i}.parquet"
        df.assign(rtt_ms=pd.Series(values, dtype=bool if i == 0 else object)).to_parquet(path, index=False)
        err = run_cli_error(["forecast", "--model", str(smoke_run), "--input", str(path)], capsys)
        assert f"{path}: column 'rtt_ms' row {i + 1}: boolean value {bool(values[i])}, expected a number" in err, err
    with pytest.raises(DataError, match=r"column 'rtt_ms' row 1: boolean value True"):
        predictor.predict(one_link(df.sort_values("timestamp")).assign(rtt_ms=True))


def test_a_duration_or_date_feature_column_is_refused(predictor, smoke_run, two_links, tmp_path, capsys):
    """A Parquet duration (or datetime) column for a numeric feature was read as seconds: rtt_ms of 25 ms as a
    timedelta became 0.025 "ms", exit 0. Only the time column turns dates and durations into seconds."""
    df = pd.read_csv(two_links)
    for col, value, what in (
        ("rtt_ms", pd.to_timedelta(df.rtt_ms, unit="ms"), "a duration (timedelta)"),
        ("retransmits", pd.to_datetime(df.retransmits, unit="s"), "a date and time (datetime)"),
    ):
        path = tmp_path / f"{col}.parquet"
        df.assign(**{col: value}).to_parquet(path, index=False)
        for cmd in (["forecast"], ["plan", "--memory-gib", "16"]):
            err = run_cli_error([*cmd, "--model", str(smoke_run), "--input", str(path)], capsys)
            assert err == f"error: {path}: column {col!r} row 1: {what}, expected a number", err
    link = one_link(df.sort_values("timestamp"))
    with pytest.raises(DataError, match=r"column 'rtt_ms' row 1: a duration \(timedelta\), expected a number"):
        predictor.predict(link.assign(rtt_ms=pd.to_timedelta(link.rtt_ms, unit="ms")))


def test_forecast_table_refuses_frames_it_cannot_read(predictor, two_links):
    """The Python API raised KeyError (a missing column), ValueError (an empty frame), AttributeError (a repeated
    column), OverflowError (an int of 10**400) or read a series given as one string per character: each is one
    DataError now; a string is that one column, and link id or time columns set as the index are read."""
    df = pd.read_csv(two_links)
    keys = ["node_id", "peer_id"]
    want = forecast_table(predictor, df.copy(), keys, "timestamp", "api")
    cases = [
        (df, ["nope"], "timestamp", r"api: missing required column 'nope'"),
        (df, keys, "nope", r"api: missing required column 'nope'"),
        (df.iloc[:0], keys, "timestamp", r"api: no rows"),
        (pd.concat([df, df[["rtt_ms"]]], axis=1), keys, "timestamp", r"column 'rtt_ms' appears more than once"),
        (pd.concat({"a": df}, axis=1), keys, "timestamp", r"the columns have 2 levels"),
        (df, ["timestamp"], "timestamp", r"a column may appear only once"),
        (df.assign(retransmits=df.retransmits.map(lambda v: int(v) * 10**400)), keys, "timestamp",
         r"column 'retransmits' row 1: value \d+\.\.\. is beyond float range"),
    ]  # fmt: skip
    for frame, series, time, message in cases:
        with pytest.raises(DataError, match=message):
            forecast_table(predictor, frame.copy(), series, time, "api")
    one = df[df.peer_id == df.peer_id.iloc[0]]
    got = forecast_table(predictor, one.drop(columns="peer_id"), "node_id", "timestamp", "api")
    assert got["node_id"].tolist() == sorted(one.node_id.unique().tolist())
    got = forecast_table(predictor, df.set_index("timestamp"), keys, "timestamp", "api")
    pd.testing.assert_frame_equal(got, want)


@pytest.fixture(scope="module")
def two_links(small_csv: Path, tmp_path_factory) -> Path:
    """Two links of the small dataset plus a 5-row one (too short for a window), rows shuffled."""
    df = pd.read_csv(small_csv)
    links = df[["node_id", "peer_id"]].drop_duplicates()
    keep = df.merge(links.iloc[:2], on=["node_id", "peer_id"])
    short = df.merge(links.iloc[2:3], on=["node_id", "peer_id"]).iloc[:5]
    path = tmp_path_factory.mktemp("forecast") / "two_links.csv"
    pd.concat([keep, short]).sample(frac=1.0, random_state=0).to_csv(path, index=False)
    return path


def test_forecast_gives_one_row_per_link(smoke_run, predictor, two_links, tmp_path, capsys):
    out = tmp_path / "forecasts.csv"
    cli_main(["forecast", "--model", str(smoke_run / "model.onnx"), "--input", str(two_links), "--output", str(out)])
    assert "rows since its last gap, the model needs 20: not forecast" in capsys.readouterr().err
    got = pd.read_csv(out)
    src = pd.read_csv(two_links).sort_values(["node_id", "peer_id", "timestamp"])
    full = src.groupby(["node_id", "peer_id"]).filter(lambda g: len(g) >= predictor.window)
    last = full.groupby(["node_id", "peer_id"], as_index=False)["timestamp"].max()
    assert list(got.columns) == ["node_id", "peer_id", "timestamp", *predictor.all_columns]
    pd.testing.assert_frame_equal(got[["node_id", "peer_id", "timestamp"]], last)
    for row, (_, link) in zip(got.itertuples(), full.groupby(["node_id", "peer_id"]), strict=True):
        expected = predictor.predict(link)
        assert [getattr(row, c) for c in predictor.all_columns] == pytest.approx(list(expected.values()), rel=1e-5)
    assert not list(tmp_path.glob(".*tmp"))  # written atomically: no temporary file left behind


def test_forecast_rolling_gives_one_row_per_window(smoke_run, predictor, two_links, capsys):
    cli_main(["forecast", "--model", str(smoke_run), "--input", str(two_links), "--rolling"])
    captured = capsys.readouterr()
    got = pd.read_csv(io.StringIO(captured.out))  # stdout is pure CSV; the summary goes to stderr
    sizes = pd.read_csv(two_links).groupby(["node_id", "peer_id"]).size()
    sizes = sizes[sizes >= predictor.window]
    assert len(got) == int((sizes - predictor.window + 1).sum())
    assert got.groupby(["node_id", "peer_id"]).size().to_dict() == (sizes - predictor.window + 1).to_dict()
    assert "units: throughput_mbps [Mbit/s]" in captured.err


def test_fractional_times_are_written_in_full(smoke_run, two_links, tmp_path, capsys):
    """The forecasts carry 7 significant digits; the time column is a key and keeps every digit (1762134000.25 must
    not come back as 1.762134e+09, which several rows would then share)."""
    df = pd.read_csv(two_links)
    df["timestamp"] = df["timestamp"] + 0.25
    frac = tmp_path / "frac.csv"
    df.to_csv(frac, index=False)
    out = tmp_path / "out.csv"
    for args in ([], ["--output", str(out)]):
        cli_main(["forecast", "--model", str(smoke_run), "--input", str(frac), "--rolling", *args])
        text = out.read_text() if args else capsys.readouterr().out
        got = pd.read_csv(io.StringIO(text))
        assert set(got["timestamp"]) <= set(df["timestamp"]) and not got.duplicated(["node_id", "peer_id",
                                                                                        "timestamp"]).any()  # fmt: skip
    for suffix in (".parquet", ".pq", ".PQ"):  # every Parquet suffix: typed columns (.pq got the CSV's text times)
        got = cmd_forecast_frame(smoke_run, frac, tmp_path / f"out{suffix}", ("--rolling",))
        assert pd.api.types.is_float_dtype(got["timestamp"]) and set(got["timestamp"]) <= set(df["timestamp"])


def test_float_link_ids_are_written_in_full(smoke_run, two_links, tmp_path, capsys):
    """Found by fuzzing: a Parquet's float link ids 1.0 and 1.0000001 (one peer) were both written "1" by the CSV's
    7 significant digits: two rows of one name. Like the time column, they keep every digit."""
    df = pd.read_csv(two_links)
    df = df.groupby(["node_id", "peer_id"]).filter(lambda g: len(g) > 100)
    df["node_id"] = np.where(df["node_id"] == df["node_id"].iloc[0], 1.0, 1.0000001)
    df["peer_id"] = "p"
    path = tmp_path / "float_ids.parquet"
    df.to_parquet(path, index=False)
    cli_main(["forecast", "--model", str(smoke_run), "--input", str(path)])
    got = pd.read_csv(io.StringIO(capsys.readouterr().out), dtype={"node_id": str})
    assert sorted(got["node_id"]) == ["1.0", "1.0000001"]


def cmd_forecast_frame(run: Path, data: Path, out: Path, extra: tuple[str, ...] = ()) -> pd.DataFrame:
    cmd_forecast(["--model", str(run), "--input", str(data), "--output", str(out), *extra])
    return pd.read_parquet(out)


def test_a_datetime_time_column_is_read_as_seconds(smoke_run, two_links, tmp_path, capsys):
    """A Parquet timestamp column is stored in microseconds; read as a number it would make the 5-minute cadence
    300,000,000 s and the planner's horizon days long. Datetimes are converted to Unix seconds, and the forecast's
    time column is written back as the input's datetimes (it was epoch seconds)."""
    import json

    df = pd.read_csv(two_links)
    plain = cmd_forecast_frame(smoke_run, two_links, tmp_path / "plain.parquet")
    for tz in (None, "Europe/Oslo"):
        df["timestamp"] = pd.to_datetime(pd.read_csv(two_links)["timestamp"], unit="s", utc=tz is not None)
        df["timestamp"] = (df["timestamp"].dt.tz_convert(tz) if tz else df["timestamp"]).astype(
            "datetime64[us]" if tz is None else f"datetime64[us, {tz}]"
        )
        path = tmp_path / "dt.parquet"
        df.to_parquet(path, index=False)
        got = cmd_forecast_frame(smoke_run, path, tmp_path / "dt_out.parquet")
        assert got["timestamp"].dtype == df["timestamp"].dtype and set(got["timestamp"]) <= set(df["timestamp"])
        assert (got["timestamp"] == pd.to_datetime(plain["timestamp"], unit="s", utc=True).dt.tz_convert(tz)
                if tz else got["timestamp"] == pd.to_datetime(plain["timestamp"], unit="s")).all()  # fmt: skip
        pd.testing.assert_frame_equal(got.drop(columns="timestamp"), plain.drop(columns="timestamp"))
    capsys.readouterr()
    cli_main(["forecast", "--model", str(smoke_run), "--input", str(path)])  # CSV: the datetimes as text
    assert pd.to_datetime(pd.read_csv(io.StringIO(capsys.readouterr().out))["timestamp"]).dt.tz is not None
    cli_main(["plan", "--model", str(smoke_run), "--input", str(path), "--memory-gib", "16", "--json"])
    links = json.loads(capsys.readouterr().out)["links"]
    assert {link["step_s"] for link in links} - {None} == {300.0}  # None: the 5-row link, too short for a window
    # the links' times as the input wrote them, zone included (were epoch milliseconds)
    assert {pd.Timestamp(link["timestamp"]) for link in links} <= set(df["timestamp"])


def test_a_parquet_time_past_2262_is_read_and_written_back(smoke_run, two_links, tmp_path, capsys):
    """Pandas' nanoseconds end in 2262; a Parquet timestamp in microseconds goes further, and reading it through a
    nanosecond subtraction raised OutOfBoundsDatetime (a traceback in forecast, plan and fit)."""
    import json

    df = pd.read_csv(two_links)
    seconds = df["timestamp"].to_numpy()
    plain = cmd_forecast_frame(smoke_run, two_links, tmp_path / "plain.parquet")
    for unit, tz in (("us", "UTC"), ("s", None)):
        shifted = (seconds + 10_000_000_000).astype("datetime64[s]").astype(f"datetime64[{unit}]")
        df["timestamp"] = pd.Series(shifted).dt.tz_localize(tz) if tz else pd.Series(shifted)  # year 2342
        path = tmp_path / f"y2342_{unit}.parquet"
        df.to_parquet(path, index=False)
        got = cmd_forecast_frame(smoke_run, path, tmp_path / "out.parquet")
        read = pd.read_parquet(path)["timestamp"]  # Parquet has no seconds unit: [s] is stored, and read, as [ms]
        assert got["timestamp"].dtype == read.dtype and set(got["timestamp"]) <= set(read)
        pd.testing.assert_frame_equal(got.drop(columns="timestamp"), plain.drop(columns="timestamp"))
        capsys.readouterr()
        cli_main(["plan", "--model", str(smoke_run), "--input", str(path), "--memory-gib", "16", "--json"])
        stamps = {pd.Timestamp(link["timestamp"]) for link in json.loads(capsys.readouterr().out)["links"]}
        assert stamps <= set(df["timestamp"]) and min(t.year for t in stamps) == 2342


def test_forecast_with_no_link_long_enough_is_an_error(smoke_run, two_links, tmp_path):
    short = tmp_path / "short.csv"
    pd.read_csv(two_links).groupby(["node_id", "peer_id"]).head(10).to_csv(short, index=False)
    with pytest.raises(DataError, match=r"short\.csv: no link has 20 rows since its last gap .* the most is 10"):
        cmd_forecast(["--model", str(smoke_run), "--input", str(short)])
    df = pd.read_csv(two_links)
    df["queue_depth"] = df["queue_depth"].astype(object)
    df.loc[7, "queue_depth"] = "lots"
    bad = tmp_path / "bad.csv"
    df.to_csv(bad, index=False)
    with pytest.raises(DataError, match=r"bad\.csv: column 'queue_depth' row 8: non-numeric value 'lots'"):
        cmd_forecast(["--model", str(smoke_run), "--input", str(bad)])


def test_forecast_missing_input_exits_2_with_one_line(smoke_run, tmp_path):
    missing = tmp_path / "nope.csv"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dwcp_lstm",
            "forecast",
            "--model",
            str(smoke_run / "model.onnx"),
            "--input",
            str(missing),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {missing}: file not found"]
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_forecast_never_overwrites_an_input(smoke_run, two_links, tmp_path, capsys):
    run = copy_run(smoke_run, tmp_path / "run")
    data = tmp_path / "data.csv"
    shutil.copy(two_links, data)
    before = data.read_bytes()
    (tmp_path / "link.csv").symlink_to(data)
    (run / "model.csv").write_bytes((run / "model.onnx").read_bytes())  # a model file with an output's suffix
    cases = [
        (["--model", str(run), "--input", str(data), "--output", str(data)], data),
        (["--model", str(run), "--input", str(data), "--output", str(run / ".." / "data.csv")], data),
        (["--model", str(run), "--input", str(data), "--output", str(tmp_path / "link.csv")], data),
        (
            ["--model", str(run / "model.csv"), "--input", str(data), "--output", str(run / "model.csv")],
            run / "model.csv",
        ),
    ]
    for args, victim in cases:
        kept = victim.read_bytes()
        with pytest.raises(SystemExit) as exc:
            cli_main(["forecast", *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1, err
        assert err[0].startswith("error: ") and "--output is the same file as" in err[0], err
        assert victim.read_bytes() == kept and not list(victim.parent.glob(".*.tmp"))
    assert data.read_bytes() == before


def test_forecast_refuses_bad_series_metadata_and_flags_with_one_line(smoke_run, two_links, tmp_path, capsys):
    run = copy_run(smoke_run, tmp_path / "run")
    meta = json.loads((run / "model_metadata.json").read_text())
    for series in (5, {"columns": "node_id", "time_column": "timestamp", "max_gap": 3.0}):
        (run / "model_metadata.json").write_text(json.dumps({**meta, "series": series}))
        with pytest.raises(SystemExit) as exc:
            cli_main(["forecast", "--model", str(run), "--input", str(two_links)])
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and "'series" in err[0], err
    (run / "model_metadata.json").write_text(json.dumps(meta))
    for flags, expected in (
        (["--series-columns", "node_id,node_id"], "a column may appear only once"),
        (["--time-column", "node_id"], "a column may appear only once"),
        (["--threads", "-1"], "threads must be"),
        (["--time-column", " "], "--time-column must name a column"),  # was the trained column, silently
        (["--metadata", str(run)], "is a directory, expected the model_metadata.json file"),
        (["--output", ""], "--output must name a .csv or .parquet file"),
    ):
        with pytest.raises(SystemExit) as exc:
            cli_main(["forecast", "--model", str(run), "--input", str(two_links), *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err


def test_export_command_rewrites_an_older_export(smoke_run, tmp_path, history):
    """A run exported before the contract existed is refused by the predictor; ``export --run`` makes it usable
    again with the same forecasts."""
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)  # the checkpoints and config.yaml too
    expected = Predictor.from_run(run).predict(one_link(history))
    meta_path = run / "model_metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["format"] = "dwcp_lstm.onnx/1"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match=r"export --run"):
        Predictor.from_run(run)
    cli_main(["export", "--run", str(run)])
    got = Predictor.from_run(run).predict(one_link(history))
    assert got == pytest.approx(expected, rel=1e-6)
    assert not list(run.glob(".*.tmp"))


def test_onnx_interval_bounds_are_the_reports_calibration(smoke_run):
    """The bounds the graph returns are those the report judged: the same calibration, the same test coverage."""
    from dwcp_lstm.runs import load_run

    meta = json.loads((smoke_run / "model_metadata.json").read_text())
    assert meta["intervals"]["levels"] == [0.8, 0.95] and meta["parity"]["bounds_max_rel_diff"] < 1e-4
    assert meta["intervals"]["outputs"] == {"lower": ["batch", 2, 4], "upper": ["batch", 2, 4]}
    report = json.loads((smoke_run / "report.json").read_text())
    assert meta["calibration"] == report["intervals"]["calibration"]
    _, dm, _ = load_run(smoke_run)
    x = dm.windows(dm.raw_features, dm.starts["test"])
    got = Predictor.from_run(smoke_run).predict(x, columns=dm.features)
    y = dm.raw_targets[dm.target_rows("test")]
    for j, t in enumerate(dm.targets):
        for level in ("80", "95"):
            covered = ((y[:, j] >= got[f"{t}_lo{level}"]) & (y[:, j] <= got[f"{t}_hi{level}"])).mean()
            assert covered == pytest.approx(report["intervals"]["per_target"][t][level]["coverage"], abs=2 / len(y))


def test_contracts_that_both_lack_an_optional_key_agree():
    """Exports from before prediction intervals have no ``intervals`` key in the metadata or the graph: they load."""
    from dwcp_lstm.contract import compare_contract

    old = {"format": "dwcp_lstm.onnx/2", "window_size": 20}
    compare_contract(old, dict(old), "m.json", "model.onnx")
    with pytest.raises(ModelFileError, match="key 'intervals' is absent but the contract embedded in model.onnx says"):
        compare_contract(old, {**old, "intervals": None}, "m.json", "model.onnx")


def test_a_malformed_tail_calibration_is_refused():
    from dwcp_lstm.contract import check_beyond_horizon

    good = {"steps": 4, "adaptive": [True], "floor": [0.1], "lo": [[[-1.0], [-1.1]]], "hi": [[[1.0], [1.1]]]}
    check_beyond_horizon(good, 1, 2, 1, "m.json")
    cases = [({**good, "steps": 2}, "steps"), ({**good, "lo": [[[-1.0]]]}, "lo"),
             ({**good, "hi": [[["x"], [1.0]]]}, "hi"), ({**good, "floor": [float("nan")]}, "floor")]  # fmt: skip
    fitted = {**good, "fitted": [True], "spread": [[0.1], [0.2], [0.3], [0.4]], "spread_floor": [[0.1], [0.1], [0.1]]}
    check_beyond_horizon(fitted, 1, 2, 1, "m.json")  # the fitted scale's keys (absent from older metadata)
    cases += [({**good, "adaptive": ["yes"]}, "adaptive"), ({**fitted, "fitted": [1]}, "fitted"),
              ({**fitted, "spread": [[0.1], [0.2]]}, "spread"),
              ({**fitted, "spread": [[0.1]] * 3 + [[None]]}, "spread"),
              ({**fitted, "spread_floor": [[0.1], [0.0], [0.1]]}, "spread_floor")]  # fmt: skip
    centred = {**good, "centre": [[[0.5], [0.9]], [[0.7], [0.8]]]}  # per span: intercept and slope per target
    check_beyond_horizon(centred, 1, 2, 1, "m.json")
    cases += [({**good, "centre": [[[0.5], [0.9]]]}, "centre"), ({**good, "centre": [[[0.5], [None]]] * 2}, "centre")]
    for bad, key in cases:
        with pytest.raises(ModelFileError, match=f"key 'intervals.beyond_horizon.{key}' must be"):
            check_beyond_horizon(bad, 1, 2, 1, "m.json")


def test_the_recorded_interval_scales_are_checked(smoke_run):
    """``intervals.scales`` names each target's scale (bench and readers show it): one known name per target."""
    from dwcp_lstm.contract import validate_metadata
    from dwcp_lstm.intervals import SCALES

    meta = json.loads((smoke_run / "model_metadata.json").read_text())
    assert len(meta["intervals"]["scales"]) == 4 and set(meta["intervals"]["scales"]) <= set(SCALES)
    validate_metadata(meta, "m.json")
    for bad in (["quantile"] * 3, ["quantile"] * 3 + ["gamma"], "quantile"):
        meta["intervals"]["scales"] = bad
        with pytest.raises(ModelFileError, match="key 'intervals.scales' must list one of"):
            validate_metadata(meta, "m.json")


def test_a_graph_exported_with_another_calibration_is_named(smoke_run, tmp_path, caplog):
    """``report --run`` recalibrates from the checkpoint; a model.onnx exported before the calibration changed (an
    older package, another scale) returns other bounds than the report judges. The report says so."""
    from dwcp_lstm import evaluate as E
    from dwcp_lstm.runs import load_run

    report = json.loads((smoke_run / "report.json").read_text())
    assert report["onnx"]["calibration_matches"] is True
    for name in ("model.onnx", "model_metadata.json"):
        shutil.copy(smoke_run / name, tmp_path / name)
    meta = json.loads((tmp_path / "model_metadata.json").read_text())
    meta["calibration"]["lo"][0][0][0] -= 1.0  # what the graph was exported with
    (tmp_path / "model_metadata.json").write_text(json.dumps(meta))
    module, dm, _ = load_run(smoke_run)
    facts = E.onnx_facts(tmp_path, dm, module, report["intervals"]["calibration"], runs=5)
    assert facts["calibration_matches"] is False and "another interval calibration" in caplog.text


def test_absurd_thread_counts_are_refused(smoke_run):
    """onnxruntime's option is a 32-bit int (a larger value raised a pybind11 traceback) and 100,000 threads hang."""
    for threads in (-1, 1025, 99_999_999_999):
        with pytest.raises(ConfigError, match="threads must be an integer from 0 to 1024"):
            Predictor.from_run(smoke_run, threads=threads)


def test_telemetry_is_read_as_the_training_data_was(smoke_run, two_links, tmp_path, capsys):
    """A model trained with ``duplicates: mean`` / ``fill_missing: true`` (the Irish config) refused its own training
    file in ``forecast`` and ``plan`` (an empty cell, a repeated second): the contract records both policies, and
    they are the default; the flags override them."""
    meta = json.loads((smoke_run / "model_metadata.json").read_text())
    assert meta["series"]["duplicates"] == "error" and meta["series"]["fill_missing"] is False
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    meta["series"].update(duplicates="mean", fill_missing=True)
    embed_contract(run / "model.onnx", {k: meta[k] for k in CONTRACT_KEYS})
    meta["model_sha256"] = sha256_of(run / "model.onnx")
    (run / "model_metadata.json").write_text(json.dumps(meta))

    df = pd.read_csv(two_links).sort_values(["node_id", "peer_id", "timestamp"]).reset_index(drop=True)
    last = df.groupby(["node_id", "peer_id"]).tail(1).index
    messy = df.copy()
    messy.loc[last[0], "rtt_ms"] = np.nan  # an empty cell in a link's latest row
    messy = pd.concat([messy, messy.loc[[last[1]]].assign(jitter_ms=lambda d: d["jitter_ms"] + 1.0)])  # a repeat
    messy_path = tmp_path / "messy.csv"
    messy.to_csv(messy_path, index=False)
    clean = df.copy()  # what the training policies make of it: the last known value, the mean of the repeats
    clean.loc[last[0], "rtt_ms"] = df.loc[last[0] - 1, "rtt_ms"]
    clean.loc[last[1], "jitter_ms"] += 0.5
    clean_path = tmp_path / "clean.csv"
    clean.to_csv(clean_path, index=False)

    got, want = tmp_path / "got.csv", tmp_path / "want.csv"
    cli_main(["forecast", "--model", str(run), "--input", str(messy_path), "--output", str(got)])
    cli_main(["forecast", "--model", str(run), "--input", str(clean_path), "--output", str(want)])
    pd.testing.assert_frame_equal(pd.read_csv(got), pd.read_csv(want))
    cli_main(["plan", "--model", str(run), "--input", str(messy_path), "--memory-gib", "1"])
    capsys.readouterr()
    for flags, message in ((["--no-fill-missing"], "column 'rtt_ms' row"), (["--duplicates", "error"], "duplicate")):
        for command in (["forecast"], ["plan", "--memory-gib", "1"]):
            with pytest.raises(SystemExit) as exc:
                cli_main([command[0], "--model", str(run), "--input", str(messy_path), *command[1:], *flags])
            err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
            assert exc.value.code == 2 and len(err) == 1 and message in err[0], (flags, err)
    with pytest.raises(SystemExit):  # the smoke run itself was trained with neither: as before, refused
        cli_main(["forecast", "--model", str(smoke_run), "--input", str(messy_path)])
    assert "column 'rtt_ms' row" in capsys.readouterr().err
    for key, value in (("duplicates", "last"), ("fill_missing", "yes")):
        bad = json.loads((run / "model_metadata.json").read_text())
        bad["series"][key] = value
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(ModelFileError, match=f"key 'series.{key}' must be"):
            Predictor(run / "model.onnx", tmp_path / "bad.json")


def test_rows_at_another_cadence_than_training_are_refused(smoke_run, two_links, tmp_path, capsys):
    """The model forecasts the next rows: rows every 50 minutes fed to a model of rows every 5 gave confident
    forecasts of the wrong thing, silently. The contract records the training cadence."""
    meta = json.loads((smoke_run / "model_metadata.json").read_text())
    assert meta["series"]["cadence_s"] == 300.0
    df = pd.read_csv(two_links)
    slow = tmp_path / "slow.csv"
    df.assign(timestamp=df["timestamp"] * 10).to_csv(slow, index=False)
    for command in (["forecast"], ["plan", "--memory-gib", "1"]):
        with pytest.raises(SystemExit) as exc:
            cli_main([command[0], "--model", str(smoke_run), "--input", str(slow), *command[1:]])
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert exc.value.code == 2 and len(err) == 1, err
        assert "slow.csv: link" in err[0] and "a row every 3000 s, the model was trained on a row every 300 s" in err[0]
    # the right cadence for most of the history, but the latest window (what the model reads) 3 x slower
    late = df.sort_values(["node_id", "peer_id", "timestamp"])
    back = late.groupby(["node_id", "peer_id"]).cumcount(ascending=False)  # rows from the end
    late["timestamp"] = late["timestamp"] + 450 * (30 - back).clip(0)  # the last 30 steps 750 s (2.5 x), no gap
    late_path = tmp_path / "late.csv"
    late.to_csv(late_path, index=False)
    with pytest.raises(SystemExit):
        cli_main(["forecast", "--model", str(smoke_run), "--input", str(late_path)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "a row every 750 s in its latest window" in err[0], err
    # steps of 60, 300 and 540 s in turn: the median step is training's 300 s (and no step a gap), but the model
    # would read them as evenly spaced
    alt = df.sort_values(["node_id", "peer_id", "timestamp"]).copy()
    k = alt.groupby(["node_id", "peer_id"]).cumcount().to_numpy()
    alt["timestamp"] = (
        alt.groupby(["node_id", "peer_id"])["timestamp"].transform("min")
        + 900 * (k // 3)
        + np.array([0, 60, 360])[k % 3]
    )
    alt_path = tmp_path / "alternating.csv"
    alt.to_csv(alt_path, index=False)
    with pytest.raises(SystemExit):
        cli_main(["forecast", "--model", str(smoke_run), "--input", str(alt_path)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "alternating.csv: link" in err[0]
    assert "a quarter of the steps 60 s or shorter, the model was trained on a row every 300 s" in err[0]
    jitter = tmp_path / "jitter.csv"  # within a factor of 2: accepted
    df.assign(timestamp=df["timestamp"] + np.arange(len(df)) % 3 * 60).to_csv(jitter, index=False)
    cli_main(["forecast", "--model", str(smoke_run), "--input", str(jitter)])

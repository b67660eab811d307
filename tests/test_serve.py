"""The torch-free predictor: parity with the PyTorch module, input checks, the `forecast` subcommand."""

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
from dwcp_lstm.serve import Predictor, cmd_forecast, load_metadata
from dwcp_lstm.tables import DataError

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
    assert list(single) == predictor.targets
    with torch.no_grad():
        last = raw(torch.from_numpy(x[None, -w:])).numpy()[0]
    assert rel_err(np.array(list(single.values())), last, tscale) < 1e-4

    # rolling: one forecast per window, indexed by the window's last row
    rolling = predictor.predict_rolling(link)
    assert len(rolling) == len(link) - w + 1
    assert rolling.index[0] == w - 1 and list(rolling.columns) == predictor.targets
    assert rolling.attrs["units"]["rtt_ms"] == "ms"
    np.testing.assert_allclose(rolling.iloc[-1].to_numpy(), list(single.values()), rtol=1e-6)

    # a batch [B, W, F] gives a DataFrame, an array [rows, F] a dict
    batch = predictor.predict(windows[:3], columns=predictor.features)
    assert isinstance(batch, pd.DataFrame) and batch.shape == (3, len(predictor.targets))
    assert predictor.predict(x, columns=predictor.features) == pytest.approx(single, rel=1e-6)


def test_serve_imports_neither_torch_nor_lightning():
    code = "import sys, dwcp_lstm.serve; print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))"
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
    with pytest.raises(DataError, match=r"model\.onnx: sha256 .* does not match model_metadata\.json"):
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
        (lambda m: m.update(model_sha256="abc"), r"key 'model_sha256' must be 64 lowercase hex digits"),
        (lambda m: m.update(format="pickle"), r"key 'format' is 'pickle'"),
    ],
)
def test_bad_metadata_is_refused(smoke_run, tmp_path, edit, message):
    run = copy_run(smoke_run, tmp_path / "run")
    meta = json.loads((run / "model_metadata.json").read_text())
    edit(meta)
    (run / "model_metadata.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"model_metadata\.json: " + message):
        Predictor.from_run(run)


def test_unreadable_metadata_is_refused(smoke_run, tmp_path):
    run = copy_run(smoke_run, tmp_path / "run")
    (run / "model_metadata.json").write_text("{not json")
    with pytest.raises(DataError, match=r"model_metadata\.json: not valid JSON"):
        Predictor.from_run(run)
    (run / "model_metadata.json").unlink()
    with pytest.raises(DataError, match=r"model_metadata\.json: file not found"):
        load_metadata(run / "model_metadata.json")


# -- the forecast subcommand ----------------------------------------------------------------------------------------
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
    assert "skipped 1 of 3 series segments shorter than 20 rows" in capsys.readouterr().err
    got = pd.read_csv(out)
    src = pd.read_csv(two_links).sort_values(["node_id", "peer_id", "timestamp"])
    full = src.groupby(["node_id", "peer_id"]).filter(lambda g: len(g) >= predictor.window)
    last = full.groupby(["node_id", "peer_id"], as_index=False)["timestamp"].max()
    assert list(got.columns) == ["node_id", "peer_id", "timestamp", *predictor.targets]
    pd.testing.assert_frame_equal(got[["node_id", "peer_id", "timestamp"]], last)
    for row, (_, link) in zip(got.itertuples(), full.groupby(["node_id", "peer_id"]), strict=True):
        expected = predictor.predict(link)
        assert [getattr(row, t) for t in predictor.targets] == pytest.approx(list(expected.values()), rel=1e-5)
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


def test_forecast_with_no_link_long_enough_is_an_error(smoke_run, two_links, tmp_path):
    short = tmp_path / "short.csv"
    pd.read_csv(two_links).groupby(["node_id", "peer_id"]).head(10).to_csv(short, index=False)
    with pytest.raises(DataError, match=r"short\.csv: no series has at least 20 rows"):
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

"""Forecasts and interval bounds stay inside the targets' physical ranges (a throughput is never negative, a loss
fraction never above 1): in PyTorch, in the ONNX graph, in the report's numpy bounds, for the baselines and after
online recalibration, all clipped the same way."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest
import torch

from dwcp_lstm import evaluate as E
from dwcp_lstm.baselines import RidgeBaseline
from dwcp_lstm.callbacks import export_onnx, range_entry
from dwcp_lstm.contract import METADATA_NAME, validate_metadata
from dwcp_lstm.data import DwcpDataModule
from dwcp_lstm.errors import ModelFileError
from dwcp_lstm.intervals import calibrate, intervals
from dwcp_lstm.module import DwcpForecaster
from dwcp_lstm.serve import recalibrate_online
from dwcp_lstm.tables import target_ranges

FEATURES = ["throughput_mbps", "packet_loss", "score"]
TARGETS = ["throughput_mbps", "packet_loss", "score"]  # "score" has no physical range: never clipped


def test_ranges_come_from_the_names():
    r = target_ranges(TARGETS)
    assert r.shape == (2, 3)
    assert r[:, 0].tolist() == [0.0, np.inf] and r[:, 1].tolist() == [0.0, 1.0]
    assert r[:, 2].tolist() == [-np.inf, np.inf]
    assert range_entry("throughput_mbps") == {"range": [0.0, None]} and range_entry("score") == {}


def pushed_module(offset: float, horizon: int = 1) -> DwcpForecaster:
    """A small module whose forecasts are the window's last value plus ``offset`` (plus a little): far outside the
    ranges for a large offset."""
    torch.manual_seed(0)
    m = DwcpForecaster(FEATURES, TARGETS, window_size=6, horizon=horizon, lstm_sizes=(4,), head_sizes=(4,),
                       head_dropouts=())  # fmt: skip
    m.tmean.fill_(offset)
    return m.eval()


def windows(n: int = 64) -> np.ndarray:
    rng = np.random.default_rng(1)
    x = rng.uniform(0.0, 1.0, size=(n, 6, 3)).astype(np.float32)  # every value inside every range
    x[:, :, 2] -= 0.5  # "score" may be negative
    return x


@pytest.mark.parametrize("offset", [-50.0, 50.0])
def test_the_graph_and_the_report_clip_forecasts(offset):
    m, x = pushed_module(offset), windows()
    with torch.no_grad():
        raw = m.raw_forecaster()(torch.from_numpy(x)).numpy()
        scaled = m.unscale(m(torch.from_numpy(x)), torch.from_numpy(x)).numpy()[:, 0]  # unit scalers: x is scaled x
    np.testing.assert_allclose(raw, scaled, rtol=1e-6)
    if offset < 0:
        assert (raw[:, :2] == 0.0).all()  # throughput and loss held at their floor
    else:
        assert (raw[:, 1] == 1.0).all() and (raw[:, 0] > 40).all()  # loss at its ceiling, throughput unbounded above
    np.testing.assert_allclose(raw[:, 2], x[:, -1, 2] + offset, atol=2.0)  # the unbounded target is not clipped
    assert (np.abs(raw[:, 2] - x[:, -1, 2]) > 40).all()


KINDS = {  # (fitted, quantile) flags per target; the others adaptive where marked below, else plain
    "volatility": (None, None),
    "fitted": (np.array([True, False, True]), None),
    "all-fitted": (np.array([True, True, True]), None),
    "quantile": (np.array([False, True, False]), np.array([True, False, False])),  # one of each kind
    "all-quantile": (None, np.array([True, True, True])),
}


@pytest.mark.parametrize("horizon", [1, 3])
@pytest.mark.parametrize("kinds", list(KINDS))
def test_graph_bounds_match_the_numpy_bounds_and_onnx(tmp_path, kinds, horizon):
    """Every scale in one graph: plain, the window's volatility, the fitted spread and the quantile scale; per step
    and, for H > 1, for the mean over k steps."""
    fitted, quantile = KINDS[kinds]
    m, x = pushed_module(-0.3, horizon), windows(200)
    rng = np.random.default_rng(2)
    pred = rng.uniform(0.0, 0.5, size=(100, horizon, 3))
    y = pred + rng.normal(0, 0.5, size=pred.shape) * (0.2 + pred)  # a spread that grows with the forecast
    cal = calibrate(pred, y, rng.uniform(size=(100, 6, 3)), [0.8, 0.95], adaptive=np.array([False, True, False]),
                    fitted=False if fitted is None else fitted,
                    quantile=False if quantile is None else quantile)  # fmt: skip
    if fitted is not None:
        assert cal.fitted.tolist() == (fitted | (quantile if quantile is not None else False)).tolist()
        j = int(np.flatnonzero(fitted)[0])
        assert np.ptp(cal.scale(x[:, :, :3].astype(np.float64))[:, 0, j]) > 0  # the window moves the scale
    if quantile is not None:
        assert cal.quantile.tolist() == quantile.tolist() and not (cal.adaptive & quantile).any()
    graph = m.interval_forecaster(cal)
    with torch.no_grad():
        out = [t.numpy() for t in graph(torch.from_numpy(x))]
    forecast, lower, upper = out[:3]
    steps = forecast[:, None] if horizon == 1 else forecast
    ranges = target_ranges(TARGETS)
    want = intervals(cal, steps.astype(np.float64), x[:, :, :3].astype(np.float64), ranges)
    names = ["lower", "upper"] + (["mean_lower", "mean_upper"] if horizon > 1 else [])
    for name, got in zip(names, out[1:], strict=True):
        np.testing.assert_allclose(got, want[name][:, :, 0] if horizon == 1 else want[name], rtol=1e-5, atol=1e-6)
    lower, upper = (v if horizon == 1 else v[:, :, 0] for v in (lower, upper))  # [N, L, T]: the first step
    assert (lower[:, :, :2] >= 0).all() and (upper[:, :, 1] <= 1).all()
    assert (lower[:, :, 0] == 0).any()  # the clip is exercised, not vacuous
    assert (lower[:, :, 2] < 0).any()  # and the unbounded target keeps its negative bounds
    unclipped = intervals(cal, steps.astype(np.float64), x.astype(np.float64))
    assert (unclipped["lower"][:, :, 0, 0] < 0).any()
    if quantile is not None:  # the quantile targets' width moves with the forecast
        width = want["upper"] - want["lower"]
        assert np.ptp(width[:, 0, 0, quantile], axis=0).min() > 0
    path = tmp_path / "m.onnx"
    export_onnx(m, path, 6, calibration=cal)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(["forecast", *names], {"metrics": x})
    for a, b in zip(got, out, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def dm(small_csv) -> DwcpDataModule:
    dm = DwcpDataModule(data_path=str(small_csv), batch_size=16)
    dm.setup("fit")
    return dm


def test_the_ridge_and_boosted_baselines_are_clipped_like_the_model(dm, monkeypatch):
    monkeypatch.setattr(RidgeBaseline, "predict", lambda self, x: np.full((len(x), 4), -1e3))
    y = E.step_targets(dm, "test")
    _, preds = E.run_baselines(dm, y, 0.0)
    p, _ = preds["ridge"]
    assert (p == 0.0).all()  # every target of the default data has a floor of 0


def test_online_recalibration_keeps_bounds_in_range():
    # one link, one step, one level: a miss widens the next bounds about their midpoint, below 0 unless clipped
    columns = ["throughput_mbps", "throughput_mbps_lo80", "throughput_mbps_hi80"]
    t = ["throughput_mbps"]
    p = SimpleNamespace(all_columns=columns, horizon=1, targets=t, features=t, levels=[0.8], model_path="m")
    table = np.array([[1.0, 0.5, 1.5]] * 40)
    x = np.full((60, 1), 40.0)  # realised far above every bound: the multiplier grows
    out = recalibrate_online(p, table, x, np.arange(40), np.full(40, 60), np.zeros(40), "t")
    assert (out[-1, 2] > 3.0) and (out[:, 1] >= 0).all() and (out[-1, 1] == 0.0)


def test_the_exported_contract_states_the_ranges(smoke_run):
    meta = json.loads((smoke_run / METADATA_NAME).read_text())
    ranges = {t["name"]: t.get("range") for t in meta["targets"]}
    assert ranges == {"throughput_mbps": [0.0, None], "rtt_ms": [0.0, None], "packet_loss": [0.0, 1.0],
                      "jitter_ms": [0.0, None]}  # fmt: skip


@pytest.mark.parametrize("bad", [[1.0], [1.0, 0.0], [0, "x"], [float("nan"), None], "0..1", [True, None]])
def test_a_tampered_range_is_refused(smoke_run, bad):
    meta = json.loads((smoke_run / METADATA_NAME).read_text())
    meta["targets"][0]["range"] = bad
    with pytest.raises(ModelFileError, match=r"targets\[0\]\.range"):
        validate_metadata(meta, "m.json")


@pytest.mark.parametrize("bad", [[2.0, 1.0], [0.0, None], [float("inf"), 1.0], "x"])
def test_a_tampered_training_range_is_refused(smoke_run, bad):
    meta = json.loads((smoke_run / METADATA_NAME).read_text())
    assert meta["features"][0]["train_range"][0] <= meta["features"][0]["train_range"][1]
    meta["features"][0]["train_range"] = bad
    with pytest.raises(ModelFileError, match=r"features\[0\]\.train_range' must be \[low, high\] \(two numbers"):
        validate_metadata(meta, "m.json")

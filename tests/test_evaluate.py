"""The evaluation pieces against numpy: head-to-head figures, skill and gap closed from the report's own MSEs, strict
JSON (undefined = null), and the oracle join."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from dwcp_lstm import evaluate as E
from dwcp_lstm import synthetic
from dwcp_lstm.data import DwcpDataModule
from dwcp_lstm.module import DwcpForecaster
from dwcp_lstm.tables import target_ranges


def test_head_to_head_matches_numpy():
    rng = np.random.default_rng(3)
    y = rng.normal(size=(50, 2))
    pred = y + 0.1 * rng.normal(size=(50, 2))
    base = y + 0.3 * rng.normal(size=(50, 2))
    mask = np.arange(50) % 2 == 0
    out = E.head_to_head(pred, y, {"b": (base, mask)}, ["t0", "t1"])
    for j, t in enumerate(["t0", "t1"]):
        h = out[t]["b"]
        assert h["model_rmse"] == pytest.approx(np.sqrt(np.mean((pred[mask, j] - y[mask, j]) ** 2)))
        assert h["rmse"] == pytest.approx(np.sqrt(np.mean((base[mask, j] - y[mask, j]) ** 2)))
        assert h["mae"] == pytest.approx(np.mean(np.abs(base[mask, j] - y[mask, j])))
        assert h["rmse_change"] == pytest.approx(h["model_rmse"] / h["rmse"] - 1)
        assert h["beats"] == (h["model_rmse"] < h["rmse"] and h["model_mae"] < h["mae"])


def test_finite_or_null_makes_strict_json():
    report = {"a": float("nan"), "b": [1.0, float("inf"), {"c": np.float64("nan")}], "d": 2}
    text = json.dumps(E.finite_or_null(report))
    assert json.loads(text, parse_constant=lambda c: pytest.fail(c)) == {"a": None, "b": [1.0, None, {"c": None}],
                                                                         "d": 2}  # fmt: skip


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    path = tmp / "d.csv"
    df, oracle = synthetic.generate_with_oracle(samples=1200, seed=2, links=2)
    synthetic.write_frame(df, path)
    synthetic.write_oracle(oracle, path)
    dm = DwcpDataModule(data_path=str(path), batch_size=64)
    dm.setup("fit")
    torch.manual_seed(0)
    module = DwcpForecaster(lstm_sizes=(16,), head_sizes=(8,), head_dropouts=())
    module.set_scalers(dm.scalers)
    return E.evaluate(module, dm, tmp), dm, tmp, oracle, module


def test_report_figures_follow_from_its_own_mse(evaluated):
    report, dm, run, *_ = evaluated
    mse = report["mse"]
    for t in dm.targets:
        m, p, o = mse["model"][t], mse["persistence"][t], mse["oracle"][t]
        assert report["skill"][t] == pytest.approx(1 - m / p)
        assert report["gap_closed"][t] == pytest.approx((p - m) / (p - o))
        assert report["per_target"][t]["rmse"] == pytest.approx(np.sqrt(m))
    json.loads((run / "report.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert (run / "report.md").read_text().startswith("# Evaluation report")
    assert set(report["baselines"]) >= {"persistence", "ewma", "harmonic_mean_5", "ridge", "gbt", "window_mean"}


def test_relative_errors_of_the_model_and_every_baseline_match_numpy(evaluated):
    """RMSE / mean and MAE / mean of the test targets, recomputed by hand from each forecaster's own test forecasts
    (the model's and every baseline's: they share compute_metrics, so none may lack them)."""
    report, dm, run, _, module = evaluated
    y = E.step_targets(dm, "test")[:, 0]  # [N, T]
    _, base_steps = E.run_baselines(dm, E.step_targets(dm, "test"), 0.0)
    forecasts = {"model": (E.predict_raw(module, dm)[:, 0], np.ones(len(y), dtype=bool))}
    forecasts |= {name: (p[:, 0], m) for name, (p, m) in base_steps.items()}
    assert set(forecasts) == {"model", *report["baselines"]}
    for name, (p, m) in forecasts.items():
        got = report["per_target"] if name == "model" else report["baselines"][name]["per_target"]
        for j, t in enumerate(dm.targets):
            e, mean = p[m, j] - y[m, j], y[m, j].mean()
            assert got[t]["rmse_over_mean"] == pytest.approx(np.sqrt(np.mean(e**2)) / mean, rel=1e-6), (name, t)
            assert got[t]["mae_over_mean"] == pytest.approx(np.mean(np.abs(e)) / mean, rel=1e-6), (name, t)
    header = "| forecaster | " + " | ".join(f"{t} RMSE/mean | {t} MAE/mean" for t in dm.targets) + " |"
    assert header in (run / "report.md").read_text()


def test_oracle_join_matches_the_sidecar_row_by_row(evaluated):
    _, dm, _, oracle, _ = evaluated
    rows = dm.target_rows("test")
    got = E.oracle_forecasts(dm, rows)  # [N, H, T], H = 1 here
    assert got.shape == (len(rows), 1, dm.n_targets)
    keys = dm.frame_keys.iloc[rows - 1].reset_index(drop=True)  # the oracle at the window's last row
    for i in (0, len(rows) // 2, len(rows) - 1):
        k = keys.iloc[i]
        match = oracle[(oracle["node_id"].astype(str) == str(k["node_id"])) &
                       (oracle["peer_id"].astype(str) == str(k["peer_id"])) &
                       (oracle["timestamp"] == k["timestamp"])]  # fmt: skip
        assert len(match) == 1
        np.testing.assert_allclose(got[i, 0], match[[f"oracle_{t}" for t in dm.targets]].to_numpy()[0])


def test_per_link_splits_the_windows_by_link(evaluated):
    report, dm, *_ = evaluated
    names = pd.Series(dm.series_names(dm.target_rows("test")))
    assert {k: v["windows"] for k, v in report["per_link"].items()} == names.value_counts().to_dict()


def test_interval_report_figures_follow_from_its_calibration(evaluated):
    """Coverage recomputed by hand from the calibration the report records: forecast + scale x [lo, hi]."""
    report, dm, run, *_ = evaluated
    iv = report["intervals"]
    cal = iv["calibration"]
    assert cal["levels"] == [0.8, 0.95] and cal["windows"] == len(dm.starts["val"])
    for t in dm.targets:
        for level in ("80", "95"):
            v = iv["per_target"][t][level]
            assert 0.0 <= v["coverage"] <= 1.0 and v["width"] > 0 and v["winkler"] >= v["width"]
            assert len(v["coverage_per_step"]) == dm.horizon and v["worst_link_coverage"] <= v["coverage"] + 1e-12
    # by hand for one target and level
    from conftest import terms_by_hand

    hist = E.target_history(dm, dm.starts["test"])
    y = E.step_targets(dm, "test")
    module_pred = E.predict_raw(evaluated_module(evaluated), dm)
    j, i = 1, 0
    shift, scale = terms_by_hand(module_pred[:, 0], hist, cal, j)
    lower = module_pred[:, 0, j] + shift + scale * cal["lo"][i][0][j]
    upper = module_pred[:, 0, j] + shift + scale * cal["hi"][i][0][j]
    coverage = ((y[:, 0, j] >= lower) & (y[:, 0, j] <= upper)).mean()
    assert iv["per_target"][dm.targets[j]]["80"]["coverage"] == pytest.approx(coverage)
    assert "## Prediction intervals" in (run / "report.md").read_text() and (run / "reliability.png").exists()
    goals = {"coverage_within_2_points", "worst_link_within_10_points", "winkler_below_conformal_persistence_and_ridge"}
    assert set(iv["checks"]) == goals | {f"online_{g}" for g in goals}
    # online, by hand for the same column: its static bounds recalibrated per link as the test split unrolls
    from dwcp_lstm.online import online_bounds

    rows = dm.target_rows("test")
    lo, hi = online_bounds(lower[:, None, None, None], upper[:, None, None, None], y[:, :1, j : j + 1], rows,
                           dm.series_names(rows), [0.8], module_pred[:, :1, j : j + 1])  # fmt: skip
    covered = ((y[:, 0, j] >= lo[:, 0, 0, 0]) & (y[:, 0, j] <= hi[:, 0, 0, 0])).mean()
    online = iv["per_target"][dm.targets[j]]["80"]["online"]
    assert online["coverage_per_step"][0] == pytest.approx(covered)
    assert "| online |" in (run / "report.md").read_text()


def test_oracle_intervals_are_calibrated_on_validation_and_judged_on_test(evaluated):
    """The oracle's intervals (how far the split alone moves coverage): calibrated on the validation windows' oracle
    rows from the sidecar, judged on the test windows'; recomputed by hand from the calibration they record."""
    from conftest import terms_by_hand

    report, dm, run, oracle, _ = evaluated
    got = report["intervals"]["oracle"]
    cal = got["calibration"]
    assert cal["windows"] == len(dm.starts["val"]) and cal["levels"] == [0.8, 0.95]
    rows = dm.target_rows("test")
    keys = dm.frame_keys.iloc[rows - 1]  # the oracle at each test window's last row, joined here by hand
    for k in ("node_id", "peer_id"):
        keys, oracle = keys.assign(**{k: keys[k].astype(str)}), oracle.assign(**{k: oracle[k].astype(str)})
    joined = keys.merge(oracle, on=["node_id", "peer_id", "timestamp"], how="left")
    y, hist = E.step_targets(dm, "test")[:, 0], E.target_history(dm, dm.starts["test"])
    forecast = joined[[f"oracle_{t}" for t in dm.targets]].to_numpy()
    for j, t in enumerate(dm.targets):
        shift, scale = terms_by_hand(forecast, hist, cal, j)
        for i, tag in enumerate(("80", "95")):
            lower = forecast[:, j] + shift + scale * cal["lo"][i][0][j]
            upper = forecast[:, j] + shift + scale * cal["hi"][i][0][j]
            low, high = target_ranges([t])[:, 0]
            lower, upper = np.clip(lower, low, high), np.clip(upper, low, high)
            assert got["coverage"][t][tag] == pytest.approx(((y[:, j] >= lower) & (y[:, j] <= upper)).mean())
    assert "Around the generator's oracle" in (run / "report.md").read_text()


def evaluated_module(evaluated):
    return evaluated[4]


def test_per_step_gap_closed_matches_numpy():
    rng = np.random.default_rng(4)
    y = rng.normal(size=(200, 3, 2))  # [N, H, T]
    oracle = y + 0.1 * rng.normal(size=y.shape) * np.arange(1, 4)[None, :, None]  # worse with the step
    pred = y + 0.3 * rng.normal(size=y.shape)
    persist = y + 0.5 * rng.normal(size=y.shape)
    out = E.per_step(pred, y, {"persistence": (persist, np.ones(len(y), dtype=bool))}, ["a", "b"], oracle)
    for j, t in enumerate(["a", "b"]):
        m, p, o = (((f[..., j] - y[..., j]) ** 2).mean(axis=0) for f in (pred, persist, oracle))  # [H]
        np.testing.assert_allclose(out["gap_closed"][t], (p - m) / (p - o))
        np.testing.assert_allclose(out["oracle"][t]["rmse"], np.sqrt(o))
        assert out["gap_closed_ge_0.8"][t] == [bool(g >= 0.8) for g in (p - m) / (p - o)]
    report = {"overall": {"average_correlation": 0.0, "average_mape": 1.0, "target_met": False}, "baselines": {},
              "head_to_head": {"a": {}, "b": {}}, "gap_closed": None, "horizon": out}  # fmt: skip
    mse = {"model": np.zeros(2)}
    assert E.checks(report, mse, ["a", "b"])["horizon_gap_closed_ge_0.8_every_step"] == {
        t: all(out["gap_closed_ge_0.8"][t]) for t in ("a", "b")
    }

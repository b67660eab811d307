"""The mix with ridge: weights chosen on validation as a brute-force reference chooses them, ridge identical to the
report's ridge baseline, never worse than either side on validation, carried by the exported graph."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dwcp_lstm import blend as BL
from dwcp_lstm.callbacks import export_run, raw_windows
from dwcp_lstm.data import DwcpDataModule
from dwcp_lstm.evaluate import fit_baselines, predict_raw, run_baselines, step_targets
from dwcp_lstm.model import RidgeBlend
from dwcp_lstm.module import DwcpForecaster
from dwcp_lstm.serve import Predictor


def test_blend_weights_pick_the_lowest_error_share_per_step_and_target():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(4000, 2, 3))
    net = y + rng.normal(scale=[[1.0, 0.0, 2.0]], size=y.shape)  # target 1: the network is exact
    ridge = y + rng.normal(scale=[[1.0, 1.0, 0.0]], size=y.shape)  # target 2: ridge is exact
    w = BL.blend_weights(net, ridge, y)
    assert w.shape == (2, 3)
    np.testing.assert_allclose(w[:, 0], 0.5, atol=0.1)  # equal independent errors: half and half
    np.testing.assert_array_equal(w[:, 1], 1.0)
    np.testing.assert_array_equal(w[:, 2], 0.0)
    for h in range(2):  # the reference: every grid value tried one by one
        for t in range(3):
            mse = [((g * net[:, h, t] + (1 - g) * ridge[:, h, t] - y[:, h, t]) ** 2).mean() for g in BL.GRID]
            assert w[h, t] == BL.GRID[int(np.argmin(mse))]


def test_blend_weights_prefer_the_network_on_a_tie_and_judge_the_clipped_mix():
    y = np.zeros((10, 1, 1))
    assert BL.blend_weights(y + 1.0, y + 1.0, y)[0, 0] == 1.0  # identical forecasts: the network alone
    # the network's negative forecasts clip to the range's 0 and are then exact; ridge's +1 never is
    net, ridge = np.full((10, 1, 1), -5.0), np.full((10, 1, 1), 1.0)
    assert BL.blend_weights(net, ridge, y, np.array([[0.0], [np.inf]]))[0, 0] > 0.8


def test_ridge_blend_module_is_the_convex_mix():
    rng = np.random.default_rng(1)
    w = rng.uniform(size=(3, 2))  # [H, T]
    coef, intercept = rng.normal(size=(6, 10)), rng.normal(size=6)
    x = rng.normal(size=(5, 2, 5)).astype(np.float32)  # [B, W, F]: flattened to 10
    out = rng.normal(size=(5, 3, 2)).astype(np.float32)
    got = RidgeBlend(w, coef, intercept)(torch.from_numpy(x), torch.from_numpy(out)).numpy()
    ridge = (x.reshape(5, -1) @ coef.T + intercept).reshape(5, 3, 2)
    np.testing.assert_allclose(got, w * out + (1 - w) * ridge, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def blended(small_csv):
    dm = DwcpDataModule(data_path=str(small_csv), batch_size=64)
    dm.setup("fit")
    torch.manual_seed(0)
    module = DwcpForecaster(lstm_sizes=(16,), head_sizes=(8,), head_dropouts=())  # untrained: ridge helps a lot
    module.set_scalers(dm.scalers)
    summary = BL.fit_blend(module.eval(), dm)
    return module, dm, summary


def test_the_blend_is_never_worse_than_either_side_on_validation(blended):
    module, dm, summary = blended
    assert module.blend is not None and summary["val_windows"] == len(dm.starts["val"])
    for t, v in summary["val_rmse"].items():
        assert v["blend"] <= min(v["network"], v["ridge"]) + 1e-12, t
    y = step_targets(dm, "val")  # the summary's figures are the forecast's own
    mixed = predict_raw(module, dm, "val")
    rmse = np.sqrt(((mixed - y) ** 2).mean(axis=(0, 1)))
    np.testing.assert_allclose(rmse, [summary["val_rmse"][t]["blend"] for t in dm.targets], rtol=1e-4)


def test_with_the_network_share_at_zero_the_forecast_is_the_reports_ridge(blended):
    module, dm, _ = blended
    keep = module.blend
    try:
        _, coef, intercept = BL.ridge_in_raw_units(dm)
        module.blend = RidgeBlend(torch.zeros_like(keep.w), coef, intercept)
        ours = predict_raw(module, dm, "test")
    finally:
        module.blend = keep
    _, preds = run_baselines(dm, step_targets(dm, "test"), 0.0, "test", fit_baselines(dm))
    np.testing.assert_allclose(ours, preds["ridge"][0], rtol=1e-4, atol=1e-3)


def test_the_exported_graph_carries_the_blend(blended, tmp_path):
    module, dm, summary = blended
    meta = export_run(module, dm, tmp_path, parity_windows=64)
    assert meta["parity"]["max_rel_diff"] < 1e-4 and meta["blend"] == json.loads(json.dumps(summary))
    x = raw_windows(dm, "test", 16)
    with torch.no_grad():
        expected = module.raw_forecaster()(torch.from_numpy(x)).numpy()
        alone = module.raw_forecaster()
        alone.blend = None
        unblended = alone(torch.from_numpy(x)).numpy()
    got = Predictor.from_run(tmp_path).predict_windows(x)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert np.abs(got - unblended).max() > 1e-2  # the mix changed the forecast, and the graph has it


def test_blend_off_or_too_few_validation_windows_leaves_the_network_alone(small_csv, monkeypatch):
    dm = DwcpDataModule(data_path=str(small_csv), batch_size=64)
    dm.setup("fit")
    module = DwcpForecaster(lstm_sizes=(8,), head_sizes=(), head_dropouts=(), blend_ridge=False)
    module.set_scalers(dm.scalers)
    assert BL.fit_blend(module.eval(), dm) is None and module.blend is None
    module = DwcpForecaster(lstm_sizes=(8,), head_sizes=(), head_dropouts=())
    module.set_scalers(dm.scalers)
    monkeypatch.setattr(BL, "MIN_WINDOWS", len(dm.starts["val"]) + 1)
    assert BL.fit_blend(module.eval(), dm) is None and module.blend is None


def test_the_test_loop_judges_the_blended_forecast(small_csv):
    import lightning as L

    from dwcp_lstm.metrics import compute_metrics

    dm = DwcpDataModule(data_path=str(small_csv), batch_size=64)
    dm.setup("fit")
    torch.manual_seed(0)
    module = DwcpForecaster(lstm_sizes=(8,), head_sizes=(), head_dropouts=())
    module.set_scalers(dm.scalers)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    logged = trainer.test(module, datamodule=dm, verbose=False)[0]
    assert module.blend is not None  # fitted at test start, from the validation split
    y = step_targets(dm, "test")[:, 0]
    ref = compute_metrics(predict_raw(module, dm, "test")[:, 0], y, dm.targets)
    for t in dm.targets:
        assert logged[f"test/{t}/rmse"] == pytest.approx(ref[t]["rmse"], rel=1e-4)
    module.blend = None
    predicted = torch.cat(trainer.predict(module, datamodule=dm)).numpy()  # the predict loop mixes too
    assert module.blend is not None
    np.testing.assert_allclose(predicted, predict_raw(module, dm, "test")[:, 0], rtol=1e-5, atol=1e-5)
    module.blend = None  # and the validate command (it scored the network alone, the report the mix: found by fuzzing)
    logged = trainer.validate(module, datamodule=dm, verbose=False)[0]
    assert module.blend is not None
    ref = compute_metrics(predict_raw(module, dm, "val")[:, 0], step_targets(dm, "val")[:, 0], dm.targets)
    for t in dm.targets:
        assert logged[f"val/{t}/rmse"] == pytest.approx(ref[t]["rmse"], rel=1e-4)

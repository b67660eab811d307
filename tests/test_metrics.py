import math

import numpy as np
import pytest
import torch
from scipy import stats

from dwcp_lstm.metrics import MaskedMAPE, compute_metrics, summarize


@pytest.fixture
def data():
    rng = np.random.default_rng(11)
    y = rng.uniform(0.5, 100, size=(500, 3))
    p = y + rng.normal(0, 5, size=y.shape)
    return y, p


def test_each_metric_matches_a_numpy_scipy_reference(data):
    y, p = data
    got = compute_metrics(torch.tensor(p), torch.tensor(y), ["a", "b", "c"])
    for j, name in enumerate("abc"):
        e = p[:, j] - y[:, j]
        ref = {
            "mae": np.abs(e).mean(),
            "rmse": np.sqrt((e**2).mean()),
            "mape": 100 * np.mean(np.abs(e) / np.abs(y[:, j])),
            "wape": np.abs(e).sum() / np.abs(y[:, j]).sum(),
            "r2": 1 - (e**2).sum() / ((y[:, j] - y[:, j].mean()) ** 2).sum(),
            "correlation": stats.pearsonr(y[:, j], p[:, j]).statistic,
            # relative errors as papers write them: divided by the mean of the actual values
            "rmse_over_mean": np.sqrt((e**2).mean()) / y[:, j].mean(),
            "mae_over_mean": np.abs(e).mean() / y[:, j].mean(),
        }
        assert set(got[name]) == set(ref)
        for k, v in ref.items():
            assert got[name][k] == pytest.approx(v, rel=1e-6), (name, k)


@pytest.mark.parametrize("scale", [1.0, 1e-3, 1e-6])
@pytest.mark.parametrize("noise", [0.1, 30.0])
def test_r2_does_not_depend_on_the_units(scale, noise):
    """Found by an audit against numpy: torchmetrics' R2Score returns exactly 1 when the squared errors sum to less
    than an absolute 1e-4 (and 0 when the targets' squares do), so a packet-loss rate's R2 of 0.992 on 450 windows
    read 1.0 and a forecast far worse than the mean read 0. R2 is unitless: the same data in other units, the same
    R2, numpy's."""
    rng = np.random.default_rng(0)
    y = 3.0 + rng.standard_normal(450)
    p = y + noise * rng.standard_normal(450)
    ref = 1 - ((p - y) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    got = compute_metrics(torch.tensor(scale * p[:, None]), torch.tensor(scale * y[:, None]), ["a"])["a"]["r2"]
    assert got == pytest.approx(ref, rel=1e-9)


def test_relative_errors_by_hand():
    """Small enough to check on paper: errors 1, -2, 3, 0 on actuals with mean 10 (|mean| for a negative one)."""
    y = np.array([[8.0], [9.0], [11.0], [12.0]])
    p = y + np.array([[1.0], [-2.0], [3.0], [0.0]])
    got = compute_metrics(torch.tensor(p), torch.tensor(y), ["a"])["a"]
    assert got["mae_over_mean"] == pytest.approx(6 / 4 / 10)
    assert got["rmse_over_mean"] == pytest.approx(np.sqrt(14 / 4) / 10)
    neg = compute_metrics(torch.tensor(-p), torch.tensor(-y), ["a"])["a"]  # e.g. a target in dBm
    assert neg["rmse_over_mean"] == pytest.approx(got["rmse_over_mean"])
    zero_mean = compute_metrics(torch.tensor([[1.0], [0.0]]), torch.tensor([[1.0], [-1.0]]), ["a"])["a"]
    assert np.isnan(zero_mean["rmse_over_mean"]) and np.isnan(zero_mean["mae_over_mean"])


def test_metrics_accumulate_over_batches_like_one_pass(data):
    from dwcp_lstm.metrics import ForecastMetrics

    y, p = data
    m = ForecastMetrics(["a", "b", "c"])
    for i in range(0, 500, 64):
        m.update(torch.tensor(p[i : i + 64]), torch.tensor(y[i : i + 64]))
    one = compute_metrics(torch.tensor(p), torch.tensor(y), ["a", "b", "c"])
    for name in "abc":
        for k, v in one[name].items():
            assert m.compute()[name][k] == pytest.approx(v, rel=1e-9)


def test_mape_skips_targets_at_or_below_the_floor():
    m = MaskedMAPE()
    m.update(torch.tensor([110.0, 5.0, 1.0]), torch.tensor([100.0, 0.0, 0.0]))
    assert float(m.compute()) == pytest.approx(10.0)
    m = MaskedMAPE(floor=50.0)
    m.update(torch.tensor([110.0, 30.0]), torch.tensor([100.0, 20.0]))
    assert float(m.compute()) == pytest.approx(10.0)
    empty = MaskedMAPE()
    empty.update(torch.tensor([1.0]), torch.tensor([0.0]))
    assert np.isnan(float(empty.compute()))


def test_summary_means_and_target_check():
    rel = {"rmse_over_mean": 0.1, "mae_over_mean": 0.05}
    per_target = {
        "a": {"mae": 1, "rmse": 1, "mape": 4.0, "wape": 0.1, "r2": 0.9, "correlation": 0.99, **rel},
        "b": {"mae": 1, "rmse": 1, "mape": 5.0, "wape": 0.1, "r2": 0.9, "correlation": 0.975, **rel},
    }
    s = summarize(per_target)
    assert s["average_rmse_over_mean"] == pytest.approx(0.1)
    assert s["average_correlation"] == pytest.approx(0.9825) and s["average_mape"] == pytest.approx(4.5)
    assert s["accuracy_percent"] == pytest.approx(98.25) and s["target_met"] is True
    per_target["b"]["mape"] = 7.0
    assert summarize(per_target)["target_met"] is False


def test_head_to_head_compares_on_each_baselines_windows():
    from dwcp_lstm.evaluate import head_to_head

    rng = np.random.default_rng(5)
    y = rng.normal(size=(200, 2))
    pred, base = y + rng.normal(0, 0.1, y.shape), y + rng.normal(0, 0.3, y.shape)
    mask = np.arange(200) < 50  # a baseline that covers only the first 50 windows
    h = head_to_head(pred, y, {"b": (base, mask)}, ["u", "v"])
    for j, t in enumerate("uv"):
        e = pred[:50, j] - y[:50, j]
        assert h[t]["b"]["model_rmse"] == pytest.approx(np.sqrt((e**2).mean()))
        assert h[t]["b"]["mae"] == pytest.approx(np.abs(base[:50, j] - y[:50, j]).mean())
        assert h[t]["b"]["beats"] is True
    assert head_to_head(base, y, {"b": (pred, mask)}, ["u", "v"])["u"]["b"]["beats"] is False


def test_metrics_undefined_on_the_data_are_nan():
    import math

    from dwcp_lstm.metrics import compute_metrics, summarize

    y = np.zeros((50, 2))
    y[:, 1] = np.linspace(1, 2, 50)
    p = y + 0.01
    m = compute_metrics(p, y, ["flat", "ramp"])
    assert all(math.isnan(m["flat"][k]) for k in ("r2", "correlation", "wape", "mape", "rmse_over_mean"))
    assert m["flat"]["rmse"] == pytest.approx(0.01) and not math.isnan(m["ramp"]["r2"])
    s = summarize(m)
    assert s["average_correlation"] == pytest.approx(m["ramp"]["correlation"])
    assert s["undefined"]["r2"] == ["flat"]


def test_one_row_gives_errors_and_leaves_r2_and_correlation_undefined():
    """Found by a hunt: a link with one test window ended the report in a traceback after the whole training
    (torchmetrics' R2Score.compute raises below two rows); its per-link errors are defined, R2 and correlation not."""
    got = compute_metrics(torch.tensor([[1.0]]), torch.tensor([[2.0]]), ["a"])["a"]
    assert got["mae"] == got["rmse"] == 1.0 and got["mape"] == 50.0 and got["wape"] == 0.5
    assert math.isnan(got["r2"]) and math.isnan(got["correlation"])

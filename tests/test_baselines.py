"""The baselines against independent references: pandas' ewm, scipy's hmean, scikit-learn's Ridge, direct loops."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.linear_model import Ridge

from dwcp_lstm import baselines as B

RNG = np.random.default_rng(11)
HIST = RNG.uniform(1.0, 10.0, size=(40, 12, 3))  # [N, W, T]


def test_persistence_and_window_mean():
    np.testing.assert_array_equal(B.persistence(HIST), HIST[:, -1])
    np.testing.assert_allclose(B.window_mean(HIST), np.array([[HIST[n, :, t].mean() for t in range(3)]
                                                              for n in range(40)]))  # fmt: skip


@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.95])
def test_ewma_matches_pandas(alpha):
    # pandas' adjust=True mean weights (1 - alpha)^k back from the newest row, normalised over the window
    expected = np.array([[pd.Series(HIST[n, :, t]).ewm(alpha=alpha, adjust=True).mean().iloc[-1] for t in range(3)]
                         for n in range(40)])  # fmt: skip
    np.testing.assert_allclose(B.ewma(HIST, alpha), expected, rtol=1e-12)


def test_fit_ewma_alpha_picks_the_best_alpha_per_target():
    # target 0 follows the last value (alpha -> 0.95), target 1 the window mean (alpha -> small)
    y = np.stack([HIST[:, -1, 0], HIST[:, :, 1].mean(axis=1), HIST[:, -1, 2]], axis=1)
    alpha = B.fit_ewma_alpha(HIST, y)
    assert alpha[0] == pytest.approx(0.95) and alpha[2] == pytest.approx(0.95)
    assert alpha[1] == pytest.approx(0.05)
    brute = [min(B.EWMA_ALPHAS, key=lambda a, t=t: ((B.ewma(HIST, a)[:, t] - y[:, t]) ** 2).mean()) for t in range(3)]
    np.testing.assert_allclose(alpha, brute)


def test_harmonic_mean_matches_scipy_and_is_zero_with_a_zero():
    np.testing.assert_allclose(B.harmonic_mean(HIST), stats.hmean(HIST[:, -5:], axis=1), rtol=1e-12)
    hist = HIST.copy()
    hist[3, -2, 1] = 0.0
    out = B.harmonic_mean(hist)
    assert out[3, 1] == 0.0 and out[3, 0] == pytest.approx(stats.hmean(hist[3, -5:, 0]))


def test_seasonal_naive_finds_the_row_one_period_earlier_in_the_same_segment():
    times = np.r_[np.arange(0, 200, 10), np.arange(0, 200, 10)].astype(np.float64)  # two segments, step 10
    segment = np.r_[np.zeros(20, int), np.ones(20, int)]
    values = np.arange(40, dtype=np.float64)[:, None] * np.array([1.0, -1.0])  # [R, 2]
    rows = np.array([5, 15, 25, 39, 2])
    pred, found = B.seasonal_naive(values, times, segment, rows, period=50.0)
    for i, r in enumerate(rows):
        same = np.flatnonzero((segment == segment[r]) & (times == times[r] - 50.0))
        assert found[i] == (len(same) == 1)
        if found[i]:
            np.testing.assert_array_equal(pred[i], values[same[0]])
    assert not found[-1]  # row 2 (time 20) has no row 50 s earlier


def test_ridge_baseline_matches_sklearn_ridge_at_its_alpha():
    x = RNG.normal(size=(200, 6, 2))
    y = x[:, -1] @ np.array([[1.0, 0.5], [-0.3, 2.0]]) + 0.01 * RNG.normal(size=(200, 2))
    ridge = B.RidgeBaseline().fit(x, y)
    ref = Ridge(alpha=ridge.model.alpha_).fit(x.reshape(200, -1), y)
    np.testing.assert_allclose(ridge.predict(x), ref.predict(x.reshape(200, -1)), rtol=1e-6, atol=1e-9)
    assert ridge.predict(x[:1]).shape == (1, 2)


def test_boosting_features_and_fit():
    x = RNG.normal(size=(300, 5, 2))
    f = B.BoostingBaseline.features(x)
    np.testing.assert_array_equal(f[:, :2], x[:, -1])
    np.testing.assert_array_equal(f[:, 2:4], x[:, -2])
    np.testing.assert_allclose(f[:, -2:], x[:, -1] - x[:, 0])
    y = x[:, -1] ** 2
    model = B.BoostingBaseline(max_iter=50).fit(x, y)
    assert ((model.predict(x) - y) ** 2).mean() < 0.2 * y.var()


def test_skill_and_gap_closed_with_undefined_cases():
    mse_model, mse_persistence = np.array([1.0, 2.0, 0.0]), np.array([4.0, 2.0, 0.0])
    mse_oracle = np.array([0.0, 1.0, 0.0])
    np.testing.assert_allclose(B.skill(mse_model, mse_persistence)[:2], [0.75, 0.0])
    np.testing.assert_allclose(B.gap_closed(mse_model, mse_persistence, mse_oracle)[:2], [0.75, 0.0])
    assert np.isnan(B.skill(mse_model, mse_persistence)[2])  # persistence exact: skill undefined, not inf
    assert np.isnan(B.gap_closed(mse_model, mse_persistence, mse_oracle)[2])
    np.testing.assert_allclose(B.mse(np.ones((4, 2)), np.zeros((4, 2))), [1.0, 1.0])

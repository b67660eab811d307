"""Reference forecasts on the same windows as the model, in original units (numpy + scikit-learn; no torch).

Every function takes the raw target history ``hist`` [N, W, T] of each window (the W known rows before the
forecast) and returns forecasts [N, T] of the row after it.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import RidgeCV

EWMA_ALPHAS = np.round(np.arange(0.05, 1.0, 0.05), 2)


def persistence(hist: np.ndarray) -> np.ndarray:
    """The last known value."""
    return hist[:, -1]


def window_mean(hist: np.ndarray) -> np.ndarray:
    """The mean of the window."""
    return hist.mean(axis=1)


def ewma(hist: np.ndarray, alpha: np.ndarray | float) -> np.ndarray:
    """Exponentially weighted mean with weights ``alpha (1 - alpha)^k`` back from the last row (k = 0), normalised
    over the window. ``alpha`` may be one value per target."""
    alpha = np.broadcast_to(np.asarray(alpha, dtype=np.float64), (hist.shape[2],))
    k = np.arange(hist.shape[1])[::-1, None]  # [W, 1]: 0 for the last row
    w = alpha * (1 - alpha) ** k  # [W, T]
    return (hist * w).sum(axis=1) / w.sum(axis=0)


def fit_ewma_alpha(hist: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per target, the alpha from 0.05..0.95 with the lowest MSE on the given (training) windows."""
    mse = np.stack([((ewma(hist, a) - y) ** 2).mean(axis=0) for a in EWMA_ALPHAS])  # [A, T]
    return EWMA_ALPHAS[mse.argmin(axis=0)]


def harmonic_mean(hist: np.ndarray, k: int = 5) -> np.ndarray:
    """Harmonic mean of the last ``k`` values (adaptive video streaming's throughput predictor).

    A zero (or negative) value in the last ``k`` makes the forecast 0, the limit of the harmonic mean.
    """
    last = hist[:, -k:]
    positive = (last > 0).all(axis=1)
    with np.errstate(divide="ignore"):
        hm = k / (1.0 / np.where(last > 0, last, 1.0)).sum(axis=1)
    return np.where(positive, hm, 0.0)


def seasonal_naive(
    values: np.ndarray, times: np.ndarray, segment: np.ndarray, target_rows: np.ndarray, period: float = 86_400.0
) -> tuple[np.ndarray, np.ndarray]:
    """The value at the same time one ``period`` earlier in the same series segment.

    Args:
        values: raw targets of every row [R, T]; times: time of every row [R]; segment: series id per row [R],
            rows sorted by (segment, time); target_rows: rows to forecast [N].

    Returns:
        forecasts [N, T] and a mask [N] of the windows whose series has a row exactly one period earlier.
    """
    want = times[target_rows] - period
    key = segment.astype(np.float64) * 1e12 + times  # sortable (segment, time) key; times < 1e12 s
    pos = np.searchsorted(key, segment[target_rows] * 1e12 + want)
    pos = np.clip(pos, 0, len(key) - 1)
    found = np.isclose(key[pos], segment[target_rows] * 1e12 + want, rtol=0, atol=1e-3)
    return values[pos], found


class RidgeBaseline:
    """Ridge regression on the flattened, scaled window [N, W * F] -> scaled targets; alpha by leave-one-out CV on
    the training windows (at most ``max_windows`` of them, evenly spaced, to bound memory on large data)."""

    def __init__(self, max_windows: int = 100_000) -> None:
        self.max_windows = max_windows
        self.model = RidgeCV(alphas=np.logspace(-3, 3, 13))

    def fit(self, x: np.ndarray, y: np.ndarray) -> RidgeBaseline:
        pick = _even_subset(len(x), self.max_windows)
        self.model.fit(x[pick].reshape(len(pick), -1), y[pick])
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.model.predict(x.reshape(len(x), -1)).reshape(len(x), -1)  # [N, T], also when T = 1


class BoostingBaseline:
    """Gradient-boosted trees (scikit-learn's HistGradientBoosting), one per target, on the last step's features
    plus the window's mean, min, max and slope of each feature: a strong non-linear tabular opponent."""

    def __init__(self, max_windows: int = 50_000, max_iter: int = 200, seed: int = 0) -> None:
        self.max_windows, self.max_iter, self.seed = max_windows, max_iter, seed
        self.models: list = []

    @staticmethod
    def features(x: np.ndarray) -> np.ndarray:
        slope = x[:, -1] - x[:, 0]
        return np.concatenate([x[:, -1], x[:, -2], x.mean(1), x.min(1), x.max(1), slope], axis=1)  # [N, 6F]

    def fit(self, x: np.ndarray, y: np.ndarray) -> BoostingBaseline:
        from sklearn.ensemble import HistGradientBoostingRegressor

        pick = _even_subset(len(x), self.max_windows)
        f = self.features(x[pick])
        self.models = [
            HistGradientBoostingRegressor(max_iter=self.max_iter, random_state=self.seed).fit(f, y[pick, j])
            for j in range(y.shape[1])
        ]
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        f = self.features(x)
        return np.stack([m.predict(f) for m in self.models], axis=1)


def _even_subset(n: int, k: int) -> np.ndarray:
    return np.arange(n) if n <= k else np.linspace(0, n - 1, k).astype(np.int64)


def mse(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-target mean squared error [T]."""
    return ((pred - y) ** 2).mean(axis=0)


def skill(mse_model: np.ndarray, mse_persistence: np.ndarray) -> np.ndarray:
    """1 - MSE_model / MSE_persistence: 0 = no better than the last value, 1 = perfect."""
    return 1.0 - _ratio(mse_model, mse_persistence)


def gap_closed(mse_model: np.ndarray, mse_persistence: np.ndarray, mse_oracle: np.ndarray) -> np.ndarray:
    """(MSE_persistence - MSE_model) / (MSE_persistence - MSE_oracle): the share of the way from persistence to the
    best possible forecast that the model covers (1 = as good as the oracle)."""
    return _ratio(mse_persistence - mse_model, mse_persistence - mse_oracle)


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b, NaN where b is 0 (e.g. a target that never changes: persistence is exact and skill is undefined)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.divide(a, b, out=np.full(np.broadcast(a, b).shape, np.nan), where=b != 0)

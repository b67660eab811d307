"""The model's forecast mixed with ridge regression's, per step and target, the mix chosen on the validation split.

Why: ridge on the window's lags is the baseline the network loses to where a step is mostly noise (the late steps
of a 12-step horizon, some real traces), and the two err differently, so a convex mix beats both. Each step and
target gets ``w`` from 0, 0.05, .., 1 (1 = the network alone) with the lowest validation MSE of the clipped mix;
ties go to the network. Fitted after training from the checkpoint and the data (like the interval calibration,
which then calibrates the mixed forecast), never on test windows. Ridge is the report's ridge baseline, the same
fit, so the mix is linear in the window and the exported graph carries it (:class:`~dwcp_lstm.model.RidgeBlend`).
"""

from __future__ import annotations

import numpy as np

from dwcp_lstm.evaluate import fit_ridge, predict_raw, scaled_windows, step_targets
from dwcp_lstm.model import RidgeBlend
from dwcp_lstm.tables import clip_to, log, target_ranges

GRID = np.round(np.linspace(1.0, 0.0, 21), 2)  # the network's share; first = preferred on a tie
MIN_WINDOWS = 50  # fewer validation windows choose a mix by noise: the network alone


def blend_weights(net: np.ndarray, ridge: np.ndarray, y: np.ndarray, ranges: np.ndarray | None = None) -> np.ndarray:
    """Per step and target, the share ``w`` of the network (from :data:`GRID`) whose clipped mix
    ``w net + (1 - w) ridge`` has the lowest mean squared error against ``y``; all three [N, H, T] raw, unclipped
    forecasts. Returns ``w`` [H, T]."""
    best_w = np.ones(net.shape[1:])
    best = np.full(net.shape[1:], np.inf)
    for w in GRID:
        mix = w * net + (1.0 - w) * ridge
        mse = ((clip_to(mix, ranges) - y) ** 2).mean(axis=0)  # [H, T]
        better = mse < best  # strict: a tie keeps the earlier, larger share
        best_w, best = np.where(better, w, best_w), np.where(better, mse, best)
    return best_w


def ridge_in_raw_units(dm):
    """The report's ridge fit (:func:`~dwcp_lstm.evaluate.fit_ridge`) and its map in raw target units: weights
    [H * T, D] and intercepts [H * T], as :class:`~dwcp_lstm.model.RidgeBlend` takes them."""
    ridge, ts = fit_ridge(dm), dm.target_scaler
    n = dm.horizon * dm.n_targets
    scale = np.broadcast_to(ts.scale_, (n,))
    coef = ridge.model.coef_.reshape(n, -1) * scale[:, None]  # ridge predicts scaled targets
    intercept = np.broadcast_to(ridge.model.intercept_, (n,)) * scale + np.broadcast_to(ts.mean_, (n,))
    return ridge, coef, intercept


def fit_blend(module, dm) -> dict | None:
    """Fit the module's blend on the validation split (``module.blend``; None when ``blend_ridge`` is off or the
    split has fewer than :data:`MIN_WINDOWS` windows) and return what it chose (``module.blend_summary``): ``w``
    per target and step, and the validation RMSE per target (pooled over steps) of the network, ridge and the mix."""
    module.blend, module.blend_summary = None, None
    if not module.hparams.get("blend_ridge", True):
        return None
    starts = dm.starts["val"]
    if len(starts) < MIN_WINDOWS:
        log.warning("%d validation windows: too few to choose a mix with ridge (%d needed); the network alone",
                    len(starts), MIN_WINDOWS)  # fmt: skip
        return None
    ridge, coef, intercept = ridge_in_raw_units(dm)
    r = scaled_windows(dm, starts).reshape(len(starts), -1) @ coef.T + intercept  # [N, H * T] raw, as in the graph
    r = r.reshape(len(starts), dm.horizon, -1)  # [N, H, T]
    net = predict_raw(module, dm, "val", blend=False, clip=False)
    y, ranges = step_targets(dm, "val"), target_ranges(dm.targets)
    w = blend_weights(net, r, y, ranges)
    module.blend = RidgeBlend(w, coef, intercept).to(module.device)

    def rmse(p: np.ndarray) -> list[float]:
        return np.sqrt(((clip_to(p, ranges) - y) ** 2).mean(axis=(0, 1))).tolist()  # [T]

    mixed = w * net + (1.0 - w) * r
    module.blend_summary = {
        "weights": {t: w[:, j].tolist() for j, t in enumerate(dm.targets)},  # per step: the network's share
        "ridge_alpha": float(ridge.model.alpha_),
        "val_windows": len(starts),
        "val_rmse": {
            t: {"network": a, "ridge": b, "blend": c}
            for t, a, b, c in zip(dm.targets, rmse(net), rmse(r), rmse(mixed), strict=True)
        },
    }
    return module.blend_summary

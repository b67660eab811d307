"""How far a one-step forecast can get past the report's boosted trees on a run's own windows: the report's trees
(scikit-learn's HistGradientBoosting on the window's summaries, default settings), the same trees on every lag as
well with settings chosen on validation from a small grid, extremely randomised trees, a multilayer perceptron
and nearest neighbours on the lags, the mix of the run's exported forecast (the network mixed with ridge, as the
report judges it) with the best trees, the weight chosen on validation, and the least-squares stack of all of them
with non-negative weights fitted on validation itself (an optimistic ceiling: judged where it was fitted). RMSE of
the first target on validation and test, and each against the report's trees.

Not part of the package and not tested: the analysis behind docs/real_traces.md ("How the recipe was chosen").

    PYTHONPATH=. python docs/experiments/tree_ceiling.py lightning_logs/version_0
"""

from __future__ import annotations

import itertools
import sys

import numpy as np
from scipy.optimize import nnls
from sklearn.ensemble import ExtraTreesRegressor, HistGradientBoostingRegressor
from sklearn.neighbors import KNeighborsRegressor
from sklearn.neural_network import MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from dwcp_lstm import baselines as B
from dwcp_lstm import evaluate as E
from dwcp_lstm.runs import load_run


def rmse(p: np.ndarray, y: np.ndarray) -> float:
    return float(np.sqrt(np.mean((p - y) ** 2)))


def main(run: str) -> None:
    module, dm, _ = load_run(run)
    hist = {s: E.target_history(dm, dm.starts[s])[..., 0] for s in ("train", "val", "test")}  # [N, W]
    y = {s: E.step_targets(dm, s)[:, 0, 0] for s in ("train", "val", "test")}
    net = {s: E.predict_raw(module, dm, s)[:, 0, 0] for s in ("val", "test")}

    def summaries(h: np.ndarray) -> np.ndarray:
        return B.BoostingBaseline.features(h[..., None])

    def lags(h: np.ndarray) -> np.ndarray:
        return np.concatenate([h, summaries(h)], axis=1)

    def fit(features, model=None, **kw) -> dict:
        m = model if model is not None else HistGradientBoostingRegressor(random_state=0, **kw)
        m.fit(features(hist["train"]), y["train"])
        return {s: m.predict(features(hist[s])) for s in ("val", "test")}

    ref = fit(summaries, max_iter=200)
    base = {s: rmse(ref[s], y[s]) for s in ("val", "test")}

    def line(name: str, p: dict) -> None:
        v, t = rmse(p["val"], y["val"]), rmse(p["test"], y["test"])
        print(f"{name}: validation {v:.4f} ({100 * (v / base['val'] - 1):+.1f} %), test {t:.4f} "
              f"({100 * (t / base['test'] - 1):+.1f} %)", flush=True)  # fmt: skip

    line("the report's trees", ref)
    line("the run's forecast (network mixed with ridge)", net)
    best, best_val = None, np.inf
    grid = itertools.product([0.03, 0.1], [200, 800], [20, 200], [0.0, 1.0])
    for lr, it, leaf, l2 in grid:
        p = fit(lags, learning_rate=lr, max_iter=it, min_samples_leaf=leaf, l2_regularization=l2)
        line(f"trees on every lag, lr {lr}, {it} trees, {leaf} per leaf, l2 {l2}", p)
        if rmse(p["val"], y["val"]) < best_val:
            best, best_val = p, rmse(p["val"], y["val"])
    others = {
        "extremely randomised trees on every lag (300, 20 per leaf)": ExtraTreesRegressor(
            n_estimators=300, min_samples_leaf=20, max_features=0.5, n_jobs=2, random_state=0),
        "a perceptron on every lag (64, 32; early stopping)": make_pipeline(StandardScaler(), MLPRegressor(
            hidden_layer_sizes=(64, 32), early_stopping=True, random_state=0, max_iter=200)),
        "nearest neighbours on every lag (50, by distance)": make_pipeline(StandardScaler(), KNeighborsRegressor(
            n_neighbors=50, weights="distance")),
    }  # fmt: skip
    preds = [net, best]
    for name, model in others.items():
        preds.append(fit(lags, model))
        line(name, preds[-1])
    weights, _ = nnls(np.stack([p["val"] for p in preds], axis=1), y["val"])
    line(f"stack, weights {np.round(weights, 2).tolist()} (network, trees, the three above)",
         {s: np.stack([p[s] for p in preds], axis=1) @ weights for s in ("val", "test")})  # fmt: skip
    w_grid = np.linspace(0, 1, 21)
    w = w_grid[int(np.argmin([rmse(a * net["val"] + (1 - a) * best["val"], y["val"]) for a in w_grid]))]
    line(f"the run's forecast x {w:.2f} + the best trees (on validation) x {1 - w:.2f}",
         {s: w * net[s] + (1 - w) * best[s] for s in ("val", "test")})  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1])

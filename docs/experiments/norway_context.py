"""What Norway's session names add to the trees: each `series_id` names the vehicle and the route of its commute
(`bus.ljansbakken-oslo.2010-09-28_1407CEST`). The report's trees' settings on every lag and the window's summaries,
without and with the vehicle and the route as categorical inputs; validation and test RMSE on a run's windows.

Not part of the package and not tested: the analysis behind docs/real_traces.md ("How the recipe was chosen").

    PYTHONPATH=. python docs/experiments/norway_context.py lightning_logs/version_0
"""

from __future__ import annotations

import sys

import numpy as np
from sklearn.ensemble import HistGradientBoostingRegressor

from dwcp_lstm import baselines as B
from dwcp_lstm import evaluate as E
from dwcp_lstm.runs import load_run


def main(run: str) -> None:
    _, dm, _ = load_run(run)
    stages = ("train", "val", "test")
    hist = {s: E.target_history(dm, dm.starts[s])[..., 0] for s in stages}
    y = {s: E.step_targets(dm, s)[:, 0, 0] for s in stages}
    names = {s: dm.series_names(dm.target_rows(s)) for s in stages}
    parts = {s: np.array([n.split(".")[:2] for n in names[s]]) for s in stages}  # [N, 2]: vehicle, route
    codes = [sorted(set(parts["train"][:, i])) for i in range(2)]
    for label, extra in (("lags and summaries", 0), ("+ vehicle", 1), ("+ vehicle and route", 2)):

        def x(s: str, extra=extra) -> np.ndarray:
            cat = [[codes[i].index(v) if v in codes[i] else -1 for v in parts[s][:, i]] for i in range(extra)]
            lags = np.concatenate([hist[s], B.BoostingBaseline.features(hist[s][..., None])], axis=1)
            return np.concatenate([lags, np.array(cat, dtype=np.float64).T.reshape(len(lags), extra)], axis=1)

        cats = [x("train").shape[1] - extra + i for i in range(extra)] or None
        m = HistGradientBoostingRegressor(random_state=0, categorical_features=cats).fit(x("train"), y["train"])
        rmse = {s: float(np.sqrt(np.mean((m.predict(x(s)) - y[s]) ** 2))) for s in ("val", "test")}
        print(f"{label}: validation {rmse['val']:.4f}, test {rmse['test']:.4f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])

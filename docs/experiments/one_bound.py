"""The 90 % time from one bound of the mean over the whole transfer (the shortest span k whose constant-rate
pre-copy at that span's bound ends within k steps) against the package's pre-copy on the guaranteed-volume curve.

Not part of the package and not tested: the analysis behind docs/planning.md, "What is not solved".

    PYTHONPATH=. python docs/experiments/one_bound.py lightning_logs/version_0
"""

from __future__ import annotations

import sys

import numpy as np
from _backtest_inputs import backtest_inputs, coverage

from dwcp_lstm import planner as P


def main(run: str) -> None:
    x = backtest_inputs(run)
    f = np.clip(x.forecast, 0.0, None)
    h = f.shape[1]
    point = np.cumsum(f, axis=1) / np.arange(1, h + 1)
    held = np.repeat(point[:, -1:], x.tail_lower.shape[1], axis=1)
    bounds = np.minimum(np.concatenate([x.mean_lower, x.tail_lower], 1), np.concatenate([point, held], 1))
    none = np.empty((len(f), 0))
    for d in x.dirty:
        for s in x.sizes:
            m = P.Migration(s, d)
            curve = P.plan_arrays(x.forecast, x.mean_lower, x.step_s, m, x.tail_lower)["time_confident_s"]
            one = np.full(len(f), np.inf)
            for k in range(1, bounds.shape[1] + 1):
                t = P.precopy(none, np.clip(bounds[:, k - 1], 0.0, None), x.step_s, m)["time_s"]
                fits = np.isinf(one) & (t <= k * x.step_s)
                one[fits] = t[fits]
            rest = np.isinf(one)  # past the calibrated spans: the last bound held, as the package does
            one[rest] = P.precopy(none[rest], np.clip(bounds[rest, -1], 0.0, None), x.step_s[rest], m)["time_s"]
            print(f"{s:g} GiB, dirty {d:g} Mbit/s: curve {coverage(x, m, curve)[0]:.1f} %, "
                  f"one bound {coverage(x, m, one)[0]:.1f} %")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1])

"""The planner's static coverage per size, split by where the confident time falls (in steps k*: within the
horizon, then 1-2, 2-4, 4-8 and past 8 horizons), and the share of plans without a time.

Not part of the package and not tested: the analysis behind docs/planning.md, "What is not solved".

    PYTHONPATH=. python docs/experiments/plan_breakdown.py lightning_logs/version_0
"""

from __future__ import annotations

import sys

import numpy as np
from _backtest_inputs import backtest_inputs, coverage

from dwcp_lstm import planner as P


def main(run: str) -> None:
    x = backtest_inputs(run)
    h = x.forecast.shape[1]
    for d in x.dirty:
        for s in x.sizes:
            m = P.Migration(s, d)
            t = P.plan_arrays(x.forecast, x.mean_lower, x.step_s, m, x.tail_lower)["time_confident_s"]
            k = np.ceil(t / x.step_s)
            parts = [f"all {coverage(x, m, t)[0]:.1f} %", f"no time {100 * np.mean(~np.isfinite(t)):.1f} %"]
            for a, b in ((0, h), (h, 2 * h), (2 * h, 4 * h), (4 * h, 8 * h), (8 * h, np.inf)):
                c, n = coverage(x, m, t, (k > a) & (k <= b))
                parts.append(f"k* in ({a:g}, {b:g}]: {c:.1f} % of {n}")
            print(f"{s:g} GiB, dirty {d:g} Mbit/s: " + " | ".join(parts))


if __name__ == "__main__":
    main(sys.argv[1])

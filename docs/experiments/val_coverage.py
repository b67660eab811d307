"""The planner's 90 % coverage per size on the validation split (where the bounds were calibrated) beside the
test split's: whether a miss on test is the calibration's conditional error (then validation misses alike, and a
calibration of the time itself on validation would mend it) or a shift between the two splits (then it would not).

Not part of the package and not tested: the analysis behind docs/planning.md, "What is not solved".

    PYTHONPATH=. python docs/experiments/val_coverage.py lightning_logs/version_0
"""

from __future__ import annotations

import sys

import numpy as np
from _backtest_inputs import backtest_inputs, coverage

from dwcp_lstm import planner as P


def main(run: str) -> None:
    both = {stage: backtest_inputs(run, stage=stage) for stage in ("val", "test")}
    x = both["test"]
    for d in x.dirty:
        for s in x.sizes:
            m = P.Migration(s, d)
            line = []
            for stage, y in both.items():
                t = P.plan_arrays(y.forecast, y.mean_lower, y.step_s, m, y.tail_lower)["time_confident_s"]
                c, n = coverage(y, m, t)
                line.append(f"{stage} {c:.1f} % of {n} (no time {100 * np.mean(~np.isfinite(t)):.0f} %)")
            print(f"{s:g} GiB, dirty {d:g} Mbit/s: " + ", ".join(line))


if __name__ == "__main__":
    main(sys.argv[1])

"""The confident time calibrated on validation migrations: for each size and dirty rate of the backtest's ladder,
the margin multiplier (planner.scale_needed) that the confidence-level share of the validation migrations needed,
applied to the test split's plans; the planner's 90 % coverage per size against the package's.

Not part of the package and not tested: the analysis behind docs/planning.md, "What is not solved".

    PYTHONPATH=. python docs/experiments/time_calibration.py lightning_logs/version_0
"""

from __future__ import annotations

import sys

import numpy as np
from _backtest_inputs import backtest_inputs, coverage

from dwcp_lstm import planner as P


def multiplier(x, m: P.Migration, confidence: float = 0.9) -> tuple[float, int]:
    """The conformal quantile of the multiplier each timed validation migration needed (censored ones: what they
    needed for the time they were seen, a lower bound), and how many there were."""
    args = (x.forecast, x.mean_lower, x.step_s, m, x.tail_lower)
    t_real = P.precopy(x.real, np.full(len(x.real), np.nan), x.step_s, m)["time_s"]
    timed = np.isfinite(P.plan_arrays(*args[:4], x.tail_lower)["time_confident_s"])
    use = timed & (np.isfinite(t_real) | (x.seen > 0))
    need = P.scale_needed(*(a[use] if isinstance(a, np.ndarray) else a for a in args),
                          np.where(np.isfinite(t_real), t_real, x.seen)[use])  # fmt: skip
    n = len(need)
    rank = min(int(np.ceil((n + 1) * confidence)), n) - 1
    return float(np.sort(need)[rank]), n


def main(run: str) -> None:
    val, test = backtest_inputs(run, stage="val"), backtest_inputs(run)
    for d in test.dirty:
        for s in test.sizes:
            m = P.Migration(s, d)
            k, n = multiplier(val, m)
            args = (test.forecast, test.mean_lower, test.step_s, m, test.tail_lower)
            one = P.confident_time(*args, np.ones(len(test.forecast)))
            # a plan without a time at the calibrated margin keeps its statement: the multiplier was read on
            # the timed plans only, and below 1 it would give a time to plans the bound says nothing of
            cal = np.where(np.isfinite(one), P.confident_time(*args, np.full(len(test.forecast), k)), np.inf)
            untimed = 100 * np.mean(~np.isfinite(cal))
            print(
                f"{s:g} GiB, dirty {d:g} Mbit/s: package {coverage(test, m, one)[0]:.1f} %, x{k:.3f} (from {n} "
                f"validation migrations) {coverage(test, m, cal)[0]:.1f} % (no time {untimed:.0f} %)"
            )


if __name__ == "__main__":
    main(sys.argv[1])

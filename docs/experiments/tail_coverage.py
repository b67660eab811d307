"""One-sided coverage of the lower bound of the mean over the next k steps, per k, on a run's test split.

Not part of the package and not tested: the analysis behind docs/planning.md, "What is not solved". The planner's
confident time comes from the lower bound of the mean throughput over the transfer (the first target's, at the
first level's lower bound: the 80 % interval's, a 90 % one-sided bound): within the horizon the graph's
``mean_lower``, beyond it the tail calibration (``intervals.calibrate_tail``). This prints, for spans k of 1 to
8 x H steps, the share of test windows whose realised mean over the next k rows is at or above that bound (90 %
is nominal) and how many windows have k rows left.

    PYTHONPATH=. python docs/experiments/tail_coverage.py lightning_logs/version_0
"""

from __future__ import annotations

import sys

import numpy as np

from dwcp_lstm import baselines as B
from dwcp_lstm import evaluate as E
from dwcp_lstm import intervals as I
from dwcp_lstm.runs import load_run
from dwcp_lstm.tables import target_ranges


def main(run: str) -> None:
    module, dm, _ = load_run(run)
    cal, _ = E.calibration_of(module, dm, E.validation_inputs(module, dm))
    if cal is None or cal.tail_lo is None:
        sys.exit(f"error: {run}: no interval calibration beyond the horizon")
    pick = B._even_subset(len(dm.starts["test"]), 50_000)  # as the report picks them
    pred = E.predict_raw(module, dm, "test")[pick]
    b = I.intervals(cal, pred, E.target_history(dm, dm.starts["test"])[pick], target_ranges(dm.targets))
    lower = np.concatenate([b["mean_lower"][:, 0, :, 0], b["tail_lower"][:, 0, :, 0]], axis=1)  # [n, K]
    y = E.tail_targets(dm, "test", pick)[..., 0]  # [n, K]: NaN past the split
    realised = np.cumsum(y, axis=1) / np.arange(1, y.shape[1] + 1)
    h = pred.shape[1]
    print(f"{run}: {dm.targets[0]}, horizon {h}, one-sided coverage of the {100 * cal.levels[0]:g} % lower bound")
    for k in sorted({1, h, h + 1, *range(2 * h, lower.shape[1] + 1, h)}):
        ok = ~np.isnan(realised[:, k - 1])
        print(f"  k = {k:3d}: {100 * np.mean(realised[ok, k - 1] >= lower[ok, k - 1]):.1f} % of {ok.sum()} windows")


if __name__ == "__main__":
    main(sys.argv[1])

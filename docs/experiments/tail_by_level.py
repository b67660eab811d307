"""One-sided coverage of the lower bound of the mean over k steps (within the horizon the graph's, beyond it the
tail capped at the held mean, as the planner reads them), by fifths of the bound's level, on a run's test split.

Not part of the package and not tested: the analysis behind docs/planning.md, "What is not solved".

    PYTHONPATH=. python docs/experiments/tail_by_level.py lightning_logs/version_0
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
    pick = B._even_subset(len(dm.starts["test"]), 50_000)
    pred = E.predict_raw(module, dm, "test")[pick]
    b = I.intervals(cal, pred, E.target_history(dm, dm.starts["test"])[pick], target_ranges(dm.targets))
    held = np.clip(pred[:, :, 0], 0.0, None).mean(axis=1)
    tail = np.minimum(b["tail_lower"][:, 0, :, 0], held[:, None])
    lower = np.concatenate([b["mean_lower"][:, 0, :, 0], tail], axis=1)  # [n, K]
    y = E.tail_targets(dm, "test", pick)[..., 0]
    realised = np.cumsum(y, axis=1) / np.arange(1, y.shape[1] + 1)
    h = pred.shape[1]
    for k in (h, 2 * h, 4 * h, 8 * h):
        ok = ~np.isnan(realised[:, k - 1])
        bound, mean = lower[ok, k - 1], realised[ok, k - 1]
        edges = np.quantile(bound, np.linspace(0, 1, 6))
        parts = [f"[{a:.3g}, {c:.3g}] {100 * np.mean(mean[m] >= bound[m]):.0f} %"
                 for a, c in zip(edges[:-1], edges[1:], strict=True)
                 for m in [(bound >= a) & (bound <= c)]]  # fmt: skip
        print(f"k = {k}: all {100 * np.mean(mean >= bound):.1f} % | " + " | ".join(parts))


if __name__ == "__main__":
    main(sys.argv[1])

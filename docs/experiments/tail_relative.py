"""The tail beyond the horizon scaled by its centre instead of the window's spread: the residual of the realised
mean over k steps is read relative to the centre line's level, (mean - centre) / max(centre, floor), one lower
quantile per span as the package computes it; the planner's 90 % coverage per size against the package's tail.

Not part of the package and not tested: the analysis behind docs/planning.md, "What is not solved".

    PYTHONPATH=. python docs/experiments/tail_relative.py lightning_logs/version_0 [MIX]

MIX in [0, 1] blends the two scales: MIX x the centre's level + (1 - MIX) x the window's spread (1: the centre's).
"""

from __future__ import annotations

import sys

import numpy as np
from _backtest_inputs import backtest_inputs, compare_tail

from dwcp_lstm import baselines as B
from dwcp_lstm import evaluate as E
from dwcp_lstm import intervals as I
from dwcp_lstm.tables import target_ranges


def _scale(at: np.ndarray, window: np.ndarray, mix: float, floor: float) -> np.ndarray:
    return mix * np.maximum(at, floor) + (1 - mix) * window


def relative(x, mix: float) -> np.ndarray:
    """The tail's lower bounds [N, K - H] with the scale ``mix`` x centre + (1 - mix) x the window's spread."""
    dm, val, cal, j, li = x.dm, x.val, x.cal, x.j, x.li
    pick = B._even_subset(len(val["y"]), 50_000)
    pred, hist = val["pred"][pick][..., j], val["hist"][pick]
    y_long = E.tail_targets(dm, "val", pick)[..., j]
    held, window = pred.mean(axis=1), cal.scale(hist)[:, 0, j]
    low = target_ranges(dm.targets)[0, j : j + 1]
    floor = 0.05 * float(np.mean(held))  # a centre near zero would make any residual infinite
    running = np.cumsum(y_long, axis=1) / np.arange(1, y_long.shape[1] + 1)
    h, spans = pred.shape[1], cal.tail_lo.shape[1]
    lo = np.zeros(spans)
    for i in range(spans):
        ok = ~np.isnan(running[:, h + i])
        a, b = cal.tail_centre[i, :, j]
        at = a + b * held[ok]
        sc = _scale(at, window[ok], mix, floor)
        r = (running[ok, h + i] - at) / sc
        s = I._edge_scores(r[:, None, None], running[ok, h + i][:, None, None], None)
        q, _ = I._quantiles(*s, levels=[cal.levels[li]])
        lo[i] = I._selective_lower(s[0], at[:, None, None], sc[:, None, None], low, q, [cal.levels[li]])[0, 0, 0]
    centre = I.tail_centre(x.forecast.mean(axis=1)[:, None], cal.tail_centre[:, :, j : j + 1])[..., 0]  # [N, K-H]
    sc = _scale(centre, cal.scale(x.hist)[:, 0, j][:, None], mix, floor)
    return np.maximum(centre + sc * lo[None, :], low[0])


def main(run: str, mix: float) -> None:
    x = backtest_inputs(run)
    tail = relative(x, mix)
    compare_tail(x, tail, "package", f"mix {mix:g}")


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 1.0)

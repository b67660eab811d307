"""The tail beyond the horizon calibrated per bin of the held forecast mean (Mondrian conformal, Bostrom and
Johansson 2020): the centre line as the package fits it, one lower quantile per span and per quantile bin of the
held mean on validation; the planner's 90 % coverage per size against the package's single quantile per span.

Not part of the package and not tested: the analysis behind docs/planning.md, "What is not solved".

    PYTHONPATH=. python docs/experiments/tail_mondrian.py lightning_logs/version_0 5 [timed] [pool] [snr]
"""

from __future__ import annotations

import sys

import numpy as np
from _backtest_inputs import backtest_inputs, compare_tail

from dwcp_lstm import baselines as B
from dwcp_lstm import evaluate as E
from dwcp_lstm import intervals as I
from dwcp_lstm.tables import target_ranges


def mondrian(x, bins: int, timed: bool = False, pool: bool = False, snr: bool = False) -> np.ndarray:
    """The tail's lower bounds [N, K - H] with one quantile per span and bin of the held mean; ``timed``: the bins'
    edges are the quantiles among the windows whose package bound at the first span lies above the range's edge
    (those that give a time), not among all (Irish: most held means are an idle client's, near 0). ``pool``: the
    training windows' residuals join validation's (past the horizon the network never saw the rows it is judged
    on, though the first H of the mean are its training targets). ``snr``: the bins are of the held mean over the
    window's scale (how many scales above zero a link runs), not of the held mean."""
    dm, val, cal, j, li = x.dm, x.val, x.cal, x.j, x.li
    pick = B._even_subset(len(val["y"]), 50_000)
    pred, hist = val["pred"][pick][..., j], val["hist"][pick]
    y_long = E.tail_targets(dm, "val", pick)[..., j]
    if pool:
        tp = B._even_subset(len(dm.starts["train"]), 100_000)
        pred = np.concatenate([pred, E.predict_raw(x.module, dm, "train")[tp][..., j]])
        hist = np.concatenate([hist, E.target_history(dm, dm.starts["train"])[tp]])
        y_long = np.concatenate([y_long, E.tail_targets(dm, "train", tp)[..., j]])
    held, scale = pred.mean(axis=1), cal.scale(hist)[:, 0, j]
    low = target_ranges(dm.targets)[0, j : j + 1]
    first = I.tail_centre(held[:, None], cal.tail_centre[:1, :, j : j + 1])[:, 0, 0] + scale * cal.tail_lo[li, 0, j]
    key = held / scale if snr else held
    among = key[first > low[0]] if timed and (first > low[0]).sum() >= bins else key
    edges = np.quantile(among, np.linspace(0, 1, bins + 1)[1:-1])
    running = np.cumsum(y_long, axis=1) / np.arange(1, y_long.shape[1] + 1)
    h, spans = pred.shape[1], cal.tail_lo.shape[1]
    lo = np.zeros((spans, bins))
    for i in range(spans):
        ok = ~np.isnan(running[:, h + i])
        a, b = cal.tail_centre[i, :, j]
        at = a + b * held[ok]
        r = (running[ok, h + i] - at) / scale[ok]
        which = np.searchsorted(edges, key[ok], side="right")
        for g in range(bins):
            m = which == g
            s = I._edge_scores(r[m][:, None, None], running[ok, h + i][m][:, None, None], None)
            q, _ = I._quantiles(*s, levels=[cal.levels[li]])
            lo[i, g] = I._selective_lower(s[0], at[m][:, None, None], scale[ok][m][:, None, None], low, q,
                                          [cal.levels[li]])[0, 0, 0]  # fmt: skip
    test_held = x.forecast.mean(axis=1)
    centre = I.tail_centre(x.forecast.mean(axis=1)[:, None], cal.tail_centre[:, :, j : j + 1])[..., 0]
    test_scale = cal.scale(x.hist)[:, 0, j]
    which = np.searchsorted(edges, test_held / test_scale if snr else test_held, side="right")
    return np.maximum(centre + test_scale[:, None] * lo[:, which].T, low[0])


def main(run: str, bins: int, timed: bool, pool: bool, snr: bool) -> None:
    x = backtest_inputs(run)
    tail = mondrian(x, bins, timed, pool, snr)
    compare_tail(x, tail, "one quantile", "per bin")


if __name__ == "__main__":
    flags = (f in sys.argv[3:] for f in ("timed", "pool", "snr"))
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 5, *flags)

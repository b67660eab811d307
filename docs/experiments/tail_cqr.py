"""The tail beyond the horizon as a conformalized quantile regression (Romano, Patterson and Candes, NeurIPS 2019):
per span k, a linear regression of the lower quantile of the realised mean over k steps on 1, the held forecast
mean and the window's scale, fitted on validation, then shifted by the conformal quantile of its residuals among the
windows whose bound lies above the range's edge (as the package's tail); the planner's 90 % coverage per size
against the package's tail (a centre line and one quantile of residual / scale per span).

Not part of the package and not tested: the analysis behind docs/planning.md, "What is not solved".

    PYTHONPATH=.:docs/experiments python docs/experiments/tail_cqr.py lightning_logs/version_0 [split] [log | both]
    PYTHONPATH=.:docs/experiments python docs/experiments/tail_cqr.py lightning_logs/version_0 select [log]
    PYTHONPATH=.:docs/experiments python docs/experiments/tail_cqr.py lightning_logs/version_0 blend

``select``: both tails calibrated on the earlier half of each link's validation windows, judged on the later half.
``blend``: the average of the package's bound and the log regression's, conformalized again (the package version,
with a choice between it and the line, is ``tail_blend.patch``).

``split``: the regression is fitted on the earlier half of each link's validation windows and conformalized on the
later half (split conformal proper); without it both use every validation window. ``log``: the features are the logs
of the held mean and the scale (floored at 5 % of their means); ``both``: the two and their logs.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
from _backtest_inputs import backtest_inputs, compare_tail

from dwcp_lstm import baselines as B
from dwcp_lstm import evaluate as E
from dwcp_lstm import intervals as I
from dwcp_lstm.tables import target_ranges


def features(held: np.ndarray, scale: np.ndarray, floors: tuple[float, float] | None, both: bool = False) -> np.ndarray:
    """[n] held means and scales -> [n, 3] regressors (1, held, scale), their logs with ``floors``; ``both``: [n, 5],
    the two and their logs."""
    cols = [np.ones_like(held)]
    if floors is None or both:
        cols += [held, scale]
    if floors is not None:
        cols += [np.log(np.maximum(held, floors[0])), np.log(np.maximum(scale, floors[1]))]
    return np.stack(cols, axis=1)


def floors_of(held: np.ndarray, scale: np.ndarray) -> tuple[float, float]:
    """The logs' floors: 5 % of the windows' mean held mean and scale."""
    return 0.05 * float(np.mean(np.abs(held))) + 1e-9, 0.05 * float(np.mean(scale)) + 1e-9


def validation_tail(x) -> SimpleNamespace:
    """The run's validation windows as the package's tail calibration reads them (at most 50,000, evenly spaced):
    forecasts [n, H, T], histories, the realised means over k = 1 .. K of the throughput [n, K], its held means and
    scales [n], each window's link, the level of the 90 % plan and the range's lower edge [1]."""
    dm, val, cal, j = x.dm, x.val, x.cal, x.j
    pick = B._even_subset(len(val["y"]), 50_000)
    pred, hist, y_all = val["pred"][pick], val["hist"][pick], E.tail_targets(dm, "val", pick)
    return SimpleNamespace(
        pred=pred, hist=hist, y_all=y_all, held=pred[..., j].mean(axis=1), scale=cal.scale(hist)[:, 0, j],
        running=np.cumsum(y_all[..., j], axis=1) / np.arange(1, y_all.shape[1] + 1), groups=val["segment"][pick],
        h=pred.shape[1], level=cal.levels[x.li], low=target_ranges(dm.targets)[0, j : j + 1],
    )  # fmt: skip


def lower_shift(y: np.ndarray, q: np.ndarray, level: float, low: np.ndarray) -> float:
    """What to add to lower bounds ``q`` [n] of ``y`` [n] so that they miss (1 - level) / 2 of the windows whose bound
    lies above the range's edge ``low`` (as the package's tail: ``intervals._selective_lower``)."""
    s = I._edge_scores((y - q)[:, None, None], y[:, None, None], None)
    lo, _ = I._quantiles(*s, levels=[level])
    return float(I._selective_lower(s[0], q[:, None, None], np.ones((1, 1, 1)), low, lo, [level])[0, 0, 0])


def cqr_tail(x, split: bool, log: bool, both: bool = False) -> np.ndarray:
    """The tail's lower bounds [N, K - H] on the run's test windows, as described above."""
    v = validation_tail(x)
    floors = floors_of(v.held, v.scale) if log or both else None
    feats = features(v.held, v.scale, floors, both)
    fit_on = I.earlier_half(v.groups) if split else np.ones(len(v.held), bool)
    spans = x.cal.tail_lo.shape[1]
    coef, shift = cqr_fit(feats, v.running, v.h, spans, fit_on, ~fit_on if split else fit_on, v.level, v.low)
    test = features(x.forecast.mean(axis=1), x.cal.scale(x.hist)[:, 0, x.j], floors, both)
    return np.maximum(test @ coef.T + shift[None], v.low[0])


def cqr_fit(
    feats: np.ndarray, running: np.ndarray, h: int, spans: int, fit: np.ndarray, conf: np.ndarray, level: float,
    low: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Per span k = H + 1 .. H + ``spans``: the lower quantile regression's coefficients [spans, p] on the ``fit``
    windows (``feats`` [n, p], ``running`` [n, K] realised means) and its conformal shift [spans] among the ``conf``
    windows' plans with a time (NaN from the first span with fewer than 20 windows of either)."""
    coef, shift = np.zeros((spans, feats.shape[1])), np.full(spans, np.nan)
    for i in range(spans):
        ok = ~np.isnan(running[:, h + i])
        f, c = ok & fit, ok & conf
        if f.sum() < 20 or c.sum() < 20:
            break
        y = running[:, h + i]
        coef[i] = I.quantile_regression(feats[f][None], y[f][None], np.array([(1 - level) / 2]))[0]
        shift[i] = lower_shift(y[c], feats[c] @ coef[i], level, low)
    return coef, shift


def select(x, log: bool) -> None:
    """Both tails calibrated on the earlier half of each link's validation windows, judged on the later half: the
    pinball loss of the lower bound (at its tail's level) and its one-sided coverage, over the spans both reach."""
    v, j, li = validation_tail(x), x.j, x.li
    early, ranges, tau = I.earlier_half(v.groups), target_ranges(x.dm.targets), (1 - v.level) / 2
    half = I.calibrate_tail(x.cal, v.pred[early], v.y_all[early], v.hist[early], ranges)
    pkg = I.intervals(half, v.pred[~early], v.hist[~early], ranges)["tail_lower"][:, li, :, j]  # [n late, spans]
    feats = features(v.held, v.scale, floors_of(v.held[early], v.scale[early]) if log else None)
    h, running, spans = v.h, v.running, min(pkg.shape[1], x.cal.tail_lo.shape[1])
    coef, shift = cqr_fit(feats, running, h, spans, early, early, v.level, v.low)
    cqr = np.maximum(feats[~early] @ coef.T + shift[None], v.low[0])
    for name, b in (("package", pkg), ("CQR", cqr)):
        loss, cov = [], []
        for i in range(spans):
            y = running[~early, h + i]
            ok = ~np.isnan(y) & np.isfinite(b[:, i])
            if ok.sum() < 20:
                break
            d = y[ok] - b[ok, i]
            loss.append(np.mean(np.maximum(tau * d, (tau - 1) * d)))
            cov.append(np.mean(d >= 0))
        print(f"{name}: pinball {np.mean(loss):.5f}, one-sided coverage {100 * np.mean(cov):.1f} % "
              f"(spans {len(loss)}; by span {100 * min(cov):.1f}-{100 * max(cov):.1f} %)")  # fmt: skip


def blend_tail(x) -> np.ndarray:
    """The tail's lower bounds [N, K - H] on the test windows: per span, the average of the package's bound and the
    log regression's (both before clipping at the range's edge), shifted by the conformal quantile of the
    validation windows' residuals against that average among the plans that give a time (quantile averaging,
    then conformalized again so that the average keeps the level)."""
    v, cal, j, li = validation_tail(x), x.cal, x.j, x.li
    floors = floors_of(v.held, v.scale)
    feats, spans, every = features(v.held, v.scale, floors), cal.tail_lo.shape[1], np.ones(len(v.held), bool)
    coef, shift = cqr_fit(feats, v.running, v.h, spans, every, every, v.level, v.low)
    own = I.intervals(cal, v.pred, v.hist)["tail_lower"][:, li, :, j]  # [n, spans], unclipped
    avg = (own + feats @ coef.T + shift[None]) / 2
    extra = np.zeros(spans)
    for i in range(spans):
        ok = ~np.isnan(v.running[:, v.h + i])
        extra[i] = lower_shift(v.running[ok, v.h + i], avg[ok, i], v.level, v.low)
    test_feats = features(x.forecast.mean(axis=1), cal.scale(x.hist)[:, 0, j], floors)
    test_own = I.intervals(cal, x.pred, x.hist)["tail_lower"][:, li, :, j]
    return np.maximum((test_own + test_feats @ coef.T + shift[None]) / 2 + extra[None], v.low[0])


def main(run: str, split: bool, log: bool, both: bool) -> None:
    x = backtest_inputs(run)
    compare_tail(x, cqr_tail(x, split, log, both), "package tail", "CQR tail")


if __name__ == "__main__":
    if "blend" in sys.argv[2:]:
        x = backtest_inputs(sys.argv[1])
        compare_tail(x, blend_tail(x), "package tail", "blend")
        sys.exit()
    if "select" in sys.argv[2:]:
        select(backtest_inputs(sys.argv[1]), "log" in sys.argv[2:])
        sys.exit()
    main(sys.argv[1], *(f in sys.argv[2:] for f in ("split", "log", "both")))

"""Online recalibration of intervals from realised errors (numpy only, no torch).

Split conformal bounds (:mod:`dwcp_lstm.intervals`) assume that the months after validation look like validation.
When a link's volatility drifts they do not: on the default data's 12-step run the validation period was the more
volatile one and the 80 % bounds covered 83-87 % of test windows for RTT, loss and jitter, one link only 71 %.
A deployed forecaster sees each outcome a few steps later, so it can correct itself, as adaptive conformal
inference does (Gibbs & Candes, NeurIPS 2021) in its quantile-tracking form (Angelopoulos, Candes & Tibshirani,
"Conformal PID Control for Time Series Prediction", NeurIPS 2023): each link keeps a multiplier ``s`` on the width of
its calibrated interval and, as each outcome is realised,

    log s  +=  rate x (miss - alpha)          (miss: 1 if the outcome fell outside the interval issued with s)

A miss widens, a hit narrows. Summed over any n outcomes the miss rate differs from ``alpha`` by at most
``|log s_end - log s_start| / (rate x n)``: long-run coverage holds under any drift, without exchangeability. An
outcome is used only once it is known (the h-step error of a window when the row it forecast has arrived, a
migration's miss once its promised time has passed, its hit when it ends), so nothing reads the future. One rate
for every target, level and source: :data:`RATE`, fixed before the test figures were looked at on real traces
(docs/method.md, "Online recalibration").

The interval is scaled about its forecast (each side's distance from it times ``s``; about its midpoint where a
physical edge left the forecast outside it, :func:`centre_of`), so a narrowed interval never leaves its forecast
out, and the bounds of the levels are then nested (the 95 % interval holds the 80 % one): scaled about its midpoint
with a multiplier of its own per level, a lopsided interval narrowed past its forecast, and a 95 % bound crossed the
80 % one (found by fuzzing).
"""

from __future__ import annotations

import heapq

import numpy as np

RATE = 0.1  # step of log s per outcome: a miss at 80 % widens by e^0.08 (8 %), a hit narrows by e^-0.02
LOG_LIMIT = np.log(1e3)  # s stays in [1e-3, 1e3]: a run of impossible outcomes must not overflow


def centre_of(forecast: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """The point each interval is scaled about: its forecast, or its midpoint where a physical edge left the
    forecast outside it (a loss rate forecast at 0.0005 whose 80 % interval is [0, 0.0004]: scaled about a bound,
    the other side could never widen)."""
    inside = (lower <= forecast) & (forecast <= upper)
    return np.where(inside, forecast, (lower + upper) / 2)


def needed_scale(y: np.ndarray, lower: np.ndarray, upper: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """The smallest multiplier ``s >= 0`` of each side's distance from ``centre`` (:func:`centre_of`) for which
    the interval covers ``y`` (0 at the centre, inf when the side ``y`` lies on has no width); same shapes."""
    d = y - centre
    side = np.where(d >= 0, upper - centre, centre - lower)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d == 0, 0.0, np.where(side > 0, np.abs(d) / side, np.inf))


def rescale(lower: np.ndarray, upper: np.ndarray, s: np.ndarray, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The interval with each side's distance from ``centre`` multiplied by ``s``."""
    return centre - s * (centre - lower), centre + s * (upper - centre)


def nested(
    lower: np.ndarray, upper: np.ndarray, levels: np.ndarray | list[float], axis: int
) -> tuple[np.ndarray, np.ndarray]:
    """Bounds whose intervals hold those of every lower level (``levels`` along ``axis``): each level's lower
    bound is the least of its own and those of the levels below it, its upper bound the greatest. Per-level
    multipliers can cross a 95 % bound inside the 80 % one; this only ever widens the higher level."""
    order = np.argsort(np.asarray(levels), kind="stable")
    back = np.argsort(order)
    lo = np.minimum.accumulate(np.take(lower, order, axis=axis), axis=axis)
    hi = np.maximum.accumulate(np.take(upper, order, axis=axis), axis=axis)
    return np.take(lo, back, axis=axis), np.take(hi, back, axis=axis)


def delayed_rate(rate: float, issued: np.ndarray, known: np.ndarray, horizon: int) -> np.ndarray:
    """The step of each outcome [n]: ``rate`` while it arrives within ``horizon`` rows of its forecast, ``rate x
    horizon / delay`` when later. A link has about ``delay`` forecasts outstanding at once, each judged against a
    multiplier that had not yet heard of the others' outcomes; at the full rate a run of long misses (a 1 TiB
    migration lasts four hours) arrives all together and overshoots, so the multiplier swung from over- to
    under-covering (the backtest's 1 TiB evacuation: 83.9 % by the 90 % time, 90.6 % so damped). Outcomes within
    the horizon, every one the interval tracker sees, keep the rate the intervals were checked with."""
    delay = np.maximum(np.asarray(known, np.float64) - np.asarray(issued, np.float64), 1.0)
    return rate * np.minimum(1.0, horizon / delay)


def track(
    needed: np.ndarray, issued: np.ndarray, known: np.ndarray, groups: np.ndarray, alpha: np.ndarray | float,
    rate: np.ndarray | float = RATE,
) -> np.ndarray:  # fmt: skip
    """Multipliers ``s`` [n, K] for n forecasts in K columns (levels, steps, targets flattened by the caller).

    ``needed`` [n, K]: the multiplier each forecast needed to cover its outcome (:func:`needed_scale`; NaN where
    the outcome never arrives); ``issued`` [n]: when the forecast was made; ``known`` [n] (or [n, K]): from when
    its outcome is known, on the same clock (rows of its series), ``known > issued``; ``groups`` [n]: one multiplier
    per group (a link), carried over gaps; ``alpha`` [K] or one number: the nominal miss rate of each column;
    ``rate`` one number or [n]: the step of each outcome. The forecast issued at ``t`` uses every outcome of its
    group known by ``t``, each judged against the multiplier its own forecast was issued with. (Migrations, whose
    misses are known before they end, have :func:`track_promises`.)"""
    needed = np.asarray(needed, np.float64)
    n, k = needed.shape
    known = np.broadcast_to(np.asarray(known), (k, n)).T if np.ndim(known) == 1 else np.asarray(known)
    known = np.where(np.isnan(needed), np.inf, known)  # no realised outcome (past the data): never applied
    if np.any(known <= np.asarray(issued)[:, None]):
        raise ValueError("an outcome must become known after its forecast was issued")
    alpha = np.broadcast_to(np.asarray(alpha, np.float64), (k,))
    rate = np.broadcast_to(np.asarray(rate, np.float64), (n,))
    s = np.ones((n, k))
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        _track_group(needed, s, idx[np.argsort(issued[idx], kind="stable")], issued, known, alpha, rate)
    return s


def track_promises(
    needed: np.ndarray, issued: np.ndarray, ended: np.ndarray, groups: np.ndarray, alpha: float, horizon: int,
    promised: np.ndarray, grid: np.ndarray, rate: float = RATE, censored: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Multipliers ``s`` [n] for n promises of a time (a migration done by its confident time), tracked like
    :func:`track` with one column, but a miss is learnt as soon as it is certain: once the time promised with the
    multiplier the forecast was issued with has passed, not only when the migration ends. A migration waiting
    for a bursty link's next burst ends long after its promise, and learnt only then, every forecast of the idle
    stretch went out with the old margin (Irish: 78 % online coverage for 90 %).

    ``needed`` [n]: the multiplier each promise needed (:func:`~dwcp_lstm.planner.scale_needed`; NaN: never known);
    ``ended`` [n]: the row from which its end is known (``inf``: never); ``promised`` [n, G]: the row by which the
    time promised at multiplier ``grid[g]`` (ascending) has passed, ``inf`` where it never does. The promise made
    with ``s`` is read at the smallest grid value >= ``s`` (a promise is non-decreasing in ``s``, so a miss is
    never used before it is certain; beyond the grid, only from its end). A miss is used from that row, or from
    its end if that comes first; a hit only from its end. ``censored`` [n]: migrations seen only in part, whose
    hits are never known. A plan that gave no time (``promised`` inf at its multiplier: a bound at 0) promised
    nothing and teaches nothing: the margin is learnt, as the backtest judges it, on the plans that give a time
    (learnt as hits until 2026-12-02, they let the margin shrink where the plans that did give one missed). Each
    outcome's step is ``rate`` damped by the length of its promise (:func:`delayed_rate`), the same for a hit and
    a miss: damped by when each is learnt, the misses (learnt later) weighed less and coverage settled low.
    Also returns the row from which each outcome was used [n] (``inf``: never)."""
    censored = np.zeros(len(needed), bool) if censored is None else np.asarray(censored, bool)
    s, learnt = np.ones(len(needed)), np.full(len(needed), np.inf)
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        queue: list[tuple[float, int, float]] = []  # (row known, index, log step) of outcomes still to arrive
        log_s = 0.0
        for i in idx[np.argsort(issued[idx], kind="stable")]:
            while queue and queue[0][0] <= issued[i]:
                log_s = float(np.clip(log_s + heapq.heappop(queue)[2], -LOG_LIMIT, LOG_LIMIT))
            s[i] = np.exp(log_s)
            if np.isnan(needed[i]):
                continue
            due = promised[i, np.searchsorted(grid, s[i])] if s[i] <= grid[-1] else np.inf
            if not np.isfinite(due):  # no time was promised (a bound at 0): nothing to keep, nothing to learn
                continue
            miss = bool(needed[i] > s[i])
            at = min(ended[i], due) if miss else ended[i]
            if censored[i] and not miss or not np.isfinite(at):
                continue
            learnt[i] = at
            gain = float(delayed_rate(rate, issued[i], due if np.isfinite(due) else at, horizon))
            heapq.heappush(queue, (at, int(i), gain * (miss - alpha)))
    return s, learnt


def _track_group(needed, s, idx, issued, known, alpha, rate) -> None:
    """:func:`track` for one group, every column; the outcome queue is ordered per column by when it is known."""
    k = needed.shape[1]
    order = np.argsort(known[idx], axis=0, kind="stable")  # [m, K]: per column, outcomes by when they are known
    ready = np.take_along_axis(known[idx], order, axis=0)  # [m, K]
    who = idx[order]  # [m, K] window index of each queued outcome
    ptr = np.zeros(k, np.int64)
    log_s = np.zeros(k)
    cols_k = np.arange(k)
    for i in idx:
        t = issued[i]
        while True:  # take, column by column, every outcome known by t (most columns advance by 0 or 1)
            live = ptr < len(idx)
            take = np.zeros(k, bool)
            take[live] = ready[ptr[live], cols_k[live]] <= t
            if not take.any():
                break
            c = cols_k[take]
            e = who[ptr[c], c]
            miss = needed[e, c] > s[e, c]
            log_s[c] = np.clip(log_s[c] + rate[e] * (miss - alpha[c]), -LOG_LIMIT, LOG_LIMIT)
            ptr[c] += 1
        s[i] = np.exp(log_s)


def online_bounds(
    lower: np.ndarray, upper: np.ndarray, y: np.ndarray, issued: np.ndarray, groups: np.ndarray,
    levels: np.ndarray | list[float], forecast: np.ndarray, rate: float = RATE,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Per-step bounds [N, L, H, T] (levels, steps, targets) of the forecasts ``forecast`` [N, H, T] recalibrated
    online against the outcomes ``y`` [N, H, T]: the forecast issued at row ``issued`` [N] of link ``groups`` [N]
    learns its step-h outcome from row ``issued + h`` on (the row it forecast has arrived)."""
    n, n_levels, h, t = lower.shape
    centre = centre_of(forecast[:, None], lower, upper)
    need = needed_scale(y[:, None], lower, upper, centre).reshape(n, -1)
    steps = np.broadcast_to(np.arange(1, h + 1)[None, :, None], (n_levels, h, t)).reshape(-1)
    alpha = np.broadcast_to((1.0 - np.asarray(levels, np.float64))[:, None, None], (n_levels, h, t)).reshape(-1)
    s = track(need, issued, issued[:, None] + steps[None], groups, alpha, rate).reshape(lower.shape)
    return nested(*rescale(lower, upper, s, centre), levels, axis=1)

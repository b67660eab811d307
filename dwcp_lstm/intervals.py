"""Prediction intervals by split conformal calibration on the validation split (numpy only, no torch).

For each target and horizon step the signed residual ``y - forecast`` of every validation window is divided by a
scale and its empirical quantiles give the interval ``forecast + scale * [q_lo, q_hi]`` at each nominal level:
equal tails, ``q_lo`` the ``floor((n + 1) alpha / 2)``-th smallest score and ``q_hi`` the
``ceil((n + 1) (1 - alpha / 2))``-th, so that each tail holds at most ``alpha / 2`` of exchangeable new windows
(Vovk et al. 2005; Lei et al., JASA 2018). Asymmetric bounds follow skewed targets (loss and jitter cannot go far
below zero).

Four scales are tried: 1 (plain split conformal); *locally adaptive*, the standard deviation of the target's
one-step changes inside the window itself (floored at 5 % of its median), so that a volatile window gets a wider
interval; *fitted*, a spread model: ``exp`` of a linear map of the log volatility, log mean level and log last
value of every target's window, least squares on the log of the calibration windows' mean absolute residual (locally
weighted split conformal, Lei et al., JASA 2018, section 5.2); and *quantile*, per step a centre and a half-width
that are linear in that step's forecast of every target, read off the residuals' 10 % and 90 % quantile regressions
(conformalized quantile regression, Romano, Patterson & Candes, NeurIPS 2019, with the interval's own forecast as
the regressor; :func:`fit_quantile`). The one with the lowest interval (Winkler) score when
calibrated on the earlier half of each link's validation windows and judged on the later half is used, then
calibrated on all of them. A transfer sees the
*average* throughput over its duration, and the bound of an average is not the average of per-step bounds: the mean
over the first k steps (k = 1..H) is calibrated the same way, on its own residuals.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from dwcp_lstm.errors import ConfigError, DataError

DEFAULT_LEVELS = (0.8, 0.95)
SCALES = ("plain", "adaptive", "fitted", "quantile")  # the candidates of :func:`choose`, simplest first
SPREAD_FLOOR = 0.05  # a window summary is floored at this share of its calibration mean before its log
TAIL_FACTOR = 8  # beyond the horizon, the mean over up to 8 x H steps is calibrated (for plans that outlast it)
BOUND_NAMES = ("lower", "upper", "mean_lower", "mean_upper")  # the graph's interval outputs (mean_* for H > 1)
QR_TAUS = (0.1, 0.9)  # the quantile scale's two regressions: their midpoint is its centre, half their gap its width
QR_ITERS = 60  # iteratively reweighted least squares steps of :func:`quantile_regression`
QR_MAX_WINDOWS = 20_000  # the regressions read at most this many windows (evenly spaced); the quantiles read all
QR_MAX_INPUTS = 8  # up to this many targets, each target's regressions read every target's forecast; beyond, its own


def level_tag(level: float) -> str:
    """``80`` for 0.8, ``97.5`` for 0.975: how columns and report keys name a level."""
    return f"{100 * level:g}"


def check_levels(levels: Sequence[float]) -> tuple[float, ...]:
    """Nominal coverage levels: each in (0, 1), no repeats."""
    levels = tuple(float(v) for v in levels)
    if not levels or any(not (0.0 < v < 1.0) for v in levels) or len(set(levels)) != len(levels):
        raise ConfigError(f"--model.interval_levels must be distinct numbers in (0, 1), got {list(levels)}")
    # Columns and report keys name a level by its percentage (level_tag): two levels with one name overwrote each
    # other's columns, and 0.9999999 was named 100
    tags = [level_tag(v) for v in levels]
    clash = next((t for i, t in enumerate(tags) if t in tags[:i] or not 0.0 < float(t) < 100.0), None)
    if clash is not None:
        what = "two levels" if tags.count(clash) > 1 else "a level"
        raise ConfigError(
            f"--model.interval_levels {list(levels)}: levels are named by their percentage to 6 "
            f"significant digits, and {clash} % names {what}; give levels that differ in those digits"
        )
    return levels


def windows_needed(levels: Sequence[float]) -> int:
    """Calibration windows that the widest level needs: ``floor((n + 1) alpha / 2) >= 1``."""
    alpha = 1.0 - max(levels)
    return math.ceil(round(2.0 / alpha, 9)) - 1  # rounded: 1 - 0.8 is 0.19999999999999996 in floating point


@dataclass(frozen=True)
class Calibration:
    """Everything needed to turn forecasts into intervals; arrays are [L, H, T] (levels, steps, targets)."""

    levels: tuple[float, ...]
    adaptive: np.ndarray  # [T] bool: the target's scale is the window's volatility (else 1)
    lo: np.ndarray  # quantile of the scaled residual for the lower bound, per level, step, target
    hi: np.ndarray
    mean_lo: np.ndarray  # the same for the mean over the first k steps (the H axis is k - 1)
    mean_hi: np.ndarray
    floor: np.ndarray  # [T] smallest scale (adaptive only)
    windows: int  # calibration windows
    # Beyond the horizon, [L, K - H, T]: the realised mean over the first k = H + 1 .. K steps against its centre,
    # a linear map of the forecast mean over the H steps (None: not calibrated). Not in the graph: the planner
    # applies them. ``tail_centre`` [K - H, 2, T]: per span and target, the intercept and the slope on the held
    # mean (None: the held mean itself, as models exported before 2026-12-02 carry it).
    tail_lo: np.ndarray | None = None
    tail_hi: np.ndarray | None = None
    tail_centre: np.ndarray | None = None
    # The fitted scale (:func:`fit_spread`): which targets use it [T] bool, its coefficients [1 + 3 T, T] and the
    # floors of the window summaries it reads [3, T] (None: no target fitted)
    fitted: np.ndarray | None = None
    spread: np.ndarray | None = None
    spread_floor: np.ndarray | None = None
    # The quantile scale (:func:`fit_quantile`): which targets use it [T] bool and, per step, the centre and the
    # half-width as linear maps of the step's forecast [H, 1 + T, T] (row 0 the bias) and the width's floor [H, T];
    # ``mean_*`` the same for the mean over the first k steps (None: no target uses it). Beyond the horizon these
    # targets use the fitted spread (``fitted`` is true for them too): the tail is calibrated around the held
    # mean, which has no step of its own to regress on.
    quantile: np.ndarray | None = None
    qr: dict[str, np.ndarray] | None = None

    def scale(self, hist: np.ndarray) -> np.ndarray:
        """[N, W, T] raw target history -> [N, 1, T]: each window's scale of each target's residuals."""
        return window_scale(hist, self.adaptive, self.floor, self.fitted, self.spread, self.spread_floor)

    def scale_dict(self) -> dict:
        """How the scale is computed, as the metadata records it (:func:`window_scale`)."""
        out = {"adaptive": [bool(a) for a in self.adaptive], "floor": [float(v) for v in self.floor]}
        if self.fitted is not None and self.fitted.any():
            out |= {"fitted": [bool(f) for f in self.fitted], "spread": self.spread.tolist(),
                    "spread_floor": self.spread_floor.tolist()}  # fmt: skip
        return out

    def quantile_dict(self) -> dict:
        """The quantile scale, as the report records it (empty without one)."""
        if self.quantile is None or not self.quantile.any():
            return {}
        return {"quantile": [bool(q) for q in self.quantile], **{k: v.tolist() for k, v in self.qr.items()}}

    def to_dict(self) -> dict:
        return {
            "levels": list(self.levels),
            "scale": "fitted: exp(spread^T [1, log max(s, spread_floor) for s in the volatility, |mean| and "
            "|last value| of every target's window]); else adaptive: std of the window's one-step changes (floored "
            "at floor); else 1. quantile targets: bounds forecast + centre + max(width, width_floor) * [lo, hi], "
            "centre and width = [1, the step's forecast of every target] @ centre / width",
            "windows": self.windows,
            **self.scale_dict(),
            **self.quantile_dict(),
            "lo": self.lo.tolist(),
            "hi": self.hi.tolist(),
            "mean_lo": self.mean_lo.tolist(),
            "mean_hi": self.mean_hi.tolist(),
            **({"beyond_horizon": self.beyond_horizon()} if self.tail_lo is not None else {}),
        }

    def beyond_horizon(self) -> dict | None:
        """The calibration of the mean beyond the horizon, as the contract carries it (None without one)."""
        if self.tail_lo is None:
            return None
        return {
            "steps": int(self.lo.shape[1] + self.tail_lo.shape[1]),
            **self.scale_dict(),
            "lo": self.tail_lo.tolist(),
            "hi": self.tail_hi.tolist(),
            **({"centre": self.tail_centre.tolist()} if self.tail_centre is not None else {}),
        }


def volatility(hist: np.ndarray) -> np.ndarray:
    """[N, W, T] raw target history -> [N, T]: the standard deviation of the one-step changes in the window."""
    return np.diff(hist, axis=1).std(axis=1)


def scale_kinds(recorded: dict) -> list[str]:
    """Per target, the scale a recorded calibration (``Calibration.scale_dict``, the metadata) uses: ``quantile``,
    ``fitted``, ``adaptive`` (the window's volatility) or ``plain``."""
    n = len(recorded["adaptive"])
    fitted, quantile = recorded.get("fitted") or [False] * n, recorded.get("quantile") or [False] * n
    return [
        "quantile" if q else "fitted" if f else "adaptive" if a else "plain"
        for a, f, q in zip(recorded["adaptive"], fitted, quantile, strict=True)
    ]


def recorded_scale(hist: np.ndarray, recorded: dict) -> np.ndarray:
    """:func:`window_scale` from a calibration as the metadata records it (``Calibration.scale_dict``; metadata
    written before the fitted scale has no ``fitted`` key): [N, W, T] raw target history -> [N, 1, T]."""
    fitted = np.asarray(recorded.get("fitted") or [False] * len(recorded["adaptive"]), dtype=bool)
    spread = {k: np.asarray(recorded[k], np.float64) for k in ("spread", "spread_floor")} if fitted.any() else {}
    adaptive, floor = np.asarray(recorded["adaptive"], bool), np.asarray(recorded["floor"], np.float64)
    return window_scale(hist, adaptive, floor, fitted, **spread)


def summaries(hist: np.ndarray) -> np.ndarray:
    """[N, W, T] raw target history -> [N, 3, T]: each target's volatility, |mean| and |last value| in the window."""
    return np.stack([volatility(hist), np.abs(hist.mean(axis=1)), np.abs(hist[:, -1])], axis=1)


def spread_features(hist: np.ndarray, spread_floor: np.ndarray) -> np.ndarray:
    """[N, W, T] -> [N, 1 + 3 T]: 1 and the log of every target's window summaries, each floored at
    ``spread_floor`` [3, T] (a flat or idle window has a volatility or level of 0, whose log is -inf)."""
    logs = np.log(np.maximum(summaries(hist), spread_floor)).reshape(len(hist), -1)
    return np.concatenate([np.ones((len(hist), 1)), logs], axis=1)


def fit_spread(pred: np.ndarray, y: np.ndarray, hist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fitted scale's coefficients [1 + 3 T, T] and summary floors [3, T] from calibration windows (``pred``,
    ``y`` [n, H, T], ``hist`` [n, W, T]): per target, least squares of log(mean over steps of |residual| + 5 % of
    its mean) on :func:`spread_features`. One scale per window for every step, as the other two scales, so that the
    mean over k steps and the tail beyond the horizon scale alike. The floors are 5 % of each summary's mean."""
    spread_floor = np.maximum(SPREAD_FLOOR * summaries(hist).mean(axis=0), 1e-12)  # [3, T]
    x = spread_features(hist, spread_floor)
    r = np.abs(y - pred).mean(axis=1)  # [n, T]
    target = np.log(r + SPREAD_FLOOR * r.mean(axis=0) + 1e-300)
    coef = np.linalg.solve(x.T @ x + 1e-6 * len(x) * np.eye(x.shape[1]), x.T @ target)  # a whisker of ridge
    return coef, spread_floor


def window_scale(
    hist: np.ndarray, adaptive: np.ndarray, floor: np.ndarray, fitted: np.ndarray | None = None,
    spread: np.ndarray | None = None, spread_floor: np.ndarray | None = None,
) -> np.ndarray:  # fmt: skip
    """[N, 1, T] scale of each window's residuals: the fitted spread for fitted targets, the volatility for
    adaptive ones, 1 for the others."""
    scale = np.where(adaptive, np.maximum(volatility(hist), floor), 1.0)
    if fitted is not None and np.any(fitted):
        scale = np.where(fitted, np.exp(spread_features(hist, spread_floor) @ spread), scale)
    return scale[:, None, :]


def quantile_regression(x: np.ndarray, y: np.ndarray, taus: np.ndarray) -> np.ndarray:
    """Linear quantile regressions, many at once: ``x`` [C, n, p], ``y`` [C, n], ``taus`` [C] -> coefficients [C, p]
    minimising the pinball loss of each. Iteratively reweighted least squares (Schlossmacher, JASA 1973; what
    statsmodels' QuantReg does), vectorised over the C problems: scikit-learn's QuantileRegressor solves the same
    linear program exactly but takes 0.2 s per problem at 2,500 windows and 11 s at 20,000, and a 12-step
    calibration solves 192 of them. The conformal step that follows keeps the coverage whatever small error is
    left here (tests check the loss against scikit-learn's)."""
    taus = np.asarray(taus, dtype=np.float64)[:, None]
    xt, y1 = np.ascontiguousarray(x.transpose(0, 2, 1)), y[..., None]  # [C, p, n], [C, n, 1]
    ridge = 1e-8 * np.eye(x.shape[2])
    beta = np.linalg.solve(xt @ x + ridge, xt @ y1)  # [C, p, 1]: least squares to start
    # The smallest |residual| a weight divides by: relative to the fit's, and above 0 when every residual is 0
    size = np.abs(y1).mean(axis=1, keepdims=True) + 1.0  # [C, 1, 1]
    eps = 1e-6 * np.abs(y1 - x @ beta).mean(axis=1, keepdims=True) + 1e-12 * size
    for _ in range(QR_ITERS):
        r = (y1 - x @ beta)[..., 0]  # [C, n]
        w = np.where(r >= 0, taus, 1.0 - taus) / np.maximum(np.abs(r), eps[..., 0])
        xtw = xt * w[:, None, :]
        beta = np.linalg.solve(xtw @ x + ridge, xtw @ y1)
    return beta[..., 0]


def _linear(pred: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """[N, H, T] forecasts, [H, 1 + T, T] coefficients (row 0 the bias) -> [N, H, T]: each step's linear map."""
    return coef[None, :, 0] + np.einsum("nhi,hij->nhj", pred, coef[:, 1:])


def fit_quantile(pred: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The quantile scale from calibration windows (``pred``, ``y`` [n, H, T]): per step and target, the
    :data:`QR_TAUS` quantile regressions of the residual ``y - pred`` on 1 and the step's forecast of every target
    (standardised while solving, coefficients returned for the raw forecast). Returns the centre (their midpoint)
    and the half-width, [H, 1 + T, T] each, and the width's floor [H, T] (5 % of the mean |residual - centre|: two
    regressions that cross give a negative width).

    Why the forecast: what moves the spread of a residual is where the target is going. The measurement noise is
    relative to the value measured, the queue's loss convex in the load; a calm stretch (the test split after two
    business days of validation) then narrows the interval with the forecast, which the window's own past does not
    show one hour ahead (docs/method.md, "The quantile scale"). Two quantiles rather than one scale let the two tails
    move apart: loss has a tail towards congestion that grows with the load."""
    n, h, t = pred.shape
    m = min(n, QR_MAX_WINDOWS)
    pick = np.linspace(0, n - 1, m).astype(np.int64)
    p, r = pred[pick], (y - pred)[pick]
    mu, sd = p.mean(axis=0), p.std(axis=0)  # [H, T]
    sd = np.where(sd > 0, sd, 1.0)
    z = (p - mu) / sd  # [m, H, T]
    taus = np.tile(np.asarray(QR_TAUS), t)  # [2 T]: target-major, as the rows below
    beta = np.zeros((h, 2 * t, t + 1))  # [H, 2 T, 1 + T in]
    for k in range(h):  # one step at a time, its 2 T regressions at once
        rk = np.repeat(r[:, k].T, 2, axis=0)  # [2 T, m]
        if t <= QR_MAX_INPUTS:  # every target's forecast
            x = np.broadcast_to(np.concatenate([np.ones((m, 1)), z[:, k]], axis=1), (2 * t, m, t + 1))
            beta[k] = quantile_regression(x, rk, taus)
        else:  # many targets: each its own forecast only (the cost grows with the inputs' square)
            x = np.stack([np.ones((2 * t, m)), np.repeat(z[:, k].T, 2, axis=0)], axis=2)  # [2 T, m, 2]
            own = quantile_regression(x, rk, taus)
            beta[k, :, 0] = own[:, 0]
            beta[k, np.arange(2 * t), 1 + np.repeat(np.arange(t), 2)] = own[:, 1]
    beta = beta.reshape(h, t, 2, t + 1)  # [H, T out, tau, 1 + T in]

    def raw(b: np.ndarray) -> np.ndarray:  # [H, T out, 1 + T in] standardised -> [H, 1 + T in, T out] raw
        slope = b[..., 1:] / sd[:, None, :]
        bias = b[..., 0] - (slope * mu[:, None, :]).sum(axis=-1)
        return np.concatenate([bias[:, None, :], slope.transpose(0, 2, 1)], axis=1)

    centre, width = raw(beta.mean(axis=2)), raw((beta[:, :, 1] - beta[:, :, 0]) / 2)
    floor = np.maximum(SPREAD_FLOOR * np.abs(y - pred - _linear(pred, centre)).mean(axis=0), 1e-12)  # [H, T]
    return centre, width, floor


def interval_terms(cal: Calibration, pred: np.ndarray, scale: np.ndarray, mean: bool = False) -> tuple:
    """Centre offset and scale of each window's residuals: bounds are ``forecast + shift + scale * [lo, hi]``, for
    the steps or, with ``mean``, the means over the first k steps (``pred`` [N, H, T] still the per-step forecast).
    ``scale``: the windows' own, ``cal.scale(hist)`` [N, 1, T], which the quantile targets' replaces: [N, H, T]
    then."""
    if cal.quantile is None or not cal.quantile.any():
        return np.zeros((1, 1, pred.shape[2])), scale
    key = "mean_" if mean else ""
    x = _running_mean(pred) if mean else pred
    q = cal.quantile
    shift = np.where(q, _linear(x, cal.qr[key + "centre"]), 0.0)
    width = np.maximum(_linear(x, cal.qr[key + "width"]), cal.qr[key + "width_floor"][None])
    return shift, np.where(q, width, scale)


def _edge_scores(r: np.ndarray, y: np.ndarray, ranges: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Scores [n, H, T] for the lower and the upper quantile, given the clipping of the bounds into ``ranges``
    [2, T]: a value at its range's lower edge (a second without loss, a link at 0 Mbit/s) is covered by any clipped
    upper bound, so it never binds the upper quantile (-inf there), and one at the upper edge never binds the lower
    one (+inf). Without this, forecasts clipped onto the edge give residuals of exactly 0 there, the upper quantile
    lands on that atom and the interval over-covers (Starlink loss_rate: 87 % for 80 %)."""
    if ranges is None:
        return r, None
    low, high = np.asarray(ranges, dtype=np.float64)
    return np.where(y >= high, np.inf, r), np.where(y <= low, -np.inf, r)


def _quantiles(
    scores: np.ndarray, upper_scores: np.ndarray | None = None, *, levels: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """[n, H, T] scores -> lower and upper conformal quantiles [L, H, T] (finite-sample ranks, equal tails).

    ``upper_scores``: other scores for the upper quantile, infinite for the windows that a clipped bound covers
    whatever the quantile (:func:`_edge_scores`). Where fewer such-free windows remain on one side than its tail asks
    to miss (Starlink loss_rate: 98 % of the seconds at 0, so the upper bound can miss 2 % at most), the other side
    misses the rest, so that the interval still misses alpha of the calibration windows instead of over-covering.
    A quantile on an edge window (infinite) becomes the most extreme finite score: every bound stays a number."""
    n = len(scores)
    s = np.sort(scores, axis=0)
    u = s if upper_scores is None else np.sort(upper_scores, axis=0)
    free_lo, free_hi = np.isfinite(s).sum(axis=0), np.isfinite(u).sum(axis=0)  # [H, T]: windows that can miss
    with np.errstate(invalid="ignore"):
        top = np.where(np.isfinite(s), s, -np.inf).max(axis=0)  # [H, T]; -inf: every window at the edge
        bottom = np.where(np.isfinite(u), u, np.inf).min(axis=0)
    lo, hi = [], []
    for level in levels:
        alpha = 1.0 - level
        k_lo = math.floor(round((n + 1) * alpha / 2, 9))  # 1-based ranks; rounded against 1 - 0.8 = 0.1999...
        k_hi = math.ceil(round((n + 1) * (1 - alpha / 2), 9))
        if k_lo < 1 or k_hi > n:
            raise DataError(
                f"{n} validation windows cannot calibrate a {100 * level:g} % interval: it needs at least "
                f"{windows_needed([level])}"
            )
        short_hi = np.maximum(0, (n - k_hi) - np.maximum(free_hi - 1, 0))  # misses the upper side cannot make
        short_lo = np.maximum(0, (k_lo - 1) - np.maximum(free_lo - 1, 0))
        r_lo = np.clip(np.minimum(k_lo + short_hi, free_lo), 1, n)  # [H, T]
        r_hi = np.clip(np.maximum(k_hi - short_lo, n - free_hi + 1), 1, n)
        lo.append(np.take_along_axis(s, (r_lo - 1)[None], axis=0)[0])
        hi.append(np.take_along_axis(u, (r_hi - 1)[None], axis=0)[0])
    lo, hi = np.stack(lo), np.stack(hi)
    lo = np.where(np.isfinite(lo), lo, np.where(np.isfinite(top), top, 0.0))
    hi = np.where(np.isfinite(hi), hi, np.where(np.isfinite(bottom), bottom, 0.0))
    return lo, hi


def _selective_lower(
    scores: np.ndarray, at: np.ndarray, scale: np.ndarray, low: np.ndarray, lo: np.ndarray, levels: Sequence[float]
) -> np.ndarray:
    """Lower quantiles [L, H, T] of the bounds of a *mean* that keep their level among the windows whose bound lies
    above the range's lower edge ``low`` [T] (the bound ``at + scale x lo``; ``scores`` [n, H, T], ``at``/``scale``
    broadcast to it, ``lo`` the marginal quantiles of :func:`_quantiles`).

    A bound clipped onto the edge (an idle client's: no rate guaranteed) covers every value, so a marginal
    quantile puts all of its tail's misses on the other windows: on Irish's bursty client, idle half the time,
    the planner's confidence-level times covered 72-80 % of the migrations they gave a time for. The planner
    gives a time only where the bound is above the edge, so its level is conditional on that: the quantile is
    read again over those windows alone, which lowers it, which moves some windows onto the edge, until it stops
    moving. Each pass lowers it (the windows that leave were hits), so the passes end; where too few windows
    remain for the rank, the last quantile holds."""
    n, out = len(scores), lo.copy()
    for li, level in enumerate(levels):
        cur, a = lo[li], (1.0 - level) / 2
        for _ in range(50):
            above = at + scale * cur[None] > low  # [n, H, T]
            rank = np.floor(np.round((above.sum(axis=0) + 1) * a, 9)).astype(np.int64)  # [H, T], 1-based
            s = np.sort(np.where(above, scores, np.inf), axis=0)
            new = np.take_along_axis(s, np.clip(rank - 1, 0, n - 1)[None], axis=0)[0]
            new = np.where((rank >= 1) & np.isfinite(new), np.minimum(new, cur), cur)
            if np.array_equal(new, cur):
                break
            cur = new
        out[li] = cur
    return out


def _running_mean(a: np.ndarray) -> np.ndarray:
    """[N, H, T] -> [N, H, T]: entry k - 1 is the mean of steps 1..k."""
    return np.cumsum(a, axis=1) / np.arange(1, a.shape[1] + 1)[None, :, None]


def calibrate(pred: np.ndarray, y: np.ndarray, hist: np.ndarray, levels: Sequence[float],
              adaptive: np.ndarray | bool, ranges: np.ndarray | None = None,
              fitted: np.ndarray | bool = False, quantile: np.ndarray | bool = False) -> Calibration:  # fmt: skip
    """Calibrate on windows with forecasts ``pred`` and actuals ``y`` [n, H, T] and target history ``hist``
    [n, W, T]; ``adaptive``, ``fitted`` and ``quantile`` per target [T] (or one flag for all; quantile wins, then
    fitted); ``ranges`` [2, T]: the physical ranges the bounds will be clipped into (:func:`_edge_scores`).

    The fitted and quantile scales are fitted on the same windows their quantiles are then read from: a few
    coefficients per target and step against thousands of windows, so the optimism this leaves is small; a check
    calibrated on one half of the windows and judged on the other is :func:`choose`'s."""
    levels = check_levels(levels)
    n_targets = y.shape[2]

    def flags(v) -> np.ndarray:
        return np.broadcast_to(np.asarray(v, dtype=bool), (n_targets,)).copy()

    adaptive, fitted, quantile = flags(adaptive), flags(fitted), flags(quantile)
    vol = volatility(hist)
    floor = np.maximum(0.05 * np.median(vol, axis=0), 1e-12)  # [T]
    # A quantile target keeps the fitted spread as its window scale: the tail beyond the horizon (calibrate_tail,
    # the planner) has no step of its own to regress on, so it scales the held mean's residual by the spread
    fitted |= quantile
    adaptive &= ~fitted
    fit = {}  # no fitted target: the calibration records none of the fitted scale's fields
    if fitted.any():
        spread, spread_floor = fit_spread(pred, y, hist)
        fit = {"fitted": fitted, "spread": spread, "spread_floor": spread_floor}
    if quantile.any():
        qr = dict(zip(("centre", "width", "width_floor"), fit_quantile(pred, y), strict=True))
        mean_fit = fit_quantile(_running_mean(pred), _running_mean(y))
        qr |= dict(zip(("mean_centre", "mean_width", "mean_width_floor"), mean_fit, strict=True))
        fit |= {"quantile": quantile, "qr": qr}
    cal = Calibration(levels, adaptive, *([np.zeros(0)] * 4), floor, len(y), **fit)
    window = cal.scale(hist)
    shift, scale = interval_terms(cal, pred, window)
    lo, hi = _quantiles(*_edge_scores((y - pred - shift) / scale, y, ranges), levels=levels)
    mean_y = _running_mean(y)
    shift, scale = interval_terms(cal, pred, window, mean=True)
    at = _running_mean(pred) + shift  # where each window's bound of the mean is centred
    mean_scores = _edge_scores((mean_y - at) / scale, mean_y, ranges)
    mean_lo, mean_hi = _quantiles(*mean_scores, levels=levels)
    if ranges is not None:  # the planner's bound: its level among the windows it gives a time for
        mean_lo = _selective_lower(mean_scores[0], at, scale, ranges[0], mean_lo, levels)
    return replace(cal, lo=lo, hi=hi, mean_lo=mean_lo, mean_hi=mean_hi)


def tail_centre(held: np.ndarray, centre: np.ndarray | None) -> np.ndarray:
    """[N, T] forecast means over the horizon -> [N, K - H, T]: the centre of the mean over k = H + 1 .. K steps,
    ``intercept + slope x held`` per span (``centre`` [K - H, 2, T]; None: the held mean for every span)."""
    if centre is None:
        return held[:, None, :]
    return centre[None, :, 0] + centre[None, :, 1] * held[:, None, :]


def calibrate_tail(
    cal: Calibration, pred: np.ndarray, y_long: np.ndarray, hist: np.ndarray, ranges: np.ndarray | None = None
) -> Calibration:
    """Extend ``cal`` beyond the horizon: for spans k = H + 1 .. K, the scaled residual of the realised mean over
    the first k steps (``y_long`` [n, K, T], NaN past the calibration split) against its centre, a least-squares
    line in the forecast mean over the H steps (``pred`` [n, H, T]), with the same scale and ranks as
    :func:`calibrate`. A transfer that outlasts the forecast then gets a measured bound instead of an assumed one.

    Why a centre: a link far below its usual rate over the horizon tends back up over the next minutes, one
    far above it back down (the slope falls from about 1 at H + 1 to 0.77-0.79 at 8 H on the default data and the
    public traces). Around the held mean itself the quantile was set by the fast windows coming down, and the slow
    windows' bounds, far below where they went, covered 95-100 % (Norway, spans past 2 H). Spans with fewer
    complete windows than the widest level needs end the extension."""
    h = pred.shape[1]
    scale = cal.scale(hist)[:, 0, :]  # [n, T]
    held = pred.mean(axis=1)  # [n, T]
    running = np.cumsum(y_long, axis=1) / np.arange(1, y_long.shape[1] + 1)[None, :, None]  # NaN past the split
    lo, hi, centre = [], [], []
    for k in range(h + 1, y_long.shape[1] + 1):
        ok = ~np.isnan(running[:, k - 1]).any(axis=1)
        if ok.sum() < windows_needed(cal.levels):
            break
        line = np.stack([_line(held[ok, t], running[ok, k - 1, t]) for t in range(held.shape[1])], axis=1)  # [2, T]
        at = (line[0] + line[1] * held[ok])[:, None, :]  # [n ok, 1, T]
        r, mean_y = ((running[ok, k - 1][:, None, :] - at) / scale[ok][:, None]), running[ok, k - 1][:, None, :]
        scores = _edge_scores(r, mean_y, ranges)
        a, b = _quantiles(*scores, levels=cal.levels)  # [L, 1, T]
        if ranges is not None:  # as the mean over the horizon's: the level among the plans that give a time
            a = _selective_lower(scores[0], at, scale[ok][:, None], ranges[0], a, cal.levels)
        lo.append(a[:, 0])
        hi.append(b[:, 0])
        centre.append(line)
    if not lo:
        return cal
    return replace(cal, tail_lo=np.stack(lo, axis=1), tail_hi=np.stack(hi, axis=1), tail_centre=np.stack(centre))


def _line(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares intercept and slope of y on x [2]; a constant x (one level everywhere) gives slope 1 and
    the mean offset, so a flat forecast is still carried forward."""
    var = x.var()
    if not var > 1e-12 * max(1.0, float(np.mean(x * x))):
        return np.array([float(np.mean(y - x)), 1.0])
    slope = float(np.mean((x - x.mean()) * (y - y.mean())) / var)
    return np.array([float(y.mean() - slope * x.mean()), slope])


def intervals(
    cal: Calibration, pred: np.ndarray, hist: np.ndarray, ranges: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Bounds [N, L, H, T] of each step (``lower``/``upper``) and of the mean over the first k steps
    (``mean_lower``/``mean_upper``, the H axis is k - 1), with the mean forecast itself (``mean`` [N, H, T]); with
    a tail calibration also ``tail_lower``/``tail_upper`` [N, L, K - H, T] for the mean over k = H + 1 .. K steps.
    ``ranges`` [2, T] (``tables.target_ranges``) clips every bound into the targets' physical ranges, as the graph
    does: coverage of values inside the range is unchanged, widths only shrink."""
    mean, window = _running_mean(pred), cal.scale(hist)  # [N, H, T], [N, 1, T]
    tail = {}
    if cal.tail_lo is not None:  # [N, L, K - H, T]: the mean over k > H steps, around its centre
        at, scale = tail_centre(mean[:, -1], cal.tail_centre)[:, None], window[:, None]  # [N, 1, K - H | 1, T]
        tail = {"tail_lower": at + scale * cal.tail_lo[None], "tail_upper": at + scale * cal.tail_hi[None]}
    shift, scale = interval_terms(cal, pred, window)
    mean_shift, mean_scale = interval_terms(cal, pred, window, mean=True)
    at, mean_at = pred + shift, mean + mean_shift  # [N, H, T]: where each interval is centred before its quantiles
    bounds = {
        **tail,
        "lower": at[:, None] + scale[:, None] * cal.lo[None],
        "upper": at[:, None] + scale[:, None] * cal.hi[None],
        "mean_lower": mean_at[:, None] + mean_scale[:, None] * cal.mean_lo[None],
        "mean_upper": mean_at[:, None] + mean_scale[:, None] * cal.mean_hi[None],
    }
    if ranges is not None:
        bounds = {k: np.clip(v, ranges[0], ranges[1]) for k, v in bounds.items()}
    return {**bounds, "mean": mean}


def interval_scores(lower: np.ndarray, upper: np.ndarray, y: np.ndarray, levels: Sequence[float]) -> dict:
    """Coverage, mean width and mean interval (Winkler) score per level, step and target: arrays [L, H, T].

    Winkler score of a (1 - alpha) interval: width + (2 / alpha) x the distance by which ``y`` falls outside it;
    lower is better, and it rewards narrow intervals only when they still cover (Gneiting & Raftery 2007).
    """
    y = y[:, None]  # [N, 1, H, T]
    alpha = (1.0 - np.asarray(levels))[None, :, None, None]
    width = upper - lower
    below, above = np.maximum(lower - y, 0.0), np.maximum(y - upper, 0.0)
    return {
        "coverage": ((y >= lower) & (y <= upper)).mean(axis=0),
        "width": width.mean(axis=0),
        "winkler": (width + 2.0 / alpha * (below + above)).mean(axis=0),
    }


def earlier_half(groups: np.ndarray) -> np.ndarray:
    """[N] bool: the first half of each group's windows (a group's windows are in time order, as the splits list
    them), the part a chronological check calibrates on."""
    groups = np.asarray(groups)
    rank, size = np.zeros(len(groups), dtype=np.int64), np.zeros(len(groups), dtype=np.int64)
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        rank[idx], size[idx] = np.arange(len(idx)), len(idx)
    return rank < size // 2


def choose(
    pred: np.ndarray, y: np.ndarray, hist: np.ndarray, levels: Sequence[float], allow_adaptive: bool = True,
    groups: np.ndarray | None = None, ranges: np.ndarray | None = None,
) -> tuple[Calibration, dict | None]:  # fmt: skip
    """Per target, plain, locally adaptive, fitted or quantile (:data:`SCALES`), by the mean Winkler score (over
    levels and steps) of a calibration on the earlier half of each group's windows (``groups``: the series or
    segment of each window; None: one) judged on the later half, then calibrated on all of them. Returns the
    calibration and the scores of every choice per target (None when a half is too small to calibrate: plain then).
    ``allow_adaptive=False`` keeps every target plain (a model whose targets are not among its inputs cannot compute
    the window's summaries in its graph).
    ``ranges``: the targets' physical ranges, which clip the bounds being judged (see :func:`intervals`).

    Chronological, not interleaved, because that is how the calibration is used: fitted on validation, it meets the
    test split, which comes after it. Neighbouring windows overlap, so an even/odd split judges a scale on nearly
    the windows it was fitted on; a later stretch is a different stretch of hours and load (between plain and
    the volatility, on the 12-step default run it picked the volatility for every target, where even/odd kept RTT
    and jitter plain; docs/method.md)."""
    levels = check_levels(levels)
    earlier = earlier_half(np.zeros(len(y)) if groups is None else groups)
    need = windows_needed(levels)
    if not allow_adaptive or earlier.sum() < need or (~earlier).sum() < need:
        return calibrate(pred, y, hist, levels, False, ranges), None
    score = {}
    for name in SCALES:
        cal = calibrate(pred[earlier], y[earlier], hist[earlier], levels, name == "adaptive", ranges,
                        name == "fitted", name == "quantile")  # fmt: skip
        b = intervals(cal, pred[~earlier], hist[~earlier], ranges)
        score[name] = interval_scores(b["lower"], b["upper"], y[~earlier], levels)["winkler"].mean(axis=(0, 1)).tolist()
    best = np.argmin([score[name] for name in SCALES], axis=0)  # [T]; ties go to the simpler scale
    return calibrate(pred, y, hist, levels, best == 1, ranges, best == 2, best == 3), score

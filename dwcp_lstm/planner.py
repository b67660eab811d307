"""Live-migration planning: how long will moving a VM take on each link, and how sure are we (numpy only).

The pre-copy model (Clark et al., "Live Migration of Virtual Machines", NSDI 2005; its analytic form in Akoush et
al., "Predicting the Performance of Virtual Machine Migration", MASCOTS 2010): round 0 sends the VM's memory M;
each later round sends the pages dirtied during the previous one, ``min(M, D x its duration)`` at dirty rate D;
once what is left fits in the downtime limit at the bandwidth of that moment (``left <= B x downtime``) the VM is
paused and the rest copied (stop-and-copy): that pause is the downtime. Pre-copy converges only when the bandwidth
exceeds the dirty rate, otherwise every round is as long as the last and the migration never ends (QEMU then needs
auto-converge or post-copy). A migration that has not met the stop condition after :data:`MAX_ROUNDS` rounds is
reported as not converging.

The bandwidth is a curve of per-step rates (Mbit/s over steps of the telemetry's cadence), and the transfer time is
where the curve's cumulative volume reaches what must be sent (linear within a step):

* median: the point forecast of every step (the model's forecasts are conditional means);
* at confidence c: the *lower bound of the mean throughput over the first k steps* at the two-sided level
  ``2c - 1`` (its lower tail holds ``1 - c``: the mean over k steps exceeds it with probability c), as a
  guaranteed cumulative volume ``k x step x bound_k``, made non-decreasing. A transfer done by time t in the
  realised data is one whose realised volume by t reaches what had to be sent, so the time read off this curve is
  the c-quantile of the transfer time at every whole step;
* beyond the model's horizon nothing is forecast: the median plan holds the forecast mean over the horizon; the
  confident one continues with the model's calibration of the *realised* mean over k = H + 1 .. 8 H steps
  around a line in that held mean (a slow link tends back up, a fast one down:
  :func:`dwcp_lstm.intervals.calibrate_tail`, on the validation split, carried in the contract), never above the
  held mean, and past 8 H steps holds its last bound. The plan says so (``beyond_horizon``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dwcp_lstm import online as O
from dwcp_lstm.errors import ConfigError, DataError, check_named
from dwcp_lstm.intervals import recorded_scale, scale_kinds, tail_centre

MBIT_PER_GIB = 8 * 2**30 / 1e6  # a GiB of memory in Mbit
MAX_ROUNDS = 100  # pre-copy rounds before a migration is called non-converging
DEFAULT_DOWNTIME_MS = 300.0  # QEMU's default downtime-limit
MAX_MEMORY_GIB = 1e9  # an exbibyte: beyond it the volume in Mbit stops being a trustworthy float (and is a typo)
MIN_MEMORY_GIB = 2.0**-30  # one byte: below it every time is 0 s
MAX_RATE_MBPS = 1e7  # 10 Tbit/s, beyond any memory bus; larger values overflow the round arithmetic (warnings)
MAX_DOWNTIME_MS = 86_400_000.0  # a day


@dataclass(frozen=True)
class Migration:
    """One migration to plan.

    Args:
        memory_gib: the VM's memory (GiB, > 0): what round 0 sends.
        dirty_rate_mbps: how fast the running VM dirties memory (Mbit/s, >= 0): what each later round sends.
        downtime_ms: the longest pause allowed for the stop-and-copy (ms, > 0).
    """

    memory_gib: float
    dirty_rate_mbps: float = 0.0
    downtime_ms: float = DEFAULT_DOWNTIME_MS

    def __post_init__(self) -> None:
        for name, value, ok, need in (
            (
                "--memory-gib",
                self.memory_gib,
                lambda v: MIN_MEMORY_GIB <= v <= MAX_MEMORY_GIB,
                f"from {MIN_MEMORY_GIB:.3g} (a byte) to {MAX_MEMORY_GIB:g}",
            ),
            (
                "--dirty-rate-mbps",
                self.dirty_rate_mbps,
                lambda v: 0 <= v <= MAX_RATE_MBPS,
                f"from 0 to {MAX_RATE_MBPS:g}",
            ),
            ("--downtime-ms", self.downtime_ms, lambda v: 0 < v <= MAX_DOWNTIME_MS, f"> 0 and <= {MAX_DOWNTIME_MS:g}"),
        ):
            if not (isinstance(value, int | float) and np.isfinite(value) and ok(value)):
                raise ConfigError(f"{name} must be a finite number {need}, got {value}")

    @property
    def memory_mbit(self) -> float:
        return self.memory_gib * MBIT_PER_GIB


def level_for(confidence: float, levels: list[float]) -> float:
    """The calibrated two-sided level whose lower bound is a one-sided ``confidence`` bound: ``2 c - 1``."""
    if not (isinstance(confidence, int | float) and 0.0 < confidence < 1.0):
        raise ConfigError(f"--confidence must be a number in (0, 1), got {confidence}")
    if f"{100 * confidence:g}" == "50":  # the median, which every plan gives: two columns named p50 otherwise
        raise ConfigError(f"--confidence {confidence!r} is the median, which plan gives anyway; ask for more than 0.5")
    have = [round((1 + v) / 2, 9) for v in levels]
    for level, c in zip(levels, have, strict=True):
        if abs(c - confidence) < 1e-9:
            return level
    offered = ", ".join(f"{c:g}" for c in have) or "none"
    raise ConfigError(
        f"--confidence {confidence!r}: the model is calibrated for confidences {offered} "
        f"(its interval levels {[float(v) for v in levels]}); a confidence c needs the level 2c - 1"
    )


# -- bandwidth curves --------------------------------------------------------------------------------------------
def lower_rates(mean_lower: np.ndarray) -> np.ndarray:
    """[N, H] lower bounds of the mean rate over the first k steps -> [N, H] per-step rates whose cumulative volume
    is the guaranteed one, ``k x step x bound_k``, made non-decreasing (a volume already sent stays sent)."""
    k = np.arange(1, mean_lower.shape[1] + 1)
    volume = np.maximum.accumulate(np.maximum(mean_lower, 0.0) * k, axis=1)  # [N, H], in rate x steps
    return np.diff(volume, axis=1, prepend=0.0)


def _cumulative(rates: np.ndarray, step_s: np.ndarray) -> np.ndarray:
    """[N, K] rates -> [N, K + 1] volume (Mbit) sent by the end of each step, from 0."""
    return np.concatenate([np.zeros((len(rates), 1)), np.cumsum(rates * step_s[:, None], axis=1)], axis=1)


def _time_to(volume: np.ndarray, cum: np.ndarray, rates: np.ndarray, tail: np.ndarray, step_s: np.ndarray):
    """When the cumulative volume reaches ``volume`` [N] (s); beyond the curve the ``tail`` rate holds (inf where it
    is 0; NaN where it is NaN: realised data that ends first)."""
    k = (cum[:, 1:] < volume[:, None]).sum(axis=1)  # [N] whole steps before the volume is reached
    n_steps = rates.shape[1]
    inside = k < n_steps
    rows = np.arange(len(volume))
    kk = np.minimum(k, n_steps - 1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # a vanishing rate gives inf, like a rate of 0
        left = volume - cum[rows, k]
        within = np.where(left <= 0, 0.0, left / rates[rows, kk]) if n_steps else np.zeros(len(volume))
        after = np.where(left <= 0, 0.0, left / tail)
    after = np.where((tail <= 0) & (left > 0), np.inf, after)
    return np.where(inside, k * step_s + within, k * step_s + after)


def _rate_at(t: np.ndarray, rates: np.ndarray, tail: np.ndarray, step_s: np.ndarray) -> np.ndarray:
    """The rate at time ``t`` [N]: its step's, or the tail's past the curve (a huge t must not overflow the index)."""
    n_steps = rates.shape[1]
    inside = np.isfinite(t) & (t < n_steps * step_s)
    i = np.floor(np.where(inside, t, 0.0) / step_s).astype(np.int64)
    rows = np.arange(len(t))
    return np.where(inside, rates[rows, np.minimum(i, max(n_steps - 1, 0))] if n_steps else 0, tail)


def precopy(
    rates: np.ndarray, tail: np.ndarray, step_s: np.ndarray | float, m: Migration, max_rounds: int = MAX_ROUNDS
) -> dict[str, np.ndarray]:
    """Pre-copy migration on bandwidth curves: ``rates`` [N, K] Mbit/s per step (then ``tail`` [N] held).

    Returns per curve: ``time_s`` (to the end of the stop-and-copy; inf if it does not converge, NaN if realised
    data ran out first), ``downtime_s``, ``rounds`` (pre-copy rounds before the stop-and-copy), ``converged``.
    """
    rates = np.clip(np.asarray(rates, np.float64), 0.0, None)
    n = len(rates)
    tail = np.clip(np.broadcast_to(np.asarray(tail, np.float64), (n,)), 0.0, None)  # NaN stays NaN
    step_s = np.broadcast_to(np.asarray(step_s, np.float64), (n,))
    cum = _cumulative(rates, step_s)
    memory, dirty_rate, downtime = m.memory_mbit, m.dirty_rate_mbps, m.downtime_ms / 1e3

    sent = np.full(n, memory)  # round 0 sends the memory
    start, end = np.zeros(n), _time_to(sent, cum, rates, tail, step_s)
    time_s, pause = np.full(n, np.inf), np.full(n, np.nan)
    rounds = np.zeros(n, np.int64)
    open_ = np.isfinite(end)  # still pre-copying
    time_s[np.isnan(end)] = np.nan  # the data ended before round 0 did: censored
    for r in range(1, max_rounds + 1):
        if not open_.any():
            break
        with np.errstate(invalid="ignore"):  # closed curves (inf/NaN ends) are masked out below
            left = np.minimum(memory, dirty_rate * (end - start))  # dirtied during the last round
        bw = _rate_at(end, rates, tail, step_s)
        stop = open_ & ((left <= 0) | (left <= bw * downtime))
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            pause_now = np.where(left <= 0, 0.0, left / bw)
        time_s[stop], pause[stop], rounds[stop] = end[stop] + pause_now[stop], pause_now[stop], r
        open_ &= ~stop
        sent = sent + np.where(open_, left, 0.0)
        start, end = end, np.where(open_, _time_to(sent, cum, rates, tail, step_s), end)
        time_s[open_ & np.isnan(end)] = np.nan
        open_ &= np.isfinite(end)
    converged = np.isfinite(time_s)
    rounds[~converged] = max_rounds
    return {"time_s": time_s, "downtime_s": pause, "rounds": rounds, "converged": converged}


# -- plans from forecasts ----------------------------------------------------------------------------------------
def plan_arrays(
    forecast: np.ndarray, mean_lower: np.ndarray, step_s: np.ndarray, m: Migration, tail_lower: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Median and confidence-level plans for N links from their throughput forecasts [N, H] (Mbit/s, step k) and
    the lower bounds of the mean over the first k steps [N, H] at the chosen level; ``tail_lower`` [N, K - H] (the
    model's calibration beyond its horizon) continues those bounds to k = K, after which the last one holds.

    Returns arrays [N]: ``time_median_s``, ``time_confident_s``, ``downtime_median_s``, ``rounds_median``,
    ``converges`` (at the median), ``converges_confident``, ``mean_mbps`` (forecast mean rate over the median
    transfer), ``guaranteed_mbps`` (the bound of the mean rate over the confident transfer) and ``beyond_horizon``
    (the confident transfer outlasts the forecast, so the held-mean assumption was used).
    """
    forecast, mean_lower = np.asarray(forecast, np.float64), np.asarray(mean_lower, np.float64)
    step_s = np.broadcast_to(np.asarray(step_s, np.float64), (len(forecast),))
    h = forecast.shape[1]
    point_tail = np.clip(forecast, 0.0, None).mean(axis=1)  # beyond the horizon: the mean over it held
    bounds = _capped(forecast, mean_lower if tail_lower is None else np.concatenate([mean_lower, tail_lower], 1))
    low_rates = lower_rates(bounds)
    low_tail = np.clip(bounds[:, -1], 0.0, None)
    med = precopy(forecast, point_tail, step_s, m)
    conf = precopy(low_rates, low_tail, step_s, m)
    horizon_s = h * step_s
    return {
        "time_median_s": med["time_s"],
        "time_confident_s": conf["time_s"],
        "downtime_median_s": med["downtime_s"],
        "downtime_confident_s": conf["downtime_s"],
        "rounds_median": med["rounds"],
        "converges": med["converged"],
        "converges_confident": conf["converged"],
        "mean_mbps": _mean_rate(forecast, point_tail, step_s, med["time_s"]),
        "guaranteed_mbps": _mean_rate(low_rates, low_tail, step_s, conf["time_s"]),
        "beyond_horizon": ~(conf["time_s"] <= horizon_s),
        "beyond_calibration": ~(conf["time_s"] <= bounds.shape[1] * step_s),
        "horizon_s": horizon_s,
        "calibrated_s": bounds.shape[1] * step_s,
    }


def _capped(forecast: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """The bounds of the mean over k = 1 .. K steps [N, K], each capped at the median plan's own mean rate over k
    (the forecast's over the horizon, held past it): past the horizon a calibrated bound can exceed the held mean
    (a slow link's centre tends back up; the realised mean outgrew the held forecast on validation), and the
    confident time would come out below the median's."""
    point = np.clip(forecast, 0.0, None)
    point = np.cumsum(point, axis=1) / np.arange(1, point.shape[1] + 1)  # [N, H]
    held = np.repeat(point[:, -1:], bounds.shape[1] - point.shape[1], axis=1)  # [N, K - H]
    return np.minimum(bounds, np.concatenate([point, held], axis=1))


def confident_time(
    forecast: np.ndarray, mean_lower: np.ndarray, step_s: np.ndarray, m: Migration, tail_lower: np.ndarray | None,
    s: np.ndarray,
) -> np.ndarray:  # fmt: skip
    """The confidence-level time [N] with each bound's distance below the forecast mean multiplied by ``s`` [N]
    (1: the calibrated plan; > 1: a wider margin, so a later time). Online recalibration moves ``s``."""
    lower, tail = scaled_bounds(forecast, mean_lower, tail_lower, s)
    bounds = _capped(forecast, lower if tail is None else np.concatenate([lower, tail], axis=1))  # as plan_arrays
    return precopy(lower_rates(bounds), np.clip(bounds[:, -1], 0.0, None), step_s, m)["time_s"]


def scaled_bounds(
    forecast: np.ndarray, mean_lower: np.ndarray, tail_lower: np.ndarray | None, s: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None]:
    """The lower bounds of the mean over k steps [N, H] (and beyond the horizon [N, K - H]) with their distance
    below the forecast mean multiplied by ``s`` [N]. Beyond the horizon the distance is at least the horizon's
    last one: a bound centred where a slow link tends back to can reach the held mean itself (the plan caps it
    there), and a margin of nothing would stay nothing whatever ``s``; s = 1 leaves every bound as calibrated."""
    mean = np.cumsum(forecast, axis=1) / np.arange(1, forecast.shape[1] + 1)
    lower = mean - s[:, None] * np.maximum(mean - mean_lower, 0.0)
    if tail_lower is not None:
        held = mean[:, -1:]
        distance = np.maximum(held - tail_lower, np.maximum(held - mean_lower[:, -1:], 0.0))
        tail_lower = tail_lower - (s[:, None] - 1.0) * distance
    return lower, tail_lower


def scale_needed(
    forecast: np.ndarray, mean_lower: np.ndarray, step_s: np.ndarray, m: Migration, tail_lower: np.ndarray | None,
    t_real: np.ndarray, iters: int = 16,
) -> np.ndarray:  # fmt: skip
    """The smallest multiplier ``s`` of :func:`confident_time` whose time covers the realised ``t_real`` [N] (0 if
    the median plan already does, inf if no margin up to 100 times the calibrated one does): bisection on log s,
    the time being non-decreasing in s (16 halvings of [1e-2, 1e2]: s to within 0.015 %)."""
    lo, hi = np.full(len(t_real), np.log(1e-2)), np.full(len(t_real), np.log(1e2))
    covered = lambda s: confident_time(forecast, mean_lower, step_s, m, tail_lower, s) >= t_real  # noqa: E731
    for _ in range(iters):
        mid = (lo + hi) / 2
        ok = covered(np.exp(mid))
        hi, lo = np.where(ok, mid, hi), np.where(ok, lo, mid)
    need = np.exp(hi)
    need[covered(np.zeros(len(t_real)))] = 0.0
    need[~covered(np.full(len(t_real), 1e2))] = np.inf
    return need


def _mean_rate(rates: np.ndarray, tail: np.ndarray, step_s: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Mean of a rate curve over [0, t] (over the horizon where t is not finite)."""
    rates = np.clip(rates, 0.0, None)
    cum = _cumulative(rates, step_s)
    horizon = rates.shape[1] * step_s
    tt = np.where(np.isfinite(t) & (t > 0), t, horizon)
    k = np.minimum(np.floor(tt / step_s).astype(np.int64), rates.shape[1])
    rows = np.arange(len(t))
    part = tt - k * step_s
    rate_k = np.where(k < rates.shape[1], rates[rows, np.minimum(k, rates.shape[1] - 1)], tail)
    return (cum[rows, k] + part * rate_k) / tt


# -- the `plan` subcommand ---------------------------------------------------------------------------------------
def throughput_target(targets: list[str], units: dict[str, str], name: str | None) -> str:
    """The target that is the link's throughput: ``name`` if given, else ``throughput_mbps``, else the only target
    in Mbit/s."""
    if name is not None:
        if name not in targets:
            raise ConfigError(f"--throughput {name!r} is not a target of the model (targets: {targets})")
        if units.get(name) != "Mbit/s":
            raise ConfigError(f"--throughput {name!r} is in {units.get(name) or 'unknown units'}, not Mbit/s")
        return name
    if "throughput_mbps" in targets:
        return "throughput_mbps"
    rates = [t for t in targets if units.get(t) == "Mbit/s"]
    if len(rates) != 1:
        raise ConfigError(
            f"the model's targets {targets} have {'no' if not rates else 'several'} throughput (Mbit/s) columns; "
            "name one with --throughput"
        )
    return rates[0]


MIN_STEP_S = 1e-3  # a cadence below a millisecond is a time column in other units (or no cadence at all)
MAX_STEP_S = 1e7  # ~4 months between rows: times in other units (ns read as s), and beyond it the replay overflows


def check_cadence(step: float, link: str, path) -> None:
    """A link's detected cadence is at least :data:`MIN_STEP_S` seconds: times are read as seconds, and a transfer
    time divided by a vanishing step overflows the step index."""
    if not MIN_STEP_S <= step <= MAX_STEP_S:
        raise DataError(f"{path}: link {link}: cadence {step:g} s; the planner reads the time column as seconds "
                        f"and needs a cadence from {MIN_STEP_S:g} to {MAX_STEP_S:g} s (or --step-seconds)")  # fmt: skip


def plan_table(
    predictor, df, series: list[str], time: str, path, m: Migration, confidence: float,
    throughput: str | None = None, step_seconds: float | None = None, duplicates: str | None = None,
    max_gap: float = 3.0, online: bool = False, fill_missing: bool | None = None,
):  # fmt: skip
    """Per link, from its latest window: the plan of migration ``m`` (see :func:`plan_arrays`), ranked fastest first
    at ``confidence``. Returns ``(frame, facts)``: one row per link, and what the plan assumed. ``online``: the
    confidence-level margin recalibrated from the migrations the link's own history in ``df`` would have seen
    (:func:`plan_online`)."""
    import pandas as pd

    from dwcp_lstm.serve import as_dtype
    from dwcp_lstm.tables import (
        cadence_of,
        check_cadence_matches,
        latest_segments,
        link_name,
        segment_bounds,
    )

    if not predictor.levels:
        raise ConfigError(
            f"{predictor.model_path}: the model has no prediction intervals, so no time can be given at a "
            "confidence; re-export a run whose validation split could calibrate them"
        )
    level = level_for(confidence, predictor.levels)
    tp = throughput_target(predictor.targets, predictor.units, throughput)
    if online and tp not in predictor.features:
        raise ConfigError(f"{predictor.model_path}: --online needs the realised {tp} among the model's inputs")
    if step_seconds is not None and not (MIN_STEP_S <= step_seconds <= MAX_STEP_S):  # NaN compares False
        raise ConfigError(f"--step-seconds must be a number of seconds from {MIN_STEP_S:g} to {MAX_STEP_S:g}, got "
                          f"{step_seconds}")  # fmt: skip
    w, h = predictor.window, predictor.horizon
    time_dtype = df[time].dtype  # read as seconds below; written back as it came, as forecast does
    df = predictor.ordered(df, series, time, path, duplicates, fill_missing)
    bounds = segment_bounds(df, series, time, 1, max_gap, path)  # every segment; the latest of each link is used
    keys = df.groupby(series, sort=False, observed=True).ngroup().to_numpy() if series else np.zeros(len(df), int)
    latest = latest_segments(df, series, bounds)  # [links, 2]
    t = df[time].to_numpy()  # as read: steps are taken exactly (tables.time_steps)
    long_enough = (latest[:, 1] - latest[:, 0]) >= w
    if not long_enough.any():
        n = int((latest[:, 1] - latest[:, 0]).max())
        raise DataError(f"{path}: no link has {w} rows since its last gap (the model's window); the most is {n}")
    x = df[predictor.features].to_numpy(np.float32)
    ok = latest[long_enough]
    windows = np.stack([x[b - w : b] for _, b in ok])  # [S, W, F]
    predictor.check_range(windows, str(path), [link_name(df, series, a) for a, _ in ok])  # before any plan
    forecast, lower, tail = _curves(predictor, windows, tp, level, str(path))
    beyond = (predictor.metadata.get("intervals") or {}).get("beyond_horizon")
    if step_seconds is None:  # each link's median cadence over its latest segment (seconds)
        step = cadence_of(t, ok)
        for (a, _), s in zip(ok, step, strict=True):
            check_cadence(s, link_name(df, series, a), path)
        check_cadence_matches(df, series, time, ok, predictor.cadence_s, path, w)
    else:
        step = np.full(len(ok), float(step_seconds))
        if predictor.clock:  # the wall-clock inputs read the time column as seconds: milliseconds would be wrong
            check_cadence_matches(df, series, time, ok, predictor.cadence_s, path, w)
    if online:  # the margin each link's own history earned (plan_online)
        predictor.check_rows(x, df, series, time, bounds[bounds[:, 1] - bounds[:, 0] >= w], str(path))
        scale, outcomes = plan_online(predictor, x, t, bounds, keys, ok, tp, level, step_seconds, m, confidence,
                                      str(path))  # fmt: skip
        lower, tail = scaled_bounds(forecast, lower, tail, scale)
    p = plan_arrays(forecast, lower, step, m, tail)

    out = df.loc[ok[:, 1] - 1, [*series, time]].reset_index(drop=True)
    c = f"p{100 * confidence:g}"
    out["mean_mbps"] = p["mean_mbps"]
    out[f"guaranteed_mbps_{c}"] = p["guaranteed_mbps"]
    out["time_median_s"] = np.where(p["converges"], p["time_median_s"], np.nan)
    out[f"time_{c}_s"] = np.where(p["converges_confident"], p["time_confident_s"], np.nan)
    out["downtime_median_ms"] = 1e3 * p["downtime_median_s"]
    out["rounds_median"] = p["rounds_median"]
    out["converges"] = p["converges"]
    out[f"converges_{c}"] = p["converges_confident"]
    out["beyond_horizon"] = p["beyond_horizon"]
    out["step_s"] = step
    if online:
        out["online_scale"], out["online_outcomes"] = scale, outcomes
    out["note"] = [_note(p, i, m, confidence, tp) for i in range(len(ok))]
    skipped = df.loc[latest[~long_enough, 1] - 1, [*series, time]].reset_index(drop=True)
    if len(skipped):
        skipped["note"] = [
            f"no plan: {b - a} rows since the last gap, the model needs {w}" for a, b in latest[~long_enough]
        ]
        out = pd.concat([out, skipped], ignore_index=True)
        out["rounds_median"] = out["rounds_median"].astype("Int64")  # a count, null without a plan (was 18.0)
    out[time] = as_dtype(out[time], time_dtype)
    order = np.lexsort((out["time_median_s"].fillna(np.inf), out[f"time_{c}_s"].fillna(np.inf)))
    out = out.iloc[order].reset_index(drop=True)
    out.insert(0, "rank", np.arange(1, len(out) + 1))
    facts = {
        **({"online": {"rate": O.RATE, "note": ONLINE_NOTE}} if online else {}),
        "throughput": tp, "confidence": confidence, "level": level, "horizon_steps": h,
        "migration": {"memory_gib": m.memory_gib, "dirty_rate_mbps": m.dirty_rate_mbps, "downtime_ms": m.downtime_ms},
        "model": "pre-copy (Clark et al. NSDI 2005; Akoush et al. MASCOTS 2010), at most "
        f"{MAX_ROUNDS} rounds; stop-and-copy once the dirty pages fit in {m.downtime_ms:g} ms",
        "beyond_horizon": BEYOND_NOTE.format(
            bound=f"the bound of the mean is the model's own calibration for up to {beyond['steps']} steps (on its "
            "validation split; around where the mean tends to over that span, a line in the held mean"
            f"{'' if 'centre' in beyond else ', here the held mean itself'}; never above the held mean), then the "
            "last one" if beyond is not None else "so is its bound"
        ),
    }  # fmt: skip
    return out, facts


def _curves(
    predictor, windows: np.ndarray, tp: str, level: float, source: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """From raw windows [S, W, F]: the throughput forecast [S, H], the lower bound of its mean over the first k
    steps at ``level`` [S, H] and, where the contract calibrates the mean beyond the horizon, its continuation
    [S, K - H] around its centre, a line in the held forecast mean (else None)."""
    import pandas as pd

    h = predictor.horizon
    table = pd.DataFrame(predictor._table(windows, source).astype(np.float64), columns=predictor.all_columns)
    tag = f"{100 * level:g}"
    if h == 1:
        forecast, lower = table[[tp]].to_numpy(), table[[f"{tp}_lo{tag}"]].to_numpy()
    else:
        forecast = table[[f"{tp}_h{k}" for k in range(1, h + 1)]].to_numpy()
        lower = table[[f"{tp}_mean{k}_lo{tag}" for k in range(1, h + 1)]].to_numpy()
    beyond = (predictor.metadata.get("intervals") or {}).get("beyond_horizon")
    if beyond is None:
        return forecast, lower, None
    j = predictor.targets.index(tp)
    lo = np.asarray(beyond["lo"], np.float64)[predictor.levels.index(level), :, j]  # [K - H]
    scale = np.ones(len(windows))
    if scale_kinds(beyond)[j] != "plain":  # from the window's summaries, as the graph computes it for its own bounds
        hist = windows[:, :, [predictor.features.index(t) for t in predictor.targets]].astype(np.float64)
        scale = recorded_scale(hist, beyond)[:, 0, j]
    centre = np.asarray(beyond["centre"], np.float64)[:, :, j : j + 1] if "centre" in beyond else None
    at = tail_centre(forecast.mean(axis=1)[:, None], centre)[..., 0]  # [S, K - H | 1]
    return forecast, lower, at + scale[:, None] * lo[None]


def plan_online(
    predictor, x: np.ndarray, t: np.ndarray, bounds: np.ndarray, keys: np.ndarray, latest: np.ndarray, tp: str,
    level: float, step_seconds: float | None, m: Migration, confidence: float, source: str,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The margin multiplier [S] for each planned link's latest window (``latest`` [S, 2] row ranges), learnt
    online (:mod:`dwcp_lstm.online`) as the backtest does: the same migration started at every earlier window of
    the link in the input (every segment of ``bounds``, ``x`` [rows, F] raw inputs, ``t`` times, ``keys`` link of
    each row), its realised time from the measured throughput, a hit known from the row it ended on, a miss from
    the row its confident time passed (:func:`~dwcp_lstm.online.track_promises`). Also
    the number of outcomes each link had learnt from [S] (0: the calibrated margin, unchanged)."""
    from dwcp_lstm.serve import CHUNK
    from dwcp_lstm.tables import time_steps

    w, j = predictor.window, predictor.features.index(tp)
    planned = set(keys[latest[:, 1] - 1].tolist())
    rate = x[:, j].astype(np.float64)
    jobs = []  # (replay width, a, b, step) of each planned segment a window long
    for a, b in bounds:
        if b - a < w or keys[a] not in planned:
            continue
        step = float(step_seconds) if step_seconds is not None else float(np.median(time_steps(t[a:b])))
        check_cadence(step, f"segment from row {a + 1} (sorted)", source)
        jobs.append((replay_steps(predictor.horizon, b - a), a, b, step))
    parts = []
    # The windows of many segments in one batch (one per segment cost ~30 ms a link: 1,000 links took 32 s); the
    # segments of one replay width together, as each row's replay reads that many rows
    for width in sorted({job[0] for job in jobs}):
        group = [job for job in jobs if job[0] == width]
        rows = np.concatenate([np.arange(a + w - 1, b) for _, a, b, _ in group])  # each window's last row
        ends = np.concatenate([np.full(b - a - w + 1, b) for _, a, b, _ in group])
        steps = np.concatenate([np.full(b - a - w + 1, step) for _, a, b, step in group])
        for i in range(0, len(rows), CHUNK):
            chunk = slice(i, i + CHUNK)
            parts.append(_replay(predictor, x, rate, rows[chunk], ends[chunk], steps[chunk], width, tp, level, m,
                                 source))  # fmt: skip
    issued, need, known, censored, promised = (np.concatenate(v) for v in zip(*parts, strict=True))
    order = np.argsort(issued, kind="stable")  # row order, as margin_multipliers and the lookup below read them
    issued, need, known, censored, promised = (v[order] for v in (issued, need, known, censored, promised))
    groups = keys[issued]
    s, learnt_at = margin_multipliers(need, issued, known, groups, confidence, predictor.horizon, promised,
                                      censored=censored)  # fmt: skip
    at = np.searchsorted(issued, latest[:, 1] - 1)  # each link's latest window (issued rows ascend: row order)
    _, code = np.unique(groups, return_inverse=True)
    last_of_group = np.zeros(code.max() + 1, np.int64)
    last_of_group[code[at]] = issued[at]
    used = learnt_at <= last_of_group[code]  # outcomes learnt by the link's latest window
    return s[at], np.bincount(code, weights=used, minlength=len(last_of_group))[code[at]].astype(np.int64)


def _replay(
    predictor, x: np.ndarray, rate: np.ndarray, r: np.ndarray, ends: np.ndarray, steps: np.ndarray, width: int,
    tp: str, level: float, m: Migration, source: str,
) -> tuple[np.ndarray, ...]:  # fmt: skip
    """:func:`plan_online`'s replay of the migration started at the windows ending at rows ``r`` [n] (each of a
    segment ending at ``ends`` [n], rows ``steps`` [n] seconds apart; ``width`` rows replayed): (r, need, known
    row, censored, promised rows)."""
    w = predictor.window
    windows = x[r[:, None] - w + 1 + np.arange(w)]  # [n, W, F]
    f, lo, tail = _curves(predictor, windows, tp, level, source)
    real = rows_ahead(rate, r + 1, ends, width)
    t_real = precopy(real, np.full(len(r), np.nan), steps, m)["time_s"]
    done = np.isfinite(t_real)  # ended inside the data: its outcome is known
    # Still running when the data ended, after ``seen`` seconds: a miss already if the confident time came
    # before that (a link that never finished one in 41 hours kept its calibrated promise of two, unlearnt)
    seen = np.isfinite(real).sum(axis=1) * steps
    part = ~done & (seen > 0)
    t_known = np.where(done, t_real, seen)
    nd = np.full(len(r), np.nan)
    ok = done | part
    nd[ok] = scale_needed(f[ok], lo[ok], steps[ok], m, None if tail is None else tail[ok], t_known[ok])
    pr = np.full((len(r), len(MARGIN_GRID)), np.inf)
    pr[ok] = promised_rows(f[ok], lo[ok], steps[ok], m, None if tail is None else tail[ok], r[ok])
    return r, nd, ended_row(r, np.where(ok, t_known, 0.0), steps), part, pr


def replay_steps(horizon: int, longest: int) -> int:
    """How many measured rows a replayed migration may use: ``50 H + 200`` (far enough for the backtest's largest
    size), at most ``longest``; a migration still running after them is censored. Bounds the [N, steps] replay on
    long segments (a chunk of 4,096 windows over a 100,000-row segment would otherwise take 3 GB)."""
    return int(min(longest, 50 * horizon + 200))


def margin_multipliers(
    need: np.ndarray, issued: np.ndarray, known: np.ndarray, groups: np.ndarray, confidence: float, horizon: int,
    promised: np.ndarray, rate: float = O.RATE, censored: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Each migration's margin multiplier [n], learnt online per link (:func:`~dwcp_lstm.online.track_promises`; the
    backtest's and ``plan --online``'s) from the migrations already ended (``need`` [n] from :func:`scale_needed`,
    known from row ``known``) and the misses whose confident time (``promised`` [n, G], :func:`promised_rows`) has
    passed; the step damped for promises longer than the horizon. ``censored`` [n]: migrations still running when
    the data ended (``need``: for the time they were seen), which count only as misses. Also returns the row from
    which each outcome was learnt [n] (``inf``: never)."""
    known = np.where(np.isnan(need), np.inf, np.asarray(known, np.float64))
    return O.track_promises(need, issued, known, groups, 1.0 - confidence, horizon, promised, MARGIN_GRID, rate,
                            censored)  # fmt: skip


MARGIN_GRID = 10.0 ** (np.arange(-12, 13) / 12)  # multipliers 0.1..10 (1 exactly) whose confident times are computed


def promised_rows(
    forecast: np.ndarray, mean_lower: np.ndarray, step_s: np.ndarray, m: Migration, tail_lower: np.ndarray | None,
    issued: np.ndarray,
) -> np.ndarray:  # fmt: skip
    """[n, G]: the row by which each migration's confident time at multiplier ``MARGIN_GRID[g]`` has passed (its
    start ``issued`` plus the time in whole rows, as :func:`ended_row` counts; ``inf`` where it never ends)."""
    out = np.full((len(forecast), len(MARGIN_GRID)), np.inf)
    for g, v in enumerate(MARGIN_GRID):
        t = confident_time(forecast, mean_lower, step_s, m, tail_lower, np.full(len(forecast), v))
        done = np.isfinite(t)
        out[done, g] = ended_row(issued[done], t[done], step_s[done])
    return out


def ended_row(issued: np.ndarray, t_s: np.ndarray, step_s: np.ndarray) -> np.ndarray:
    """The row from which a migration started after row ``issued`` and lasting ``t_s`` seconds is known to have
    ended (at least the next row)."""
    return issued + np.maximum(np.ceil(t_s / step_s), 1).astype(np.int64)


ONLINE_NOTE = (
    "the distance of each link's bound below its forecast is multiplied by online_scale, learnt from online_outcomes "
    "migrations that its own history in the input would have seen: those that ended before its latest row, and "
    "misses from the row their confident time had passed (the others still running are not used) (each outcome "
    "moves its log by rate x (miss - (1 - confidence)), the rate times horizon / rows for a migration promised to "
    "take more rows than the horizon)"
)
BEYOND_NOTE = (
    "after the model's horizon the forecast mean over the horizon is assumed to hold for the median plan, and {bound}; "
    "such plans are flagged beyond_horizon"
)


def _note(p: dict, i: int, m: Migration, confidence: float, tp: str) -> str:
    if not p["converges"][i] and not p["mean_mbps"][i] > 0:
        return f"no plan: the forecast {tp} of this link is 0 Mbit/s (nothing would be sent)"
    if not p["converges"][i] and p["mean_mbps"][i] <= m.dirty_rate_mbps:
        return (
            f"does not converge: the forecast {tp} ({p['mean_mbps'][i]:.4g} Mbit/s) does not outpace the dirty rate "
            f"({m.dirty_rate_mbps:g} Mbit/s); needs auto-converge or post-copy"
        )
    if not p["converges"][i]:  # faster than the dirtying, but each round shrinks the rest too little
        return (
            f"does not converge: the forecast {tp} ({p['mean_mbps'][i]:.4g} Mbit/s) outpaces the dirty rate "
            f"({m.dirty_rate_mbps:g} Mbit/s) too narrowly for the rest to fit in {m.downtime_ms:g} ms within "
            f"{MAX_ROUNDS} rounds; needs auto-converge, post-copy or a longer downtime"
        )
    notes = []
    if not p["converges_confident"][i]:
        notes.append(
            f"may not converge: at {100 * confidence:g} % only {p['guaranteed_mbps'][i]:.4g} Mbit/s is guaranteed "
            f"against a dirty rate of {m.dirty_rate_mbps:g} Mbit/s"
        )
    if p["beyond_horizon"][i]:
        what = (
            f"beyond {p['calibrated_s'][i] / 60:.3g} minutes the last calibrated bound is assumed to hold"
            if p["beyond_calibration"][i] and p["calibrated_s"][i] > p["horizon_s"][i]
            else "the forecast mean over it is held, its bound calibrated"
            if p["calibrated_s"][i] > p["horizon_s"][i]
            else "the mean over it (and its bound) is assumed to hold"
        )
        notes.append(f"outlasts the {p['horizon_s'][i] / 60:.3g}-minute forecast: {what}")
    return "; ".join(notes)


def _duration(s: float) -> str:
    if not np.isfinite(s):
        return "never"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def format_plan(out, facts: dict, series: list[str]) -> str:
    """The human-readable table of :func:`plan_table`."""
    from dwcp_lstm.tables import LINK_SEPARATOR, printable

    c = f"p{100 * facts['confidence']:g}"
    mig = facts["migration"]
    lines = [
        f"Migration of {mig['memory_gib']:g} GiB, dirty rate {mig['dirty_rate_mbps']:g} Mbit/s, downtime limit "
        f"{mig['downtime_ms']:g} ms; times at the median and at {100 * facts['confidence']:g} % confidence "
        f"(the model's {100 * facts['level']:g} % intervals), fastest at {100 * facts['confidence']:g} % first.",
        "",
    ]
    head = ["rank", "link", "forecast mean", f"guaranteed {c}", "time p50", f"time {c}", "downtime p50"]
    rows = []
    for _, r in out.iterrows():
        link = LINK_SEPARATOR.join(printable(str(r[s])) for s in series) if series else "-"  # ESC: not the terminal's
        if r["note"].startswith("no plan"):
            rows.append([str(r["rank"]), link, "", "", "", "", ""])
        else:
            rows.append([
                str(r["rank"]), link, f"{r['mean_mbps']:.4g} Mbit/s", f"{r[f'guaranteed_mbps_{c}']:.4g} Mbit/s",
                _duration(r["time_median_s"]), _duration(r[f"time_{c}_s"]),
                f"{r['downtime_median_ms']:.0f} ms" if r["converges"] else "-",
            ])  # fmt: skip
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    lines.append("  ".join(h.ljust(wd) for h, wd in zip(head, widths, strict=True)))
    for row, (_, r) in zip(rows, out.iterrows(), strict=True):
        text = "  ".join(x.ljust(wd) for x, wd in zip(row, widths, strict=True)).rstrip()
        lines.append(text + (f"  ({r['note']})" if r["note"] else ""))
    lines += ["", f"Model: {facts['model']}.", f"Beyond the horizon ({facts['horizon_steps']} steps): "
              + facts["beyond_horizon"].split(": ", 1)[-1] + "."]  # fmt: skip
    if "online" in facts:
        planned = out[out["online_scale"].notna()]
        lines.append(
            f"Online (rate {facts['online']['rate']:g}): {facts['online']['note']}; here x"
            f"{planned['online_scale'].min():.3g} to x{planned['online_scale'].max():.3g} from "
            f"{int(planned['online_outcomes'].min())} to {int(planned['online_outcomes'].max())} migrations."
        )
    return "\n".join(lines)


def cmd_plan(argv: list[str]) -> None:
    """``python -m dwcp_lstm plan``: migration time per link from an exported model (no torch needed)."""
    import argparse
    import json
    import sys
    from pathlib import Path

    from dwcp_lstm.contract import METADATA_NAME, model_path_of
    from dwcp_lstm.serve import Predictor, add_reading_flags
    from dwcp_lstm.tables import finite_or_null

    class ArgumentParser(argparse.ArgumentParser):
        def error(self, message: str):  # one `error:` line, exit 2 (see dwcp_lstm.serve.cmd_forecast)
            raise ConfigError(" ".join(message.split()))

    p = ArgumentParser(
        prog="python -m dwcp_lstm plan",
        description="How long a live migration takes on each link, at the median and at a confidence level, from "
        "model.onnx + model_metadata.json (no torch needed).",
    )
    p.add_argument("--model", required=True, help="model.onnx of a run with intervals, or the run directory")
    p.add_argument("--metadata", default=None, help="model_metadata.json; default: beside the model")
    p.add_argument("--input", required=True, help="telemetry CSV or Parquet: each link's latest window is used")
    p.add_argument("--memory-gib", type=float, required=True, help="the VM's memory, GiB")
    p.add_argument("--dirty-rate-mbps", type=float, default=0.0, help="memory dirtying rate, Mbit/s (default 0)")
    p.add_argument("--downtime-ms", type=float, default=DEFAULT_DOWNTIME_MS, help="downtime limit, ms (default 300)")
    p.add_argument("--confidence", type=float, default=0.9, help="probability of finishing by the time given")
    p.add_argument("--throughput", default=None, help="the target that is the link's bandwidth (default: in Mbit/s)")
    p.add_argument("--step-seconds", type=float, default=None, help="seconds per row; default: each link's cadence")
    p.add_argument("--json", action="store_true", help="JSON instead of the table")
    p.add_argument(
        "--extrapolate",
        action="store_true",
        help="forecast inputs far outside the training rows' range too (refused by default: usually another unit)",
    )
    p.add_argument("--online", action="store_true", help="recalibrate the confidence-level margin per link from "
                   "the migrations its history in the input would have seen (adaptive conformal)")  # fmt: skip
    p.add_argument("--series-columns", default=None, help="comma-separated link id columns; default: as trained")
    p.add_argument("--time-column", default=None, help="numeric time column (seconds); default: as trained")
    add_reading_flags(p)
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    a = p.parse_args(argv)

    check_named(a.model, "--model", "a model.onnx or a run directory")
    check_named(a.input, "--input", "a telemetry .csv or .parquet file")
    migration = Migration(a.memory_gib, a.dirty_rate_mbps, a.downtime_ms)
    model = Path(a.model)
    metadata = a.metadata or (model / METADATA_NAME if model.is_dir() else None)
    predictor = Predictor(model_path_of(model) if model.is_dir() else model, metadata, a.threads)
    predictor.extrapolate = a.extrapolate
    level_for(a.confidence, predictor.levels) if predictor.levels else None  # bad confidence: before reading data
    trained = predictor.metadata["series"]
    df, series, time = predictor.read_telemetry(a.input, a.series_columns, a.time_column)
    out, facts = plan_table(predictor, df, series, time, a.input, migration, a.confidence, a.throughput,
                            a.step_seconds, a.duplicates, float(trained["max_gap"]), a.online,
                            a.fill_missing)  # fmt: skip
    if a.json:
        if out[time].dtype.kind in "mM":  # dates and durations as the input wrote them (to_json: epoch milliseconds)
            out[time] = out[time].astype(str)
        links = json.loads(out.to_json(orient="records"))  # NaN -> null
        print(json.dumps(finite_or_null({**facts, "links": links}), indent=2, allow_nan=False))
    else:
        print(format_plan(out, facts, series))
    print(f"planned {int((~out['note'].str.startswith('no plan')).sum())} of {len(out)} links", file=sys.stderr)


# -- backtest: the planner judged on held-out data ---------------------------------------------------------------
ISSUE_LADDER_GIB = (16.0, 64.0, 256.0, 1024.0)  # VM sizes up to a 1 TiB host evacuation
BACKTEST_CONFIDENCE = 0.9
DIRTY_SHARE = 0.2  # the non-zero dirty rate: a fifth of the rate the sizes were chosen at
LADDER_SHARES = (0.25, 0.5, 1.0)  # slow links: sizes carried in a quarter, half and all of the horizon


def carried_mbit(rates: list[np.ndarray], step_s: list[float], steps: float) -> float:
    """The median volume (Mbit) carried in the first ``steps`` steps (fractional: the last one in part) from every
    row of ``rates`` (Mbit/s, one array per stretch of training rows, ``step_s`` its cadence) whose steps all lie
    inside its stretch; 0 where no stretch is that long."""
    whole, part = int(steps), steps - int(steps)
    need = whole + (part > 0)
    volumes = []
    for x, c in zip(rates, step_s, strict=True):
        n = len(x) - need + 1
        if n <= 0:
            continue
        cum = np.concatenate([[0.0], np.cumsum(x, dtype=np.float64)])
        v = cum[whole : whole + n] - cum[:n]
        if part:
            v = v + part * x[whole : whole + n]
        volumes.append(v * c)
    return float(np.median(np.concatenate(volumes))) if volumes else 0.0


def _three_digits_down(x: float) -> float:
    """``x`` > 0 to three significant digits, rounded down: a size rounded up would need the next burst."""
    unit = 10.0 ** (math.floor(math.log10(x)) - 2)
    return float(f"{math.floor(x / unit * (1 + 1e-12)) * unit:.3g}")


def workload(mean_mbps: float, horizon_s: float, carried: list[float]) -> tuple[list[float], list[float]]:
    """VM sizes (GiB) and dirty rates (Mbit/s) to replay. 16, 64, 256 GiB and 1 TiB where the link carries 256 GiB
    within about two horizons at its mean rate, dirty rates 0 and a fifth of that mean. Else (slow links, short
    horizons) the sizes the link ``carried`` (Mbit, median over training rows, :func:`carried_mbit`) in a quarter,
    half and all of the horizon, so that the median transfer fits the horizon, dirty rates 0 and a fifth of the
    median rate over the horizon: on a bursty link (a video client's traffic, idle half the time) the mean rate is
    set by the bursts, and sizes read off it outlasted the horizon at 96-98 % of the Irish starts."""
    if mean_mbps <= 0:
        return [], []
    if 256 * MBIT_PER_GIB / mean_mbps <= 2 * horizon_s:
        return list(ISSUE_LADDER_GIB), [0.0, float(f"{DIRTY_SHARE * mean_mbps:.3g}")]
    sizes = [_three_digits_down(v / MBIT_PER_GIB) for v in carried if v > 0]
    typical = carried[-1] / horizon_s
    return sizes, [0.0, float(f"{DIRTY_SHARE * typical:.3g}")] if typical > 0 else [0.0]


def rows_ahead(values: np.ndarray, first_rows: np.ndarray, stop: np.ndarray, steps: int) -> np.ndarray:
    """``values`` ([rows] or [rows, T]) of the ``steps`` rows from each window's first target row on, [N, steps]
    (or [N, steps, T]), NaN from row ``stop`` on: what lies past a segment's end (or a split's) is never read. The
    backtest's realised throughput (a migration still running at the end is censored, not guessed) and the tail
    calibration's validation targets."""
    rows = first_rows[:, None] + np.arange(steps)  # [N, K]
    inside = rows < stop[:, None]
    picked = values[np.minimum(rows, len(values) - 1)]
    return np.where(inside if values.ndim == 1 else inside[..., None], picked, np.nan)


COVERAGE_REPS = 1000  # bootstrap resamples of the backtest's coverage


def coverage_interval(
    hit: np.ndarray, issued: np.ndarray, groups: np.ndarray, block_rows: int, reps: int = COVERAGE_REPS
) -> tuple[list[float] | None, int]:
    """95 % interval of a coverage (the share of ``hit`` [n], one per judged migration) by a block bootstrap
    (Kuensch, Annals of Statistics 1989): migrations started from windows less than ``block_rows`` apart on a link
    share forecast inputs and measured rows, so they are resampled together, in blocks of ``block_rows`` rows of
    their link (``groups`` [n], start row ``issued`` [n]). Neighbouring starts are nearly the same migration: the
    number of blocks, not of migrations, is how many independent outcomes one test split holds. Returns the
    interval (None with fewer than two blocks) and the number of blocks. Seeded: a report is reproducible."""
    if len(hit) == 0:
        return None, 0
    _, link = np.unique(np.asarray(groups), return_inverse=True)
    issued = np.asarray(issued, np.int64)
    key = link.astype(np.int64) * (int(issued.max()) // block_rows + 2) + issued // block_rows
    _, block = np.unique(key, return_inverse=True)
    hits, sizes = np.bincount(block, weights=hit.astype(np.float64)), np.bincount(block).astype(np.float64)
    if len(sizes) < 2:
        return None, len(sizes)
    pick = np.random.default_rng(0).integers(0, len(sizes), size=(reps, len(sizes)))
    share = hits[pick].sum(axis=1) / sizes[pick].sum(axis=1)
    return [float(v) for v in np.quantile(share, [0.025, 0.975])], len(sizes)


def backtest(
    real: np.ndarray,
    step_s: np.ndarray,
    forecast: np.ndarray,
    mean_lower: np.ndarray,
    last: np.ndarray,
    hm5: np.ndarray,
    persistence_lower: np.ndarray,
    sizes_gib: list[float],
    dirty_rates: list[float],
    downtime_ms: float = DEFAULT_DOWNTIME_MS,
    tail_lower: np.ndarray | None = None,
    issued: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    confidence: float = 0.9,
    online_rate: float = O.RATE,
    oracle: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None,
    window: int = 0,
) -> dict:
    """Replay migrations that start at every window: the realised time from the measured rates ``real`` [N, K]
    (NaN past the data) against the model's plan (``forecast`` [N, H], ``mean_lower`` [N, H] at the backtest's
    level) and three simple planners: the current rate held (QEMU's own estimate), the harmonic mean of the last
    five (the streaming standard), and persistence with conformal bounds (``persistence_lower`` [N, H]).

    Per size and dirty rate: ``coverage`` (share of migrations done by the confidence-level time) and ``mdape``
    (median absolute percentage error of the median time, %) for every planner, on the migrations that finished
    inside the data (``migrations``; ``censored`` ran past the end of their series); a censored migration still
    running at an estimate's time also counts against that estimate's coverage (a certain miss). Coverage is
    judged on the plans that give a time: one without (no guarantee at this confidence, or no convergence) is a
    statement, not a promise, and ``no_time_share`` says how many of the model's there were. With ``issued``
    [N] (each window's first forecast row) and ``groups`` [N] (its link), also ``online_coverage``: the
    confidence-level time recalibrated online (:func:`~dwcp_lstm.online.track_promises`): a hit used from the row
    the migration ended on, a miss from the row its confident time passed (a censored one's, a miss only, no later
    than the end of its data), the step damped when the promise is longer than the horizon. With ``oracle`` (the
    generator's forecast, ``mean_lower`` and ``tail_lower`` around it, calibrated the same way), also
    ``oracle_coverage``: what a perfect forecast's confidence-level time covers on the same migrations. With
    ``issued`` and ``groups`` also ``coverage_ci95``, the model's coverage's block-bootstrap interval
    (:func:`coverage_interval`; blocks of ``window`` rows, the model's input, plus the longer of the horizon and the
    90th percentile of the realised transfer, so that two blocks share no row), and ``coverage_blocks``."""
    n, h = forecast.shape
    none = np.empty((n, 0))
    seen = np.isfinite(real).sum(axis=1) * np.broadcast_to(step_s, (n,))  # [N] seconds of data after each start
    runs = []
    for dirty in dirty_rates:
        for size in sizes_gib:
            m = Migration(size, dirty, downtime_ms)
            t_real = precopy(real, np.full(n, np.nan), step_s, m)["time_s"]
            ok = np.isfinite(t_real)
            model = plan_arrays(forecast, mean_lower, step_s, m, tail_lower)
            persist = plan_arrays(np.repeat(last[:, None], h, axis=1), persistence_lower, step_s, m)
            simple = {
                "current_rate_held": precopy(none, last, step_s, m)["time_s"],
                "harmonic_mean_5": precopy(none, hm5, step_s, m)["time_s"],
                "persistence_conformal": persist["time_median_s"],
            }
            r = t_real[ok]
            part = ~ok & (seen > 0)  # still running when the data ended, ``seen`` seconds after the start

            def mdape(t: np.ndarray, r=r, ok=ok) -> float | None:
                return float(100 * np.median(np.abs(t[ok] - r) / r)) if ok.any() else None

            def judged(t: np.ndarray, ok=ok, part=part) -> np.ndarray:
                # The migrations a time t is judged on: those that finished, and those still running when the data
                # ended after t, which certainly missed it (left out, the slow starts near a segment's end, the
                # misses, were dropped and the fast ones kept). A plan with no time (inf: no guarantee at this
                # confidence, or no convergence) makes no promise to keep: counted apart (``no_time_share``), as
                # a hit it would inflate the coverage (Irish: 45-58 % of the model's plans, 84.6 % instead of 71.8 %)
                return (ok | (part & (seen >= t))) & np.isfinite(t)

            def hits(t: np.ndarray, ok=ok, t_real=t_real) -> np.ndarray:  # [N] finished by the time t
                return ok & (np.where(ok, t_real, np.inf) <= t)

            def covered(t: np.ndarray) -> float | None:
                j = judged(t)
                return float(hits(t)[j].mean()) if j.any() else None

            def no_time(t: np.ndarray, ok=ok) -> float | None:
                return float(np.mean(~np.isfinite(t[ok]))) if ok.any() else None

            t_conf = model["time_confident_s"]
            spread, online = {}, {}
            if issued is not None and judged(t_conf).any():
                j = judged(t_conf)
                rows = int(np.ceil(np.quantile(r / np.broadcast_to(step_s, (n,))[ok], 0.9)))
                ci, blocks = coverage_interval(hits(t_conf)[j], issued[j], groups[j], window + max(h, rows))
                spread = {"coverage_ci95": ci, "coverage_blocks": blocks}
            if issued is not None and ok.any():
                use = ok | part  # as plan --online learns: an unfinished migration tells of a miss only
                t_known = np.where(ok, t_real, seen)[use]
                tail = tail_lower[use] if tail_lower is not None else None
                args = (forecast[use], mean_lower[use], step_s[use], m, tail)
                need = scale_needed(*args, t_known)
                known = ended_row(issued[use], t_known, step_s[use])
                promised = promised_rows(*args, issued[use])
                scale, _ = margin_multipliers(need, issued[use], known, groups[use], confidence, h, promised,
                                              online_rate, censored=part[use])  # fmt: skip
                t_online = np.full(n, np.inf)
                t_online[use] = confident_time(*args, scale)
                online = {"online_coverage": covered(t_online), "online_median_scale": float(np.median(scale[ok[use]]))}

            runs.append({
                "memory_gib": size, "dirty_rate_mbps": dirty, "migrations": int(ok.sum()), "censored": int((~ok).sum()),
                "realised_median_s": float(np.median(r)) if ok.any() else None,
                "model": {
                    "coverage": covered(t_conf), "mdape": mdape(model["time_median_s"]),
                    "no_time_share": no_time(t_conf),
                    "beyond_horizon_share": float(model["beyond_horizon"][ok].mean()) if ok.any() else None,
                    "median_time_s": float(np.median(model["time_median_s"][ok])) if ok.any() else None,
                    **spread,
                    **online,
                },
                "persistence_conformal_coverage": covered(persist["time_confident_s"]),
                "oracle_coverage": None if oracle is None else covered(
                    plan_arrays(*oracle[:2], step_s, m, oracle[2])["time_confident_s"]),
                "simple": {name: {"mdape": mdape(t), "done_by_estimate": covered(t)} for name, t in simple.items()},
                "_points": (r, model["time_median_s"][ok], model["time_confident_s"][ok]),
            })  # fmt: skip
    return {"runs": runs}


@dataclass
class Replay:
    """A split's windows set up for replaying migrations (:func:`replay_windows`)."""

    pick: np.ndarray  # [N] which of the split's windows (in loader order) are replayed
    first: np.ndarray  # [N] each one's first target row
    step_s: np.ndarray  # [N] its segment's cadence, s
    real: np.ndarray  # [N, steps] the measured throughput from that row on, NaN past the split
    mean_mbps: float  # the training rows' mean throughput
    carried: list[float]  # median Mbit a training row is followed by in LADDER_SHARES of the horizon
    sizes: list[float]  # the ladder of VM sizes (GiB) and dirty rates (Mbit/s) replayed (:func:`workload`)
    dirty: list[float]


def replay_windows(dm, j: int, stage: str = "test", most: int = 20_000) -> Replay:
    """At most ``most`` windows of a split of ``dm`` (a fitted :class:`~dwcp_lstm.data.DwcpDataModule`), evenly
    spread (bounds the [N, steps] replay on long real traces), with the measured rows of target ``j`` after each
    start, stopped at the split's end in each segment (``DwcpDataModule.split_stop``: validation never reads the
    test rows), and the workload read off the training rows."""
    from dwcp_lstm import baselines as B
    from dwcp_lstm.tables import cadence_of

    pick = B._even_subset(len(dm.starts[stage]), most)
    first, stop = dm.target_rows(stage)[pick], dm.split_stop(stage)[pick]
    seg = dm.segment_of_row[first]
    cadence = cadence_of(dm.timestamps, dm.bounds)
    step_s = cadence[seg]
    train = [dm.raw_targets[a:b, j] for a, b in dm.train_ranges]
    train_step = [float(cadence[dm.segment_of_row[a]]) for a, _ in dm.train_ranges]
    mean_mbps, h = float(np.mean(np.concatenate(train))), dm.horizon
    carried = [carried_mbit(train, train_step, f * h) for f in LADDER_SHARES]
    sizes, dirty = workload(mean_mbps, float(np.median(step_s)) * h, carried)
    longest = int((stop - first).max()) if len(first) else 0
    real = rows_ahead(dm.raw_targets[:, j], first, stop, replay_steps(h, longest))
    return Replay(pick, first, step_s, real, mean_mbps, carried, sizes, dirty)


def _near(coverage: float | None) -> bool:
    """Within 3 points of the backtest's confidence (None, no plan with a time to judge, is not)."""
    return coverage is not None and abs(coverage - BACKTEST_CONFIDENCE) <= 0.03


def backtest_report(
    dm, val: dict | None, pred: np.ndarray, cal, hist: np.ndarray, online_rate: float = O.RATE, oracle=None
) -> tuple[dict, list[tuple[np.ndarray, ...]]]:
    """The ``planner`` section of a run's report: :func:`backtest` on the test split of ``dm`` (a fitted
    :class:`~dwcp_lstm.data.DwcpDataModule`), with the model's test forecasts ``pred`` [N, H, T], its calibration
    ``cal`` and the test windows' target history ``hist`` [N, W, T]; persistence is calibrated on the validation
    forecasts in ``val`` the same way. ``oracle``: the generator's test forecasts [N, H, T] and their calibration
    (``evaluate.oracle_calibration``), for each run's ``oracle_coverage``; None without. Returns the section (only
    ``skipped``, the reason, where no plan can be judged) and per replayed run the (realised, median, confident)
    times [n] of its migrations, for the plot."""
    from dwcp_lstm import baselines as B
    from dwcp_lstm import intervals as I
    from dwcp_lstm.tables import target_ranges

    units = {t: "Mbit/s" for t in dm.targets if t.endswith("_mbps")}
    try:
        tp = throughput_target(list(dm.targets), units, None)
    except ConfigError:
        return {"skipped": f"no single throughput target in Mbit/s among {list(dm.targets)}"}, []
    if cal is None or val is None:
        return {"skipped": "the model has no calibrated intervals"}, []
    try:
        level = level_for(BACKTEST_CONFIDENCE, list(cal.levels))
    except ConfigError as exc:
        return {"skipped": str(exc)}, []
    j, li = dm.targets.index(tp), list(cal.levels).index(level)
    rp = replay_windows(dm, j)
    pick_rows, first, step_s, pred, hist, h = rp.pick, rp.first, rp.step_s, pred[rp.pick], hist[rp.pick], dm.horizon
    mean_mbps, carried, sizes, dirty = rp.mean_mbps, rp.carried, rp.sizes, rp.dirty
    if not sizes:  # nothing to replay: say so, rather than checks that pass on no migration at all
        why = f"mean {mean_mbps:.4g} Mbit/s, median volume {carried[-1]:.4g} Mbit"
        return {"skipped": f"no VM size to replay: {tp} carried nothing in a typical {h}-step stretch ({why})"}, []
    outside = [f"{v:.3g} GiB" for v in sizes if not MIN_MEMORY_GIB <= v <= MAX_MEMORY_GIB]
    outside += [f"a dirty rate of {v:.3g} Mbit/s" for v in dirty if v > MAX_RATE_MBPS]
    if outside:  # data far from Mbit/s (bit/s, say): a workload the planner refuses, after training had finished
        why = f"training mean {mean_mbps:.4g} Mbit/s, median volume in {h} steps {carried[-1]:.4g} Mbit"
        return {"skipped": f"{tp} ({why}) gives {', '.join(outside)}, outside what the planner takes (a VM of a "
                           f"byte to {MAX_MEMORY_GIB:g} GiB, dirtied at most {MAX_RATE_MBPS:g} Mbit/s): is "
                           f"{tp} in Mbit/s?"}, []  # fmt: skip
    real = rp.real
    ranges = target_ranges(dm.targets)

    def plan_inputs(calibration, forecast: np.ndarray) -> tuple:
        """The throughput's forecast [N, H], the lower bound of its mean over k steps [N, H] and beyond the
        horizon [N, K - H] (None without a tail), clipped into the targets' ranges as the graph gives them to plan."""
        b = I.intervals(calibration, forecast, hist, ranges)
        tail = b["tail_lower"][:, li, :, j] if "tail_lower" in b else None
        return forecast[..., j], b["mean_lower"][:, li, :, j], tail

    _, mean_lower, tail_lower = plan_inputs(cal, pred)
    (vp, vm) = val["baselines"]["persistence"]
    pick = (vm, ..., slice(j, j + 1))
    pcal, _ = I.choose(
        vp[pick], val["y"][pick], val["hist"][pick], [level], groups=val["segment"][vm], ranges=ranges[:, j : j + 1]
    )
    last = hist[:, -1, j]
    persist = np.repeat(last[:, None, None], h, axis=1)  # [N, H, 1]
    p_lower = I.intervals(pcal, persist, hist[..., j : j + 1], ranges[:, j : j + 1])["mean_lower"][:, 0, :, 0]
    # the same plan around the generator's forecast, calibrated the same way
    o_plan = None if oracle is None else plan_inputs(oracle[1], oracle[0][pick_rows])
    out = backtest(real, step_s, pred[..., j], mean_lower, last, B.harmonic_mean(hist[..., j : j + 1])[:, 0],
                   p_lower, sizes, dirty, tail_lower=tail_lower, issued=first, groups=dm.series_names(first),
                   confidence=BACKTEST_CONFIDENCE, online_rate=online_rate, oracle=o_plan,
                   window=dm.window_size)  # fmt: skip
    runs = out["runs"]
    points = [r.pop("_points") for r in runs]
    judged = [r for r in runs if r["migrations"] > 0]
    out.update({
        "throughput": tp, "confidence": BACKTEST_CONFIDENCE, "level": level, "windows": len(first),
        "calibrated_steps": h if tail_lower is None else h + tail_lower.shape[1],
        "step_s": float(np.median(step_s)), "horizon_s": float(np.median(step_s)) * h,
        "training_mean_mbps": mean_mbps, "sizes_gib": sizes, "dirty_rates_mbps": dirty, "online_rate": online_rate,
        "training_carried_mbit": {"horizon_shares": list(LADDER_SHARES), "median": carried},
        "checks": {
            "coverage_within_3_points": all(_near(r["model"]["coverage"]) for r in judged),
            "online_coverage_within_3_points": all(_near(r["model"]["online_coverage"]) for r in judged),
            "mdape_below_every_simple_planner": all(
                r["model"]["mdape"] < min(s["mdape"] for s in r["simple"].values()) for r in judged
            ),
        },
    })  # fmt: skip
    return out, points

"""Shared by the planner experiments: a run's test (or validation) windows set up as its report's backtest sets them up.

Not part of the package and not tested: the analysis behind docs/planning.md, "What is not solved"."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from dwcp_lstm import evaluate as E
from dwcp_lstm import intervals as I
from dwcp_lstm import planner as P
from dwcp_lstm.runs import load_run
from dwcp_lstm.tables import target_ranges


def backtest_inputs(run: str, cal: I.Calibration | None = None, stage: str = "test") -> SimpleNamespace:
    """The throughput forecast [N, H], its mean bounds [N, H] and tail [N, K - H] at the 80 % level (the 90 %
    plan), the measured rows after each start [N, steps], cadence [N], sizes and dirty rates, as
    :func:`dwcp_lstm.planner.backtest_report` builds them; ``cal`` replaces the run's own calibration. ``stage``
    "val": the same on the validation split, its measured rows stopped at the split's end (never the test rows)."""
    module, dm, _ = load_run(run)
    val = E.validation_inputs(module, dm)
    own, _ = E.calibration_of(module, dm, val)
    cal = own if cal is None else cal
    tp = next(t for t in dm.targets if t.endswith("_mbps"))
    j, li = dm.targets.index(tp), list(cal.levels).index(0.8)
    rp = P.replay_windows(dm, j, stage)
    pred = E.predict_raw(module, dm, stage)[rp.pick]
    hist = E.target_history(dm, dm.starts[stage])[rp.pick]
    b = I.intervals(cal, pred, hist, target_ranges(dm.targets))
    return SimpleNamespace(
        module=module, dm=dm, val=val, cal=cal, j=j, li=li, pred=pred, hist=hist, forecast=pred[..., j],
        mean_lower=b["mean_lower"][:, li, :, j], tail_lower=b["tail_lower"][:, li, :, j], real=rp.real,
        step_s=rp.step_s, sizes=rp.sizes, dirty=rp.dirty, seen=np.isfinite(rp.real).sum(axis=1) * rp.step_s,
    )  # fmt: skip


def coverage(x: SimpleNamespace, m: P.Migration, t_conf: np.ndarray, mask: np.ndarray | None = None) -> tuple:
    """(coverage %, judged migrations) of confident times ``t_conf`` [N] as the backtest judges them: plans with
    a time, on migrations that ended or certainly missed; ``mask`` [N] restricts them."""
    t_real = P.precopy(x.real, np.full(len(x.real), np.nan), x.step_s, m)["time_s"]
    ok = np.isfinite(t_real)
    judged = (ok | (~ok & (x.seen > 0) & (x.seen >= t_conf))) & np.isfinite(t_conf)
    if mask is not None:
        judged &= mask
    hit = ok & (np.where(ok, t_real, np.inf) <= t_conf)
    return (100 * float(hit[judged].mean()) if judged.any() else float("nan")), int(judged.sum())


def compare_tail(x: SimpleNamespace, tail: np.ndarray, package: str, label: str) -> None:
    """Print, per size and dirty rate, the coverage of the plans on the run's own tail (``package``) beside those on
    another tail [N, K - H] (``label``), and how many starts that one leaves without a time."""
    for d in x.dirty:
        for s in x.sizes:
            m = P.Migration(s, d)
            one = P.plan_arrays(x.forecast, x.mean_lower, x.step_s, m, x.tail_lower)["time_confident_s"]
            other = P.plan_arrays(x.forecast, x.mean_lower, x.step_s, m, tail)["time_confident_s"]
            print(
                f"{s:g} GiB, dirty {d:g} Mbit/s: {package} {coverage(x, m, one)[0]:.1f} %, {label} "
                f"{coverage(x, m, other)[0]:.1f} % (no time {100 * np.mean(~np.isfinite(other)):.0f} %)"
            )

"""Variants of the fitted interval scale, judged on a run's test split (docs/method.md, "The fitted scale").

Not part of the package and not tested: the analysis behind the variants that docs/method.md lists as tried and not
built. It calibrates split conformal intervals on the run's validation windows with each scale and prints the test
coverage at 80 % / 95 %, the 80 % interval score and the first step's 80 % coverage per target (bounds not clipped
into the targets' ranges, edge windows not set apart, so a figure can differ from the report's by a few tenths of a
point).

    PYTHONPATH=. python docs/experiments/scale_variants.py lightning_logs/version_1

Scales: plain, the window's volatility, and the fitted spread with its inputs varied: ``all`` (every target's log
volatility, |mean| and |last value|: the package's), ``own`` (the target's own three only), ``hour`` (``all`` plus
the sine and cosine of the last row's hour of day), ``lastrow`` (``all`` plus every scaled input of the last row);
``perstep``: ``all`` fitted on each step's |residual| instead of their mean.
"""

from __future__ import annotations

import sys

import numpy as np

from dwcp_lstm import evaluate as E
from dwcp_lstm import intervals as I
from dwcp_lstm.runs import load_run

LEVELS = (0.8, 0.95)


def split(module, dm, stage: str) -> dict:
    starts = dm.starts[stage]
    hist = E.target_history(dm, starts)
    hour = (dm.timestamps[starts + dm.window_size - 1].astype(np.float64) % 86_400) / 3600
    return {"p": E.predict_raw(module, dm, stage), "y": E.step_targets(dm, stage), "h": hist,
            "hour": np.stack([np.sin(2 * np.pi * hour / 24), np.cos(2 * np.pi * hour / 24)], axis=1),
            "x": E.scaled_windows(dm, starts)[:, -1]}  # fmt: skip


def inputs(d: dict, kind: str, floors: np.ndarray, j: int) -> np.ndarray:
    """[N, P] inputs of the spread model of target ``j``."""
    logs = np.log(np.maximum(I.summaries(d["h"]), floors))  # [N, 3, T]
    own = logs[:, :, j] if kind == "own" else logs.reshape(len(logs), -1)
    extra = {"hour": [d["hour"]], "lastrow": [d["x"]]}.get(kind, [])
    return np.concatenate([np.ones((len(own), 1)), own, *extra], axis=1)


def scale_of(kind: str, fit: dict, cal: dict, d: dict) -> np.ndarray:
    """[N, H, T] scale of each window (and step, for ``perstep``), the spread model fitted on ``fit``."""
    n, h, t = d["y"].shape
    if kind == "plain":
        return np.ones((n, 1, t))
    if kind == "vol":
        floor = 0.05 * np.median(I.volatility(cal["h"]), axis=0)
        return np.maximum(I.volatility(d["h"]), floor)[:, None, :]
    floors = np.maximum(I.SPREAD_FLOOR * I.summaries(fit["h"]).mean(axis=0), 1e-12)
    name = "all" if kind == "perstep" else kind
    r = np.abs(fit["y"] - fit["p"])  # [n, H, T]
    r = r if kind == "perstep" else r.mean(axis=1, keepdims=True)
    out = np.empty((n, r.shape[1], t))
    for j in range(t):
        x = inputs(fit, name, floors, j)
        for k in range(r.shape[1]):
            target = np.log(r[:, k, j] + I.SPREAD_FLOOR * r[:, k, j].mean() + 1e-300)
            coef = np.linalg.lstsq(x, target, rcond=None)[0]
            out[:, k, j] = np.exp(inputs(d, name, floors, j) @ coef)
    return out


def judge(kind: str, val: dict, test: dict) -> list[tuple[float, float, float, float]]:
    """Per target: test coverage at 80 % and 95 % (pooled over steps), the 80 % interval score, and the 80 %
    coverage of the first step alone."""
    scores = (val["y"] - val["p"]) / scale_of(kind, val, val, val)
    s_test = scale_of(kind, val, val, test)
    out = []
    cov = {}
    for level in LEVELS:
        n, alpha = len(scores), 1 - level
        srt = np.sort(scores, axis=0)
        lo = srt[max(int(np.floor((n + 1) * alpha / 2)) - 1, 0)]
        hi = srt[min(int(np.ceil((n + 1) * (1 - alpha / 2))) - 1, n - 1)]
        lower, upper = test["p"] + s_test * lo, test["p"] + s_test * hi
        sc = I.interval_scores(lower[:, None], upper[:, None], test["y"], [level])
        cov[level] = (sc["coverage"][0].mean(axis=0), sc["winkler"][0].mean(axis=0), sc["coverage"][0][0])
    for j in range(val["y"].shape[2]):
        out.append((100 * cov[0.8][0][j], 100 * cov[0.95][0][j], cov[0.8][1][j], 100 * cov[0.8][2][j]))
    return out


def main(run: str) -> None:
    module, dm, _ = load_run(run)
    val, test = split(module, dm, "val"), split(module, dm, "test")
    for kind in ("plain", "vol", "all", "own", "hour", "lastrow", "perstep"):
        cells = zip(dm.targets, judge(kind, val, test), strict=True)
        print(
            f"{kind:8s} "
            + " | ".join(f"{t} {a:.1f} / {b:.1f} % W80 {w:.4g} step 1 {s1:.1f} %" for t, (a, b, w, s1) in cells)
        )


if __name__ == "__main__":
    main(sys.argv[1])

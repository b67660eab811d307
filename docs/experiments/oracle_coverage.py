"""How far the split itself moves static interval coverage: conformal intervals around the generator's oracle.

Not part of the package and not tested: the analysis behind docs/method.md, "What the split does to coverage". The
oracle is the Bayes forecast of the synthetic generator (the sidecar next to the data file), so its residuals are
the noise no model can remove. Calibrated on the run's validation windows with the package's own functions
(plain, volatility, fitted and quantile scales; bounds clipped into the targets' ranges as the report does) and
judged on its test windows, its coverage shows what static split conformal gives when the forecast is perfect: with
a scale that does not follow the load, a test split calmer than validation over-covers whatever the model. It also
prints each target's mean absolute oracle residual on test over validation (below 1: the test rows are calmer), and
the run's own intervals judged the same way.

    PYTHONPATH=. python docs/experiments/oracle_coverage.py lightning_logs/version_0
"""

from __future__ import annotations

import sys

import numpy as np

from dwcp_lstm import evaluate as E
from dwcp_lstm import intervals as I
from dwcp_lstm.runs import load_run
from dwcp_lstm.tables import target_ranges

LEVELS = (0.8, 0.95)


def coverage(cal: I.Calibration, pred: np.ndarray, hist: np.ndarray, y: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """[L + 1, T] test coverage in %: pooled over steps at each level, then the first step alone at the first."""
    b = I.intervals(cal, pred, hist, ranges)
    cov = 100 * I.interval_scores(b["lower"], b["upper"], y, LEVELS)["coverage"]  # [L, H, T]
    return np.concatenate([cov.mean(axis=1), cov[:1, 0]])


def main(run: str) -> None:
    module, dm, _ = load_run(run)
    ranges = target_ranges(dm.targets)
    split = {}
    for stage in ("val", "test"):
        oracle = E.oracle_forecasts(dm, dm.target_rows(stage))
        if oracle is None:
            sys.exit(f"error: {run}: its data has no oracle sidecar (synthetic data only)")
        split[stage] = {"oracle": oracle, "model": E.predict_raw(module, dm, stage), "y": E.step_targets(dm, stage),
                        "hist": E.target_history(dm, dm.starts[stage])}  # fmt: skip
    val, test = split["val"], split["test"]
    ratio = np.abs(test["y"] - test["oracle"]).mean(axis=(0, 1)) / np.abs(val["y"] - val["oracle"]).mean(axis=(0, 1))
    print(f"{run}: {len(val['y'])} validation / {len(test['y'])} test windows, horizon {val['y'].shape[1]}")
    ratios = ", ".join(f"{t} {r:.3f}" for t, r in zip(dm.targets, ratio, strict=True))
    print(f"oracle |residual| test / validation: {ratios}")
    segment = dm.segment_of_row[dm.target_rows("val")]
    for who in ("oracle", "model"):
        kinds = ("plain", "volatility", "fitted", "quantile")
        flags = {name: (name == "volatility", ranges, name == "fitted", name == "quantile") for name in kinds}
        rows = {name: I.calibrate(val[who], val["y"], val["hist"], LEVELS, *flags[name]) for name in kinds}
        rows["chosen"] = I.choose(val[who], val["y"], val["hist"], LEVELS, True, segment, ranges)[0]
        # Calibrated on each link's later half of validation only: the stretch nearest the test split.
        late = ~I.earlier_half(segment)
        for name in kinds:
            cal = I.calibrate(val[who][late], val["y"][late], val["hist"][late], LEVELS, *flags[name])
            rows[f"{name}, later half"] = cal
        for name, cal in rows.items():
            cov = coverage(cal, test[who], test["hist"], test["y"], ranges)
            cells = " | ".join(f"{t} {a:.1f} / {b:.1f} (step 1 {c:.1f})"
                               for t, a, b, c in zip(dm.targets, *cov, strict=True))  # fmt: skip
            print(f"{who:6s} {name:22s} 80 / 95 % (step 1 at 80 %): {cells}")


if __name__ == "__main__":
    main(sys.argv[1])

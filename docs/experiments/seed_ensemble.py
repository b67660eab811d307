"""What averaging the forecasts of several runs (seeds) of one config buys: RMSE and MAE of each run and of their mean.

Not part of the package and not tested: the check behind docs/real_traces.md ("The average of the recipe's three
seeds' forecasts"). Every run must be a fit of the same config and data (only the seeds differ), so that their
validation and test windows are the same rows in the same order; the script refuses runs whose targets differ.
Forecasts are the package's own (``evaluate.predict_raw``: blended, clipped, original units), pooled over steps
and targets.

    PYTHONPATH=. python docs/experiments/seed_ensemble.py RUN_A RUN_B RUN_C
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from dwcp_lstm import evaluate as E
from dwcp_lstm.runs import load_run


def main(runs: list[str]) -> None:
    torch.set_num_threads(1)
    forecasts: dict[str, list[np.ndarray]] = {"val": [], "test": []}
    actual: dict[str, np.ndarray] = {}
    for run in runs:
        module, dm, _ = load_run(run)
        for stage, kept in forecasts.items():
            y = E.step_targets(dm, stage)
            if stage in actual and not np.array_equal(actual[stage], y):
                sys.exit(f"error: {run}: its {stage} windows differ from the first run's; fit the same config and data")
            actual[stage] = y
            kept.append(E.predict_raw(module, dm, stage))
    for stage, kept in forecasts.items():
        y = actual[stage]
        each = [float(np.sqrt(((p - y) ** 2).mean())) for p in kept]
        mean = np.mean(kept, axis=0)
        print(
            f"{stage}: RMSE of each run {', '.join(f'{e:.4f}' for e in each)} (their mean {np.mean(each):.4f}); "
            f"of the averaged forecast {np.sqrt(((mean - y) ** 2).mean()):.4f}, MAE {np.abs(mean - y).mean():.4f}"
        )


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: seed_ensemble.py RUN RUN [RUN ...]")
    main(sys.argv[1:])

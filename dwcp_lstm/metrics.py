"""Forecast metrics per target, in original units, built on torchmetrics.

MAPE near zero: the mean of ``|y - p| / |y|`` over the rows where ``|y| > floor`` only (``floor`` = 0 by default, so
exact zeros are skipped). torchmetrics' own MAPE divides by ``max(|y|, 1.17e-6)`` instead, so a single zero target
adds ~1e6 % and swamps the mean; neuralforecast drops such terms to 0, which flatters the model. Skipping them keeps
MAPE the average relative error of the rows where it is defined; WAPE (``sum |y - p| / sum |y|``) and MAE are the
figures to trust on series with many zeros (real throughput traces idle at 0).

Relative errors, the form papers report: ``rmse_over_mean`` = RMSE / |mean of y| and ``mae_over_mean`` = MAE /
|mean of y|, with the mean taken over the same rows as the error (in the report: the split's targets; for a baseline
that covers some windows only, those windows). Unitless, so comparable across targets and sources; NaN when the mean
is 0. For a target that is never negative, MAE / mean equals WAPE.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.regression import (
    MeanAbsoluteError,
    MeanSquaredError,
    PearsonCorrCoef,
    R2Score,
    WeightedMeanAbsolutePercentageError,
)

METRICS = ("mae", "rmse", "mape", "wape", "r2", "correlation", "rmse_over_mean", "mae_over_mean")


class MaskedMAPE(Metric):
    """Mean absolute percentage error (in %) over targets with ``|y| > floor``; NaN when no target qualifies.

    Example:
        >>> m = MaskedMAPE()
        >>> m.update(torch.tensor([110.0, 5.0]), torch.tensor([100.0, 0.0]))  # the zero target is skipped
        >>> round(float(m.compute()), 3)
        10.0
    """

    is_differentiable = True
    higher_is_better = False
    full_state_update = False

    def __init__(self, floor: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.floor = floor
        self.add_state("sum_rel", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        keep = target.abs() > self.floor
        rel = (preds[keep] - target[keep]).abs().double() / target[keep].abs().double()
        self.sum_rel += rel.sum()
        self.count += keep.sum()

    def compute(self) -> torch.Tensor:
        if self.count == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return 100.0 * self.sum_rel / self.count


class MeanNormalizedError(Metric):
    """RMSE (``kind="rmse"``) or MAE (``kind="mae"``) divided by |mean of the targets|, from summed states (so that
    batches and DDP ranks add up exactly); NaN without rows or when the mean is 0.

    Example:
        >>> m = MeanNormalizedError("mae")
        >>> m.update(torch.tensor([11.0, 18.0]), torch.tensor([10.0, 20.0]))  # MAE 1.5, mean 15
        >>> round(float(m.compute()), 3)
        0.1
    """

    is_differentiable = True
    higher_is_better = False
    full_state_update = False

    def __init__(self, kind: str, **kwargs) -> None:
        super().__init__(**kwargs)
        if kind not in ("rmse", "mae"):
            raise ValueError(f"kind must be rmse or mae, got {kind!r}")
        self.kind = kind
        for name in ("sum_error", "sum_target"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        e = (preds.double() - target.double()).abs()
        self.sum_error += (e * e if self.kind == "rmse" else e).sum()
        self.sum_target += target.double().sum()
        self.count += target.numel()

    def compute(self) -> torch.Tensor:
        mean = self.sum_target / self.count if self.count > 0 else torch.tensor(0.0, dtype=torch.float64)
        if mean == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        error = self.sum_error / self.count
        return (error.sqrt() if self.kind == "rmse" else error) / mean.abs()


def target_metrics(mape_floor: float = 0.0, sync: bool = True) -> MetricCollection:
    """The metrics of one target (scalar inputs [N], names in :data:`METRICS`); ``sync=False`` computes on this
    process's data only."""
    kw = {"sync_on_compute": sync}
    return MetricCollection(
        {
            "mae": MeanAbsoluteError(**kw),
            "rmse": MeanSquaredError(squared=False, **kw),
            "mape": MaskedMAPE(floor=mape_floor, **kw),
            "wape": WeightedMeanAbsolutePercentageError(**kw),
            "r2": R2Score(**kw),
            "correlation": PearsonCorrCoef(**kw),
            "rmse_over_mean": MeanNormalizedError("rmse", **kw),
            "mae_over_mean": MeanNormalizedError("mae", **kw),
        },
        compute_groups=False,  # WAPE's and MAE's states look alike but must not be shared
    ).set_dtype(torch.float64)  # float32 states lose ~1e-7 in Pearson and R2 over many batches


class ForecastMetrics(torch.nn.Module):
    """One :func:`target_metrics` collection per target; ``compute`` returns ``{target: {metric: float}}``.

    ``update`` takes predictions and targets in original units, [N, T].
    """

    def __init__(self, target_names: Sequence[str], mape_floor: float = 0.0, sync: bool = True) -> None:
        super().__init__()
        self.target_names = list(target_names)
        self.per_target = torch.nn.ModuleList(target_metrics(mape_floor, sync) for _ in self.target_names)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        for j, m in enumerate(self.per_target):
            m.update(preds[:, j].double(), target[:, j].double())  # float64: R2 and Pearson on large values

    def compute(self) -> dict[str, dict[str, float]]:
        """``{target: {metric: value}}``; NaN where a metric is undefined on the data: R2 and correlation of a target
        that never changes (torchmetrics returns 0 for R2 there; R2 is computed from R2Score's sums, below), WAPE of
        a target that is 0 throughout (torchmetrics divides by an epsilon and returns ~1e7), MAPE when no target
        exceeds the floor, the relative errors when the targets' mean is 0."""
        out = {}
        for name, m in zip(self.target_names, self.per_target, strict=True):
            # each metric on its own: R2Score.compute() raises on fewer than 2 rows (a link with one test window
            # ended the report in a traceback after the training) and is replaced from its sums below
            values = {k: float(m[k].compute()) if k != "r2" else math.nan for k in sorted(METRICS)}  # as before
            r2 = m["r2"]
            n, sum_sq, total = float(r2.total), float(r2.sum_squared_error), float(r2.sum_error)
            tss = sum_sq - total * total / n if n > 0 else 0.0
            if n < 2 or tss <= 1e-12 * sum_sq:  # no variance in the target
                values["r2"] = values["correlation"] = math.nan
            else:  # from R2Score's own sums: its compute() returns exactly 1 where the squared errors sum to less
                # than an absolute 1e-4 (and 0 where the targets' do), whatever the units: a loss rate's R2 of 0.992
                # on 450 windows read 1.0 (found by an audit against numpy)
                values["r2"] = 1.0 - float(r2.residual) / tss
            if float(m["wape"].sum_scale) == 0.0:
                values["wape"] = math.nan
            out[name] = values
        return out

    def reset(self) -> None:
        for m in self.per_target:
            m.reset()


def summarize(per_target: dict[str, dict[str, float]], target_corr: float = 0.98, target_mape: float = 5.0) -> dict:
    """Means over targets plus the original project's accuracy figure and target check.

    A metric undefined for a target (NaN, see :meth:`ForecastMetrics.compute`) is left out of its mean, and the
    target is listed under ``undefined``; a metric undefined for every target has a NaN mean.
    """
    avg, undefined = {}, {}
    for k in METRICS:
        values = [m[k] for m in per_target.values()]
        defined = [v for v in values if not math.isnan(v)]
        avg[k] = sum(defined) / len(defined) if defined else math.nan
        missing = [t for t, m in per_target.items() if math.isnan(m[k])]
        if missing:
            undefined[k] = missing
    corr, mape = avg["correlation"], avg["mape"]
    return {
        "average_correlation": corr,
        "average_mape": mape,
        "accuracy_percent": 100.0 * corr,
        "target_met": bool(corr >= target_corr and mape < target_mape),
        **{f"average_{k}": v for k, v in avg.items() if k not in ("correlation", "mape")},
        "undefined": undefined,
    }


def compute_metrics(preds: torch.Tensor, target: torch.Tensor, target_names: Sequence[str], mape_floor: float = 0.0):
    """All metrics of a whole prediction array at once (the report and the baselines use this; rank zero alone under
    DDP, so nothing is synced)."""
    m = ForecastMetrics(target_names, mape_floor, sync=False)
    m.update(torch.as_tensor(preds), torch.as_tensor(target))
    return m.compute()

"""The report's figures (matplotlib): written as PNG into the run directory."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt  # no backend forced: headless matplotlib picks Agg itself, notebooks keep theirs
import numpy as np

from dwcp_lstm.tables import atomic_path, first_line, log

FILES = (
    "training_history.png",
    "predictions_scatter.png",
    "timeseries.png",
    "error_distribution.png",
    "baselines.png",
    "horizon.png",
    "reliability.png",
    "planner.png",
)


def write_all(
    run_dir: Path, dm, y, pred, base_preds: dict, oracle, report: dict, plan_points: list | None = None
) -> dict[str, plt.Figure]:
    """Write every figure; return them too (TensorBoard logs the same figures as images).

    A figure is an extra, not the result: one that cannot be drawn or written (odd data, a full disk) is skipped with
    a warning, and the report (written after the plots) still comes out."""
    makers = {
        "training_history.png": lambda: training_history(run_dir),
        "predictions_scatter.png": lambda: scatter(y, pred, dm.targets, report["per_target"]),
        "timeseries.png": lambda: timeseries(dm, y, pred, base_preds["persistence"][0]),
        "error_distribution.png": lambda: errors(y, pred, dm.targets),
        "baselines.png": lambda: comparison(report, dm.targets),
        "horizon.png": lambda: horizon_errors(report, dm.targets),
        "reliability.png": lambda: reliability(report, dm.targets),
        "planner.png": lambda: planner_backtest(report, plan_points or []),
    }
    figs = {}
    for name, make in makers.items():
        fig = None
        try:
            fig = make()
            if fig is not None:
                with atomic_path(run_dir / name) as tmp:
                    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
                figs[name] = fig
        except Exception as exc:  # noqa: BLE001 (any failure of an optional figure)
            log.warning("%s: %s skipped (%s: %s)", run_dir, name, type(exc).__name__, first_line(exc))
            if (run_dir / name).is_file() and not (run_dir / name).is_symlink():  # an earlier report's figure:
                (run_dir / name).unlink()  # report.md would show it beside the new figures
        finally:
            if fig is not None:
                plt.close(fig)
    return figs


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """All scalars of a run's TensorBoard event files: ``{tag: [(step, value), ...]}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(Path(run_dir).glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def training_history(run_dir: Path) -> plt.Figure | None:
    scalars = read_scalars(run_dir)
    if "val_loss" not in scalars:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for tag, label in (("train_loss_epoch", "train"), ("val_loss", "validation")):
        values = [v for _, v in scalars.get(tag, [])]
        if values:
            ax.plot(np.arange(1, len(values) + 1), values, label=label, marker="." if len(values) < 30 else None)
    ax.set(xlabel="epoch", ylabel="MSE (scaled targets)", title="Training history", yscale="log")
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def scatter(y: np.ndarray, pred: np.ndarray, targets: list[str], per_target: dict) -> plt.Figure:
    n = len(targets)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 4), squeeze=False)
    for j, (t, ax) in enumerate(zip(targets, axes[0], strict=True)):
        ax.scatter(y[:, j], pred[:, j], s=3, alpha=0.4)
        lo, hi = float(min(y[:, j].min(), pred[:, j].min())), float(max(y[:, j].max(), pred[:, j].max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        m = per_target[t]
        ax.set(xlabel=f"actual {t}", ylabel="predicted", title=f"{t}\nR2 {m['r2']:.4f}, corr {m['correlation']:.4f}")
    fig.suptitle("Test set: actual vs predicted")
    fig.tight_layout()
    return fig


def timeseries(dm, y: np.ndarray, pred: np.ndarray, persist: np.ndarray, links: int = 3, span: int = 200):
    """The first ``span`` test steps of up to ``links`` series: actual vs model vs persistence."""
    names = dm.series_names(dm.target_rows("test"))
    chosen = list(dict.fromkeys(names))[:links]
    n = len(dm.targets)
    fig, axes = plt.subplots(n, len(chosen), figsize=(5 * len(chosen), 2.4 * n), squeeze=False, sharex="col")
    for c, name in enumerate(chosen):
        idx = np.flatnonzero(names == name)[:span]
        for j, t in enumerate(dm.targets):
            ax = axes[j, c]
            ax.plot(y[idx, j], "k-", lw=1, label="actual")
            ax.plot(pred[idx, j], "C1-", lw=1, label="model")
            ax.plot(persist[idx, j], "C0:", lw=1, label="persistence")
            ax.set_ylabel(t)
            if j == 0:
                ax.set_title(str(name))
        axes[-1, c].set_xlabel("test step")
    axes[0, 0].legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig


def errors(y: np.ndarray, pred: np.ndarray, targets: list[str]) -> plt.Figure:
    n = len(targets)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.2), squeeze=False)
    for j, (t, ax) in enumerate(zip(targets, axes[0], strict=True)):
        err = pred[:, j] - y[:, j]
        ax.hist(err, bins=60, color="C2", alpha=0.8)
        ax.axvline(0, color="k", lw=1)
        ax.set(title=f"{t}: error (pred - actual)\nmean {err.mean():.3g}, sd {err.std():.3g}", xlabel=t)
    fig.tight_layout()
    return fig


def comparison(report: dict, targets: list[str]) -> plt.Figure:
    """RMSE of model, baselines and oracle per target, relative to persistence (lower is better)."""
    rows = {"model": report["per_target"], **{k: v["per_target"] for k, v in report["baselines"].items()}}
    if report.get("oracle"):
        rows["oracle"] = report["oracle"]["per_target"]
    names = list(rows)
    n = len(targets)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.6), squeeze=False)
    for t, ax in zip(targets, axes[0], strict=True):
        ref = rows["persistence"][t]["rmse"]
        vals = [rows[k][t]["rmse"] / ref if ref > 0 else np.nan for k in names]  # persistence exact: undefined
        colors = ["C1" if k == "model" else "C2" if k == "oracle" else "C0" for k in names]
        ax.barh(names, vals, color=colors)
        ax.axvline(1.0, color="k", lw=1, ls="--")
        ax.set(title=t, xlabel="RMSE / RMSE of persistence")
        ax.invert_yaxis()
    fig.tight_layout()
    return fig


def horizon_errors(report: dict, targets: list[str]) -> plt.Figure | None:
    """RMSE per horizon step of the model, every baseline and the oracle (multi-step runs only). The oracle is green
    as in the baselines figure, so the baselines take the other colours of the cycle."""
    steps = report.get("horizon")
    if not steps:
        return None
    n = len(targets)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.6), squeeze=False)
    h = np.arange(1, steps["steps"] + 1)
    colors = [f"C{i}" for i in range(10) if i != 2]
    for t, ax in zip(targets, axes[0], strict=True):
        for i, (name, errs) in enumerate(steps["baselines"].items()):
            ax.plot(h, errs[t]["rmse"], color=colors[i % len(colors)], lw=1, alpha=0.7, label=name)
        if steps.get("oracle"):
            ax.plot(h, steps["oracle"][t]["rmse"], color="C2", lw=2, ls="--", label="oracle")
        ax.plot(h, steps["model"][t]["rmse"], color="k", lw=2, label="model")
        ax.set(title=t, xlabel="horizon step", ylabel="RMSE")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def reliability(report: dict, targets: list[str]) -> plt.Figure | None:
    """Nominal vs empirical coverage of the conformal intervals on the test split, per target."""
    iv = report.get("intervals")
    if not iv:
        return None
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    nominal = np.asarray(iv["reliability"]["nominal"])
    ax.plot([0, 1], [0, 1], color="k", lw=1, ls="--")
    for t in targets:
        ax.plot(nominal, iv["reliability"]["empirical"][t], marker="o", ms=3, label=t)
    ax.set(xlabel="nominal coverage", ylabel="test coverage", title="Reliability", xlim=(0.45, 1), ylim=(0.45, 1))
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def planner_backtest(report: dict, points: list) -> plt.Figure | None:
    """Predicted vs realised migration time on the test split, per VM size (no dirtying): the median plan and the
    plan at the backtest's confidence, with the diagonal where they would be exact."""
    plan = report.get("planner") or {}
    runs = [(r, p) for r, p in zip(plan.get("runs", []), points, strict=False) if r["dirty_rate_mbps"] == 0]
    runs = [(r, p) for r, p in runs if r["migrations"] > 0]
    if not runs:
        return None
    fig, axes = plt.subplots(1, len(runs), figsize=(3.6 * len(runs), 3.6), squeeze=False)
    for (r, (real, med, conf)), ax in zip(runs, axes[0], strict=True):
        k = slice(None, None, max(1, len(real) // 1500))  # a readable scatter
        ax.scatter(real[k] / 60, med[k] / 60, s=4, alpha=0.5, label="median plan")
        ax.scatter(real[k] / 60, conf[k] / 60, s=4, alpha=0.5, label=f"{100 * plan['confidence']:g} % plan")
        top = np.nanmax(np.r_[real, med[np.isfinite(med)], conf[np.isfinite(conf)]]) / 60
        ax.plot([0, top], [0, top], color="k", lw=1, ls="--")
        ax.set(xlabel="realised time (min)", ylabel="planned time (min)",
               title=f"{r['memory_gib']:g} GiB: {100 * r['model']['coverage']:.1f} % done by the plan")  # fmt: skip
    axes[0][0].legend(fontsize=7, markerscale=3)
    fig.tight_layout()
    return fig

"""The test-set evaluation of a run: model vs baselines vs oracle, ``report.json``, ``report.md`` and plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dwcp_lstm import baselines as B
from dwcp_lstm import plots, synthetic
from dwcp_lstm.bench import percentile_ms, time_calls
from dwcp_lstm.contract import METADATA_NAME, model_path_of
from dwcp_lstm.metrics import METRICS, compute_metrics, summarize
from dwcp_lstm.tables import atomic_write, sha256_of

TARGET_CORR, TARGET_MAPE, TARGET_GAP = 0.98, 5.0, 0.9
# The real-trace goal: beat these on both RMSE and MAE (window_mean is the moving average).
GOAL_BASELINES = ("persistence", "harmonic_mean_5", "window_mean", "ridge")


def predict_raw(module, dm, stage: str = "test") -> np.ndarray:
    """Model forecasts in original units [N, T] for a split's windows, in loader order."""
    module = module.cpu().eval()
    out = []
    with torch.no_grad():
        for x, _ in dm.loader(stage):
            out.append(module.unscale(module(x), x).double().numpy())
    return np.concatenate(out) if out else np.empty((0, dm.n_targets))


def target_history(dm, starts: np.ndarray) -> np.ndarray:
    """Raw target values of each window's rows [N, W, T]."""
    return dm.windows(dm.raw_targets, starts)


def scaled_windows(dm, starts: np.ndarray) -> np.ndarray:
    """Scaled input windows [N, W, F] (materialised: callers subsample first)."""
    return dm.windows(dm.datasets["train"].x.numpy(), starts)


def oracle_forecasts(dm, target_rows: np.ndarray) -> np.ndarray | None:
    """The generator's oracle for each target row, from the sidecar next to the data file (None if absent)."""
    path = synthetic.oracle_path(dm.path)
    keys = [*dm.series_columns, dm.time_column]
    if not path.exists():
        return None
    oracle = pd.read_csv(path) if path.suffix.lower() == ".csv" else pd.read_parquet(path)
    if not set(keys) <= set(oracle.columns):
        return None
    cols = [f"oracle_{t}" for t in dm.targets]
    if not set(cols) <= set(oracle.columns):
        return None
    # The oracle at the window's last input row forecasts the target row.
    last = dm.frame_keys.iloc[target_rows - 1][keys].reset_index(drop=True)
    for k in dm.series_columns:
        last[k], oracle[k] = last[k].astype(str), oracle[k].astype(str)
    merged = last.merge(oracle[[*keys, *cols]], on=keys, how="left")
    values = merged[cols].to_numpy(np.float64)
    return None if np.isnan(values).any() else values


def fit_baselines(dm) -> tuple[B.RidgeBaseline, B.BoostingBaseline, np.ndarray]:
    """Ridge, boosted trees and the EWMA alpha, fit on (at most 100,000 evenly spaced) training windows."""
    train_starts = dm.starts["train"]
    pick = train_starts[B._even_subset(len(train_starts), 100_000)]
    train_hist, train_y = target_history(dm, pick), dm.raw_targets[pick + dm.window_size]
    ts = dm.target_scaler
    x_train = scaled_windows(dm, pick)
    ridge = B.RidgeBaseline().fit(x_train, (train_y - ts.mean_) / ts.scale_)
    gbt = B.BoostingBaseline().fit(x_train, (train_y - ts.mean_) / ts.scale_)
    return ridge, gbt, B.fit_ewma_alpha(train_hist, train_y)


def run_baselines(dm, y: np.ndarray, mape_floor: float, stage: str = "test", fitted=None) -> tuple[dict, dict]:
    """Forecasts and metrics of every baseline on a split's windows; ``fitted`` (from :func:`fit_baselines`) is
    reused when given, so that the test and validation comparisons share one fit."""
    starts, rows = dm.starts[stage], dm.target_rows(stage)
    hist = target_history(dm, starts)
    ridge, gbt, alpha = fitted if fitted is not None else fit_baselines(dm)
    ts = dm.target_scaler
    x_test = scaled_windows(dm, starts)
    forecasts = {
        "persistence": (B.persistence(hist), None),
        "seasonal_naive": B.seasonal_naive(dm.raw_targets, dm.timestamps.astype(np.float64), dm.segment_of_row, rows),
        "window_mean": (B.window_mean(hist), None),
        "ewma": (B.ewma(hist, alpha), None),
        "harmonic_mean_5": (B.harmonic_mean(hist), None),
        "ridge": (ridge.predict(x_test) * ts.scale_ + ts.mean_, None),
        "gbt": (gbt.predict(x_test) * ts.scale_ + ts.mean_, None),
    }
    notes = {
        "persistence": "last value of the window",
        "seasonal_naive": "value 24 h before the target in the same series (only windows where that row exists)",
        "window_mean": f"mean of the {dm.window_size}-row window",
        "ewma": "exponentially weighted mean, alpha per target fitted on training windows: "
        + ", ".join(f"{t}={a:g}" for t, a in zip(dm.targets, alpha, strict=True)),
        "harmonic_mean_5": "harmonic mean of the last 5 values (0 if any of them is 0)",
        "ridge": f"RidgeCV on the flattened scaled window (alpha {ridge.model.alpha_:g}), fit on training windows",
        "gbt": "HistGradientBoosting per target on last-step, mean, min, max and slope of each feature",
    }
    results, preds = {}, {}
    for name, (p, mask) in forecasts.items():
        m = np.ones(len(y), dtype=bool) if mask is None else mask
        if not m.any():
            continue
        per_target = compute_metrics(p[m], y[m], dm.targets, mape_floor)
        results[name] = {
            "per_target": per_target,
            "overall": summarize(per_target, TARGET_CORR, TARGET_MAPE),
            "windows": int(m.sum()),
            "note": notes[name],
        }
        preds[name] = (p, m)
    return results, preds


def evaluate(module, dm, run_dir: str | Path, checkpoint: str | None = None) -> dict:
    """Evaluate on the test split, write ``report.json``, ``report.md`` and the plots into ``run_dir``."""
    run_dir = Path(run_dir)
    mape_floor = float(module.hparams.get("mape_floor", 0.0))
    rows = dm.target_rows("test")
    y = dm.raw_targets[rows]
    pred = predict_raw(module, dm)
    per_target = compute_metrics(pred, y, dm.targets, mape_floor)
    report: dict = {
        "run_dir": str(run_dir),
        "checkpoint": checkpoint,
        "split": "test",
        "windows": len(y),
        "per_target": per_target,
        "overall": summarize(per_target, TARGET_CORR, TARGET_MAPE),
    }
    fitted = fit_baselines(dm)
    base, base_preds = run_baselines(dm, y, mape_floor, "test", fitted)
    report["baselines"] = base
    oracle = oracle_forecasts(dm, rows)
    if oracle is not None:
        o_metrics = compute_metrics(oracle, y, dm.targets, mape_floor)
        report["oracle"] = {"per_target": o_metrics, "overall": summarize(o_metrics, TARGET_CORR, TARGET_MAPE)}
    else:
        report["oracle"] = None
    mse = {"model": B.mse(pred, y)}
    for name, (p, m) in base_preds.items():
        mse[name] = B.mse(p[m], y[m])
        if not m.all():
            mse[f"model_on_{name}_windows"] = B.mse(pred[m], y[m])
    if oracle is not None:
        mse["oracle"] = B.mse(oracle, y)
    report["mse"] = {k: dict(zip(dm.targets, map(float, v), strict=True)) for k, v in mse.items()}
    report["skill"] = dict(zip(dm.targets, map(float, B.skill(mse["model"], mse["persistence"])), strict=True))
    report["gap_closed"] = (
        dict(zip(dm.targets, map(float, B.gap_closed(mse["model"], mse["persistence"], mse["oracle"])), strict=True))
        if oracle is not None
        else None
    )
    report["head_to_head"] = head_to_head(pred, y, base_preds, dm.targets)
    report["validation"] = validation_head_to_head(module, dm, mape_floor, fitted)
    report["per_link"] = per_link(dm, rows, pred, y, base_preds["persistence"][0], mape_floor)
    report["checks"] = checks(report, mse, dm.targets)
    report["data"] = {
        "path": str(dm.path.resolve()),
        "sha256": sha256_of(dm.path),
        "rows": len(dm.raw_targets),
        "series": len(dm.bounds),
    }
    config = run_dir / "config.yaml"
    report["config"] = config.read_text() if config.exists() else None
    report["onnx"] = onnx_facts(run_dir, dm)
    plots.write_all(run_dir, dm, y, pred, base_preds, oracle, report)
    atomic_write(run_dir / "report.json", json.dumps(finite_or_null(report), indent=2, default=_json_default))
    atomic_write(run_dir / "report.md", markdown(report, dm.targets))
    return report


def per_link(dm, rows, pred, y, persist, mape_floor: float) -> dict:
    names = dm.series_names(rows)
    out = {}
    for name in pd.unique(names):
        m = names == name
        metrics = compute_metrics(pred[m], y[m], dm.targets, mape_floor)
        for j, t in enumerate(dm.targets):
            mse_p = float(((persist[m, j] - y[m, j]) ** 2).mean())
            metrics[t]["skill"] = 1.0 - float(((pred[m, j] - y[m, j]) ** 2).mean()) / mse_p if mse_p > 0 else None
        out[str(name)] = {"windows": int(m.sum()), **metrics}
    return out


def head_to_head(pred: np.ndarray, y: np.ndarray, base_preds: dict, targets: list[str]) -> dict:
    """Per target and baseline: model and baseline RMSE and MAE on the windows the baseline covers.

    ``rmse_change`` and ``mae_change`` are relative (model / baseline - 1; negative = the model is better);
    ``beats`` needs both strictly better.
    """
    out: dict = {t: {} for t in targets}
    for name, (p, m) in base_preds.items():
        for j, t in enumerate(targets):
            e_model, e_base = pred[m, j] - y[m, j], p[m, j] - y[m, j]
            rm, rb = float(np.sqrt(np.mean(e_model**2))), float(np.sqrt(np.mean(e_base**2)))
            am, ab = float(np.mean(np.abs(e_model))), float(np.mean(np.abs(e_base)))
            out[t][name] = {
                "model_rmse": rm,
                "rmse": rb,
                "rmse_change": rm / rb - 1 if rb > 0 else None,
                "model_mae": am,
                "mae": ab,
                "mae_change": am / ab - 1 if ab > 0 else None,
                "beats": bool(rm < rb and am < ab),
            }
    return out


def validation_head_to_head(module, dm, mape_floor: float, fitted=None) -> dict | None:
    """The same comparison on the validation split: where settings (loss, window, epochs) get chosen, so that the
    test split stays an untouched verdict."""
    if len(dm.starts["val"]) == 0:
        return None
    y = dm.raw_targets[dm.target_rows("val")]
    pred = predict_raw(module, dm, "val")
    _, base_preds = run_baselines(dm, y, mape_floor, "val", fitted)
    return {
        "windows": len(y),
        "per_target": compute_metrics(pred, y, dm.targets, mape_floor),
        "head_to_head": head_to_head(pred, y, base_preds, dm.targets),
    }


def checks(report: dict, mse: dict, targets: list[str]) -> dict:
    """The original project's targets and this project's goals, as booleans with the figures behind them."""
    ov = report["overall"]
    beats = {
        t: all(
            mse.get(f"model_on_{name}_windows", mse["model"])[j] < mse[name][j]
            for name in report["baselines"]
            if name in mse
        )
        for j, t in enumerate(targets)
    }
    out = {
        "average_correlation_ge_0.98": bool(ov["average_correlation"] >= TARGET_CORR),
        "average_mape_lt_5": bool(ov["average_mape"] < TARGET_MAPE),
        "target_met": ov["target_met"],
        "beats_every_baseline_on_mse": beats,
        "beats_goal_baselines_on_rmse_and_mae": {
            t: all(h["beats"] for name, h in report["head_to_head"][t].items() if name in GOAL_BASELINES)
            for t in targets
        },
    }
    if report["gap_closed"] is not None:
        out["gap_closed_ge_0.9"] = {t: bool(v >= TARGET_GAP) for t, v in report["gap_closed"].items()}
    return out


def onnx_facts(run_dir: Path, dm, runs: int = 300) -> dict | None:
    """Parity (from the metadata), file size and measured onnxruntime batch-1 latency of the run's model.onnx."""
    path, meta_path = model_path_of(run_dir), run_dir / METADATA_NAME
    if not path.exists() or not meta_path.exists():
        return None
    import onnxruntime as ort

    meta = json.loads(meta_path.read_text())
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    x = dm.windows(dm.raw_features, dm.starts["test"][:1]).astype(np.float32)  # [1, W, F]
    feed = {sess.get_inputs()[0].name: x}
    time_calls(lambda: sess.run(None, feed), 20)  # warm-up
    ns = time_calls(lambda: sess.run(None, feed), runs)
    return {
        "file_mb": path.stat().st_size / 1e6,
        "sha256_matches_metadata": sha256_of(path) == meta.get("model_sha256"),
        "parity_max_rel": meta.get("parity", {}).get("max_rel_diff"),
        "parity_max_abs": meta.get("parity", {}).get("max_abs_diff"),
        "b1_p50_ms": percentile_ms(ns, 50),
        "b1_p99_ms": percentile_ms(ns, 99),
        "opset": meta.get("opset"),
    }


def finite_or_null(o):
    """NaN and inf as null: JSON has no NaN (``json.dumps`` would write a token other parsers reject). A metric that
    is undefined on the data (the correlation of a target that never changes) is reported as null."""
    if isinstance(o, dict):
        return {k: finite_or_null(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [finite_or_null(v) for v in o]
    if isinstance(o, float | np.floating) and not np.isfinite(o):
        return None
    return o


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


def _fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def markdown(report: dict, targets: list[str]) -> str:
    """A readable evaluation report; every figure comes from ``report``."""
    ov, ck = report["overall"], report["checks"]
    lines = [
        "# Evaluation report",
        "",
        f"Run `{report['run_dir']}`, checkpoint `{report['checkpoint']}`, {report['windows']} test windows; "
        f"data `{report['data']['path']}` (sha256 `{report['data']['sha256'][:16]}…`, {report['data']['rows']} rows, "
        f"{report['data']['series']} series).",
        "",
        "## Summary",
        "",
        "| check | value | met |",
        "|---|---|---|",
        f"| mean Pearson correlation >= 0.98 | {ov['average_correlation']:.4f} | "
        f"{_fmt(ck['average_correlation_ge_0.98'])} |",
        f"| mean MAPE < 5 % | {ov['average_mape']:.2f} % | {_fmt(ck['average_mape_lt_5'])} |",
        f"| beats every baseline on MSE, every target | "
        f"{sum(ck['beats_every_baseline_on_mse'].values())}/{len(targets)} targets | "
        f"{_fmt(all(ck['beats_every_baseline_on_mse'].values()))} |",
        f"| beats persistence, harmonic mean, moving average and ridge on RMSE and MAE | "
        f"{sum(ck['beats_goal_baselines_on_rmse_and_mae'].values())}/{len(targets)} targets | "
        f"{_fmt(all(ck['beats_goal_baselines_on_rmse_and_mae'].values()))} |",
    ]
    if report["gap_closed"] is not None:
        gaps = report["gap_closed"]
        lines.append(
            f"| gap closed >= 0.9, every target | min {min(gaps.values()):.3f} | "
            f"{_fmt(all(ck['gap_closed_ge_0.9'].values()))} |"
        )
    lines += [
        f"\nAccuracy (100 x mean correlation): **{ov['accuracy_percent']:.2f} %**.",
        "",
        "## Model, per target",
        "",
    ]
    lines += _metric_table({t: report["per_target"][t] for t in targets})
    lines += ["", "## Model vs baselines vs oracle (RMSE, original units)", ""]
    rows = {"model": report["per_target"], **{k: v["per_target"] for k, v in report["baselines"].items()}}
    if report["oracle"] is not None:
        rows["oracle"] = report["oracle"]["per_target"]
    lines += ["| forecaster | " + " | ".join(targets) + " | mean corr | mean MAPE % |",
              "|---" * (len(targets) + 3) + "|"]  # fmt: skip
    for name, pt in rows.items():
        avg = summarize(pt)
        cells = " | ".join(_fmt(pt[t]["rmse"]) for t in targets)
        lines.append(f"| {name} | {cells} | {avg['average_correlation']:.4f} | {avg['average_mape']:.2f} |")
    lines += ["", "Baselines: " + "; ".join(f"**{k}**: {v['note']} ({v['windows']} windows)"
                                           for k, v in report["baselines"].items())]  # fmt: skip
    lines += [
        "",
        "## Head to head: RMSE and MAE on each baseline's windows",
        "",
        "| target | baseline | model RMSE | baseline RMSE | change | model MAE | baseline MAE | change | beats both |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in targets:
        for name, h in report["head_to_head"][t].items():
            lines.append(
                f"| {t} | {name} | {_fmt(h['model_rmse'])} | {_fmt(h['rmse'])} | {_pct(h['rmse_change'])} | "
                f"{_fmt(h['model_mae'])} | {_fmt(h['mae'])} | {_pct(h['mae_change'])} | {_fmt(h['beats'])} |"
            )
    if report.get("validation"):
        val = report["validation"]
        lines += ["", f"The same on the validation split ({val['windows']} windows), where settings are chosen:", "",
                  "| target | baseline | RMSE change | MAE change | beats both |", "|---|---|---|---|---|"]  # fmt: skip
        for t in targets:
            for name, h in val["head_to_head"][t].items():
                change = f"{_pct(h['rmse_change'])} | {_pct(h['mae_change'])}"
                lines.append(f"| {t} | {name} | {change} | {_fmt(h['beats'])} |")
    lines += [
        "",
        "## Skill and the ceiling",
        "",
        "| target | skill vs persistence | gap closed to oracle |",
        "|---|---|---|",
    ]
    for t in targets:
        gap = report["gap_closed"][t] if report["gap_closed"] is not None else None
        lines.append(f"| {t} | {_fmt(report['skill'][t])} | {_fmt(gap)} |")
    lines += [
        "",
        "skill = 1 - MSE_model / MSE_persistence; gap closed = (MSE_persistence - MSE_model) / "
        "(MSE_persistence - MSE_oracle). The oracle is the generator's Bayes-optimal forecast from its latent state "
        + ("(available for this data)." if report["oracle"] is not None else "(not available: not synthetic data)."),
        "",
        "## Per link (model)",
        "",
        "| link | windows | " + " | ".join(f"{t} RMSE | {t} skill" for t in targets) + " |",
        "|---" * (2 + 2 * len(targets)) + "|",
    ]
    for link, m in report["per_link"].items():
        cells = " | ".join(f"{_fmt(m[t]['rmse'])} | {_fmt(m[t]['skill'])}" for t in targets)
        lines.append(f"| {link} | {m['windows']} | {cells} |")
    lines += ["", "## Plots", ""]
    lines += [f"![{p}]({p})" for p in plots.FILES if (Path(report["run_dir"]) / p).exists()]
    lines += ["", "## Production readiness", ""]
    onnx = report["onnx"]
    if onnx is None:
        lines.append("No model.onnx in this run.")
    else:
        lines += [
            "| item | measured | goal | ok |",
            "|---|---|---|---|",
            f"| ONNX vs PyTorch, max relative difference | {onnx['parity_max_rel']:.2e} | <= 1e-4 | "
            f"{_fmt(onnx['parity_max_rel'] <= 1e-4)} |",
            f"| model.onnx size | {onnx['file_mb']:.2f} MB | <= 2.5 MB | {_fmt(onnx['file_mb'] <= 2.5)} |",
            f"| onnxruntime batch-1 latency p50 / p99 (1 thread) | "
            f"{onnx['b1_p50_ms']:.3f} / {onnx['b1_p99_ms']:.3f} ms | p50 <= 0.5 ms | "
            f"{_fmt(onnx['b1_p50_ms'] <= 0.5)} |",
            f"| sha256 matches metadata | {_fmt(onnx['sha256_matches_metadata'])} | yes | "
            f"{_fmt(onnx['sha256_matches_metadata'])} |",
            f"| opset | {onnx['opset']} | >= 17 | {_fmt((onnx['opset'] or 0) >= 17)} |",
        ]
    return "\n".join(lines) + "\n"


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:+.1f} %"


def _metric_table(per_target: dict) -> list[str]:
    out = ["| target | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for t, m in per_target.items():
        out.append(f"| {t} | " + " | ".join(_fmt(m[k]) for k in METRICS) + " |")
    return out

"""The test-set evaluation of a run: model vs baselines vs oracle, ``report.json``, ``report.md`` and plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dwcp_lstm import baselines as B
from dwcp_lstm import intervals as I
from dwcp_lstm import online as O
from dwcp_lstm import plots, synthetic
from dwcp_lstm.bench import percentile_ms, time_calls
from dwcp_lstm.contract import METADATA_NAME, model_path_of
from dwcp_lstm.errors import ConfigError, ModelFileError
from dwcp_lstm.metrics import METRICS, compute_metrics, summarize
from dwcp_lstm.planner import backtest_report, rows_ahead
from dwcp_lstm.tables import (
    DataError,
    atomic_write,
    clip_to,
    finite_or_null,
    first_line,
    log,
    sha256_of,
    target_ranges,
)

TARGET_CORR, TARGET_MAPE, TARGET_GAP = 0.98, 5.0, 0.9
TARGET_GAP_PER_STEP = 0.8  # the multi-step goal: this share of the persistence-to-oracle gap at every step
# The real-trace goal: beat these on both RMSE and MAE (window_mean is the moving average).
GOAL_BASELINES = ("persistence", "harmonic_mean_5", "window_mean", "ridge")


def predict_raw(module, dm, stage: str = "test", blend: bool = True, clip: bool = True) -> np.ndarray:
    """Model forecasts in original units [N, H, T] for a split's windows, in loader order (see
    ``DwcpForecaster.forecast`` for ``blend`` and ``clip``)."""
    module = module.eval()  # on its own device: the blend is fitted inside a test loop too (on_test_start)
    out = []
    with torch.no_grad():
        for x, _ in dm.loader(stage):
            out.append(module.forecast(x.to(module.device), clip=clip, blend=blend).double().cpu().numpy())
    return np.concatenate(out) if out else np.empty((0, dm.horizon, dm.n_targets))


def step_targets(dm, stage: str) -> np.ndarray:
    """The actual targets of a split's windows, every step: [N, H, T] (step h at row first target + h)."""
    return dm.raw_targets[dm.target_rows(stage)[:, None] + np.arange(dm.horizon)]


def target_history(dm, starts: np.ndarray) -> np.ndarray:
    """Raw target values of each window's rows [N, W, T]."""
    return dm.windows(dm.raw_targets, starts)


def scaled_windows(dm, starts: np.ndarray) -> np.ndarray:
    """Scaled input windows [N, W, F + C] as the network reads them, cyclic columns as sine and cosine
    (materialised: callers subsample first)."""
    x = dm.windows(dm.datasets["train"].x.numpy(), starts)
    if not dm.cyclic:
        return x
    with torch.no_grad():
        return dm.encoder()(torch.from_numpy(x)).numpy()


def oracle_forecasts(dm, target_rows: np.ndarray, steps: int | None = None) -> np.ndarray | None:
    """The generator's oracle for each window's first ``steps`` target rows (default: the data's horizon) [N, H, T],
    from the sidecar next to the data file: step 1 is ``oracle_<t>``, step h ``oracle_<t>_h<h>``, all taken at the
    window's last input row (the oracle at row r for step h forecasts row r + h). None when the sidecar, one of
    those columns or one of those rows is missing (a sidecar written before the h-step oracle has step 1 only). A
    sidecar that cannot be read, repeats a key or holds text is a DataError naming it (``fit`` reads it before
    training: at the end it cost the run its report)."""
    steps = dm.horizon if steps is None else steps
    path = synthetic.oracle_path(dm.path)
    keys = [*dm.series_columns, dm.time_column]
    cols = synthetic.oracle_columns(dm.targets, steps)
    if not path.exists():
        return None
    fix = "delete it (the report then has no oracle) or generate the data again"
    stamp = synthetic.DATA_HASH_COLUMN
    try:
        if path.suffix.lower() == ".csv":  # the header first: only the columns needed are parsed
            header = set(pd.read_csv(path, nrows=0).columns)
            if not {*keys, *cols} <= header:
                return None
            oracle = pd.read_csv(path, usecols=[*keys, *cols, *([stamp] if stamp in header else [])])
        else:
            oracle = pd.read_parquet(path)
            if not {*keys, *cols} <= set(oracle.columns):
                return None
    except (OSError, ValueError, ImportError) as exc:  # pandas' and pyarrow's parse errors are ValueErrors
        raise DataError(f"{path}: cannot read the oracle sidecar ({first_line(exc)[:200]}); {fix}") from None
    if stamp in oracle.columns:  # sidecars written before it have none: joined by keys alone, as before
        recorded, actual = str(oracle[stamp].iloc[0]) if len(oracle) else "", sha256_of(dm.path)
        if recorded != actual:
            raise DataError(f"{path}: the oracle sidecar belongs to other data (it records sha256 {recorded[:12]}..., "
                            f"{dm.path.name} is {actual[:12]}...); {fix}")  # fmt: skip
    repeated = np.flatnonzero(oracle.duplicated(keys).to_numpy())
    if len(repeated):
        raise DataError(f"{path}: row {repeated[0] + 1}: a (series, time) key repeated in the oracle sidecar; {fix}")
    for c in cols:
        values = pd.to_numeric(oracle[c], errors="coerce")
        bad = np.flatnonzero((values.isna() & oracle[c].notna()).to_numpy())
        if len(bad):
            raise DataError(f"{path}: column {c!r} row {bad[0] + 1}: not a number in the oracle sidecar; {fix}")
        oracle[c] = values
    last = dm.frame_keys.iloc[target_rows - 1][keys].reset_index(drop=True)
    for k in dm.series_columns:
        last[k], oracle[k] = last[k].astype(str), oracle[k].astype(str)
    merged = last.merge(oracle[[*keys, *cols]], on=keys, how="left")
    values = merged[cols].to_numpy(np.float64).reshape(len(last), steps, len(dm.targets))  # [N, H, T] step-major
    return None if np.isnan(values).any() else values


def training_sample(dm) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the fitted baselines learn from: (at most 100,000 evenly spaced) training window starts, their scaled
    windows [N, W, F + C] and their targets scaled by the model's target scaler [N, H * T] step-major (any fixed
    affine map of the targets would do: the model's keeps the scales comparable)."""
    pick = dm.starts["train"][B._even_subset(len(dm.starts["train"]), 100_000)]
    rows = pick + dm.window_size
    train_y = dm.raw_targets[rows[:, None] + np.arange(dm.horizon)].reshape(len(pick), -1)  # [N, H * T]
    ts = dm.target_scaler
    return pick, scaled_windows(dm, pick), (train_y - ts.mean_) / ts.scale_


def fit_baselines(dm) -> tuple[B.RidgeBaseline, B.BoostingBaseline, np.ndarray]:
    """Ridge, boosted trees and the EWMA alpha, fit on the training sample (:func:`training_sample`)."""
    pick, x_train, y_scaled = training_sample(dm)
    ridge = B.RidgeBaseline().fit(x_train, y_scaled)  # one output per step and target, as fit_ridge fits it
    gbt = B.BoostingBaseline().fit(x_train, y_scaled)  # direct: one model per step and target
    train_y = dm.raw_targets[pick + dm.window_size]  # [N, T]: step 1
    return ridge, gbt, B.fit_ewma_alpha(target_history(dm, pick), train_y)


def fit_ridge(dm) -> B.RidgeBaseline:
    """The ridge baseline alone, fit as :func:`fit_baselines` fits it; the model's blend (:mod:`dwcp_lstm.blend`)
    uses this same fit."""
    _, x_train, y_scaled = training_sample(dm)
    return B.RidgeBaseline().fit(x_train, y_scaled)


def run_baselines(dm, y: np.ndarray, mape_floor: float, stage: str = "test", fitted=None) -> tuple[dict, dict]:
    """Forecasts of every baseline on a split's windows, every step: ``preds[name] = (p [N, H, T], mask [N])``, and
    their step-1 metrics (``y`` [N, H, T]). ``fitted`` (from :func:`fit_baselines`) is reused when given, so that the
    test and validation comparisons share one fit. Flat forecasters (persistence, the means) repeat their value at
    every step; ridge and boosted trees are direct (one output per step); seasonal naive looks a period back from
    each step's own row."""
    starts, rows, h_max = dm.starts[stage], dm.target_rows(stage), dm.horizon
    hist = target_history(dm, starts)
    ridge, gbt, alpha = fitted if fitted is not None else fit_baselines(dm)
    ts = dm.target_scaler
    x_test = scaled_windows(dm, starts)

    def flat(p: np.ndarray) -> tuple[np.ndarray, None]:
        return np.repeat(p[:, None], h_max, axis=1), None  # [N, T] -> [N, H, T]

    def direct(p: np.ndarray) -> tuple[np.ndarray, None]:  # [N, H * T] -> [N, H, T], clipped like the model's
        return clip_to((p * ts.scale_ + ts.mean_).reshape(len(p), h_max, -1), target_ranges(dm.targets)), None

    times = dm.timestamps.astype(np.float64)
    seasonal = [B.seasonal_naive(dm.raw_targets, times, dm.segment_of_row, rows + h) for h in range(h_max)]
    forecasts = {
        "persistence": flat(B.persistence(hist)),
        "seasonal_naive": (np.stack([p for p, _ in seasonal], axis=1), np.all([f for _, f in seasonal], axis=0)),
        "window_mean": flat(B.window_mean(hist)),
        "ewma": flat(B.ewma(hist, alpha)),
        "harmonic_mean_5": flat(B.harmonic_mean(hist)),
        "ridge": direct(ridge.predict(x_test)),
        "gbt": direct(gbt.predict(x_test)),
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
        per_target = compute_metrics(p[m, 0], y[m, 0], dm.targets, mape_floor)  # step 1: the one-step figures
        results[name] = {
            "per_target": per_target,
            "overall": summarize(per_target, TARGET_CORR, TARGET_MAPE),
            "windows": int(m.sum()),
            "note": notes[name],
        }
        preds[name] = (p, m)
    return results, preds


def evaluate(
    module,
    dm,
    run_dir: str | Path,
    checkpoint: str | None = None,
    val_pred: np.ndarray | None = None,
    val_calibration: tuple | None = None,
    online_rate: float = O.RATE,
) -> dict:
    """Evaluate on the test split, write ``report.json``, ``report.md`` and the plots into ``run_dir``.

    ``val_pred`` and ``val_calibration`` (the export's, at fit end: the same module and data) spare a second pass over
    the validation split; without them both are computed here. ``online_rate``: the step of online recalibration
    (:mod:`dwcp_lstm.online`)."""
    run_dir = Path(run_dir)
    for name in ("report.json", "report.md"):  # found by fuzzing: checked before the work, not between the writes
        if (run_dir / name).is_dir():  # (a folder report.md: report.json was replaced, then exit 1, a stale .md)
            raise ConfigError(f"{run_dir / name}: is a directory, expected a file; nothing written")
    mape_floor = float(module.hparams.get("mape_floor", 0.0))
    rows = dm.target_rows("test")
    y_steps, pred_steps = step_targets(dm, "test"), predict_raw(module, dm)  # [N, H, T] each
    y, pred = y_steps[:, 0], pred_steps[:, 0]  # step 1: every one-step figure below
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
    base, base_steps = run_baselines(dm, y_steps, mape_floor, "test", fitted)
    base_preds = {name: (p[:, 0], m) for name, (p, m) in base_steps.items()}  # step 1
    report["baselines"] = base
    oracle_steps = oracle_forecasts(dm, rows)  # [N, H, T]; None without a sidecar or its h-step columns
    # without the h-step columns, step 1 alone still gives the one-step figures
    first = oracle_forecasts(dm, rows, steps=1) if oracle_steps is None and dm.horizon > 1 else oracle_steps
    oracle = None if first is None else first[:, 0]  # [N, T] step 1
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
    if dm.horizon > 1:
        report["horizon"] = per_step(pred_steps, y_steps, base_steps, dm.targets, oracle_steps)
    report["head_to_head"] = head_to_head(pred, y, base_preds, dm.targets)
    report["blend"] = blend_report(module, dm, pred_steps, y_steps)
    val = validation_split(module, dm, mape_floor, fitted, val_pred)
    report["validation"] = validation_head_to_head(dm, val, mape_floor)
    cal, choice = calibration_of(module, dm, val) if val_calibration is None else val_calibration
    hist = target_history(dm, dm.starts["test"])  # [N, W, T]: the intervals' scale and the planner's baselines
    report["intervals"] = interval_report(dm, val, pred_steps, y_steps, base_steps, cal, choice, hist, online_rate)
    ocal = oracle_calibration(dm, val, oracle_steps, cal.levels) if report["intervals"] is not None else None
    if ocal is not None:
        report["intervals"]["oracle"] = oracle_intervals(dm, ocal, oracle_steps, y_steps, hist)
    report["planner"], plan_points = backtest_report(dm, val, pred_steps, cal, hist, online_rate,
                                                     None if ocal is None else (oracle_steps, ocal))  # fmt: skip
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
    report["onnx"] = onnx_facts(run_dir, dm, module, (report["intervals"] or {}).get("calibration"))
    plots.write_all(run_dir, dm, y, pred, base_preds, oracle, report, plan_points)
    atomic_write(run_dir / "report.json", json.dumps(finite_or_null(report), indent=2, default=_json_default))
    atomic_write(run_dir / "report.md", markdown(report, dm.targets))
    return report


def blend_report(module, dm, pred: np.ndarray, y: np.ndarray) -> dict | None:
    """What the blend with ridge chose (``module.blend_summary``, :mod:`dwcp_lstm.blend`) and what it did on the
    test split: RMSE per target (pooled over steps) of the network alone and of the blend the report judges (``pred``,
    ``y`` [N, H, T]). None without a blend."""
    if module.blend is None or module.blend_summary is None:
        return None
    alone = predict_raw(module, dm, "test", blend=False)
    rmse = {name: np.sqrt(((p - y) ** 2).mean(axis=(0, 1))) for name, p in (("network", alone), ("blend", pred))}
    test = {t: {k: float(v[j]) for k, v in rmse.items()} for j, t in enumerate(dm.targets)}
    return {**module.blend_summary, "test_rmse": test}


def per_step(
    pred: np.ndarray, y: np.ndarray, base_steps: dict, targets: list[str], oracle: np.ndarray | None = None
) -> dict:
    """RMSE and MAE per horizon step (and averaged over steps) of the model, every baseline and the oracle, on the
    windows each baseline covers; ``beats_every_baseline_on_rmse`` per target and step; with the oracle, ``gap_closed``
    per target and step (persistence -> oracle, by MSE, on every window) and whether it reaches 0.8.
    ``pred``/``y``/``oracle`` [N, H, T]."""

    def errors(p: np.ndarray, m: np.ndarray) -> dict:
        e = p[m] - y[m]  # [n, H, T]
        rmse, mae = np.sqrt((e**2).mean(axis=0)), np.abs(e).mean(axis=0)  # [H, T]
        return {t: {"rmse": rmse[:, j].tolist(), "mae": mae[:, j].tolist(),
                    "rmse_mean_over_steps": float(rmse[:, j].mean()), "mae_mean_over_steps": float(mae[:, j].mean())}
                for j, t in enumerate(targets)}  # fmt: skip

    every = np.ones(len(y), dtype=bool)
    out = {"steps": int(y.shape[1]), "model": errors(pred, every), "baselines": {}, "model_on_baseline_windows": {}}
    beats = np.ones(y.shape[1:], dtype=bool)  # [H, T]
    for name, (p, m) in base_steps.items():
        if not m.any():
            continue
        out["baselines"][name] = errors(p, m)
        mine = errors(pred, m)
        if not m.all():
            out["model_on_baseline_windows"][name] = mine
        beats &= np.array([[mine[t]["rmse"][h] < out["baselines"][name][t]["rmse"][h] for t in targets]
                           for h in range(y.shape[1])])  # fmt: skip
    out["beats_every_baseline_on_rmse"] = {t: beats[:, j].tolist() for j, t in enumerate(targets)}
    out["oracle"] = out["gap_closed"] = out[f"gap_closed_ge_{TARGET_GAP_PER_STEP}"] = None
    if oracle is None:
        out["oracle_note"] = "not available: no oracle sidecar with oracle_<target>_h<k> columns next to the data"
        return out
    out["oracle"] = errors(oracle, every)
    persist = base_steps["persistence"][0]  # flat: every window
    mse_model, mse_persist, mse_oracle = (((p - y) ** 2).mean(axis=0) for p in (pred, persist, oracle))  # [H, T]
    gap = B.gap_closed(mse_model, mse_persist, mse_oracle)  # [H, T]
    out["gap_closed"] = {t: gap[:, j].tolist() for j, t in enumerate(targets)}
    out[f"gap_closed_ge_{TARGET_GAP_PER_STEP}"] = {t: (gap[:, j] >= TARGET_GAP_PER_STEP).tolist()
                                                   for j, t in enumerate(targets)}  # fmt: skip
    return out


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


def validation_inputs(module, dm, pred: np.ndarray | None = None) -> dict | None:
    """The model's forecasts (``pred``, computed unless given), the actuals and the target history of every
    validation window: ``{"pred", "y"}`` [N, H, T], ``"hist"`` [N, W, T] and the segment of each window
    ``"segment"`` [N] (its windows in time order); None without validation windows."""
    if len(dm.starts["val"]) == 0:
        return None
    pred = predict_raw(module, dm, "val") if pred is None else pred
    return {"pred": pred, "y": step_targets(dm, "val"), "hist": target_history(dm, dm.starts["val"]),
            "segment": dm.segment_of_row[dm.target_rows("val")]}  # fmt: skip


def validation_split(module, dm, mape_floor: float, fitted, pred: np.ndarray | None = None) -> dict | None:
    """:func:`validation_inputs` plus the baselines' forecasts: shared by the validation head-to-head and the
    interval calibration."""
    val = validation_inputs(module, dm, pred)
    if val is not None:
        _, val["baselines"] = run_baselines(dm, val["y"], mape_floor, "val", fitted)
    return val


def calibration_of(module, dm, val: dict | None) -> tuple[I.Calibration | None, dict | None]:
    """The model's interval calibration from its validation forecasts (see :mod:`dwcp_lstm.intervals`), and the
    chronological scores behind its plain/adaptive choice; (None, None) when the split cannot calibrate the widest
    level.
    The export bakes it into the graph and the report judges it on the test split: both call this, same inputs."""
    levels = I.check_levels(module.hparams.get("interval_levels", I.DEFAULT_LEVELS))
    if val is None or len(val["y"]) < I.windows_needed(levels):
        return None, None
    return calibrate_on_validation(dm, val, val["pred"], levels, bool(module.delta))


def calibrate_on_validation(dm, val: dict, pred: np.ndarray, levels, allow_adaptive: bool) -> tuple:
    """The calibration of forecasts ``pred`` [N, H, T] of the validation windows ``val``: the chronological choice
    of scale (:func:`intervals.choose`) and the tail beyond the horizon; with the choice's scores."""
    ranges = target_ranges(dm.targets)
    cal, scores = I.choose(pred, val["y"], val["hist"], levels, allow_adaptive, val["segment"], ranges)
    pick = B._even_subset(len(val["y"]), 50_000)  # bounds the [n, 8 H, T] array on long validation splits
    tail = tail_targets(dm, "val", pick)
    return I.calibrate_tail(cal, pred[pick], tail, val["hist"][pick], ranges), scores


def tail_targets(dm, stage: str, pick: np.ndarray) -> np.ndarray:
    """The actual targets of the first ``TAIL_FACTOR x H`` rows from each picked window's first target row
    [n, K, T], NaN from the first row past the split in its segment: the tail calibration never reads the next
    split (for validation: never the test rows)."""
    first, stop = dm.target_rows(stage)[pick], dm.split_stop(stage)[pick]
    return rows_ahead(dm.raw_targets, first, stop, I.TAIL_FACTOR * dm.horizon)


def validation_calibration(module, dm) -> tuple[np.ndarray | None, tuple]:
    """The model's validation forecasts and its calibration from them (one pass over the split)."""
    val = validation_inputs(module, dm)
    return (None if val is None else val["pred"]), calibration_of(module, dm, val)


def validation_head_to_head(dm, val: dict | None, mape_floor: float) -> dict | None:
    """The same comparison on the validation split: where settings (loss, window, epochs) get chosen, so that the
    test split stays an untouched verdict."""
    if val is None:
        return None
    y, pred = val["y"][:, 0], val["pred"][:, 0]
    base_preds = {name: (p[:, 0], m) for name, (p, m) in val["baselines"].items()}
    return {
        "windows": len(y),
        "per_target": compute_metrics(pred, y, dm.targets, mape_floor),
        "head_to_head": head_to_head(pred, y, base_preds, dm.targets),
    }


def interval_report(
    dm,
    val: dict | None,
    pred: np.ndarray,
    y: np.ndarray,
    base_steps: dict,
    cal,
    choice,
    hist: np.ndarray,
    online_rate: float = O.RATE,
) -> dict | None:
    """Split conformal intervals calibrated on the validation split, judged on the test split: per target and
    level, coverage, mean width and Winkler score pooled over steps and per step, the same for the mean over the
    first k steps, coverage per link (the worst named), conformal persistence and ridge built the same way, and a
    reliability curve. Under ``online`` the same bounds recalibrated from realised errors as the test split
    unrolls (:mod:`dwcp_lstm.online`), for the model and both baselines. None when the validation split cannot
    calibrate the widest level. ``hist`` [N, W, T]: the test windows' target history."""
    if cal is None or val is None:
        return None
    levels = cal.levels
    first = dm.target_rows("test")
    names = dm.series_names(first)
    ranges = target_ranges(dm.targets)  # every bound below is clipped into them, as the graph clips its own
    b = I.intervals(cal, pred, hist, ranges)
    mean_y = np.cumsum(y, axis=1) / np.arange(1, y.shape[1] + 1)[None, :, None]
    means = I.interval_scores(b["mean_lower"], b["mean_upper"], mean_y, levels)

    def judged(lower, upper, forecast, m=slice(None)) -> dict:
        """Static and online scores of per-step bounds [n, L, H, T] around ``forecast`` on the windows ``m``."""
        out = {"static": _scored(lower, upper, y[m], names[m], levels)}
        on = O.online_bounds(lower, upper, y[m], first[m], names[m], levels, forecast, online_rate)
        out["online"] = _scored(*(clip_to(v, ranges) for v in on), y[m], names[m], levels)
        return out

    model = judged(b["lower"], b["upper"], pred)
    baselines = {}
    for name in ("persistence", "ridge"):
        (vp, vm), (tp, tm) = val["baselines"][name], base_steps[name]
        bcal, _ = I.choose(vp[vm], val["y"][vm], val["hist"][vm], levels, groups=val["segment"][vm], ranges=ranges)
        bb = I.intervals(bcal, tp[tm], hist[tm], ranges)
        baselines[name] = judged(bb["lower"], bb["upper"], tp[tm], tm)

    grid = [v for v in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98) if I.windows_needed([v]) <= len(val["y"])]
    fitted = cal.fitted if cal.fitted is not None else False
    quantile = cal.quantile if cal.quantile is not None else False
    rcal = I.calibrate(val["pred"], val["y"], val["hist"], grid, cal.adaptive, ranges, fitted, quantile)
    rb = I.intervals(rcal, pred, hist, ranges)
    reliability = I.interval_scores(rb["lower"], rb["upper"], y, grid)["coverage"].mean(axis=1)  # [G, T]

    def figures(kind: str, i: int, j: int) -> dict:
        sc, links = model[kind]
        worst = min(links, key=lambda n: links[n][i, j])
        return {
            "coverage": float(sc["coverage"][i, :, j].mean()),
            "width": float(sc["width"][i, :, j].mean()),
            "winkler": float(sc["winkler"][i, :, j].mean()),
            "coverage_per_step": sc["coverage"][i, :, j].tolist(),
            "width_per_step": sc["width"][i, :, j].tolist(),
            "worst_link": worst,
            "worst_link_coverage": float(links[worst][i, j]),
            **{f"{n}_winkler": float(bs[kind][0]["winkler"][i, :, j].mean()) for n, bs in baselines.items()},
            **{f"{n}_coverage": float(bs[kind][0]["coverage"][i, :, j].mean()) for n, bs in baselines.items()},
        }

    out: dict = {"calibration": cal.to_dict(), "choice_winkler": choice, "windows": len(y), "online_rate": online_rate,
                 "per_target": {}}  # fmt: skip
    for j, t in enumerate(dm.targets):
        out["per_target"][t] = {}
        for i, level in enumerate(levels):
            out["per_target"][t][I.level_tag(level)] = {
                **figures("static", i, j),
                "mean_over_k_coverage": means["coverage"][i, :, j].tolist(),
                "mean_over_k_width": means["width"][i, :, j].tolist(),
                "online": figures("online", i, j),
            }
    out["reliability"] = {"nominal": grid, "empirical": {t: reliability[:, j].tolist() for j, t in
                                                         enumerate(dm.targets)}}  # fmt: skip
    pt = out["per_target"]
    out["checks"] = {
        **_interval_checks(pt),
        **{f"online_{k}": v for k, v in _interval_checks({t: {k: v["online"] for k, v in m.items()}
                                                          for t, m in pt.items()}).items()},
    }  # fmt: skip
    return out


def oracle_calibration(dm, val: dict, oracle: np.ndarray | None, levels) -> I.Calibration | None:
    """The interval calibration of the generator's oracle forecast, made on the validation split exactly as the
    model's (:func:`calibrate_on_validation`). ``oracle`` [N, H, T]: the test windows' oracle; None (and so the
    result) without an oracle sidecar. With it the report shows the static coverage a perfect forecast gets on this
    split, of intervals and of the planner's times: how far the split alone moves coverage (a test stretch calmer
    than validation over-covers whatever the model; docs/method.md, "What one test split can say about coverage")."""
    val_oracle = None if oracle is None else oracle_forecasts(dm, dm.target_rows("val"))
    return None if val_oracle is None else calibrate_on_validation(dm, val, val_oracle, levels, True)[0]


def oracle_intervals(dm, cal: I.Calibration, oracle: np.ndarray, y: np.ndarray, hist: np.ndarray) -> dict:
    """The oracle's intervals (:func:`oracle_calibration`) judged on the test split: coverage per target and level
    pooled over steps, beside the calibration itself (``oracle``, ``y`` [N, H, T], ``hist`` [N, W, T])."""
    levels = cal.levels
    b = I.intervals(cal, oracle, hist, target_ranges(dm.targets))
    coverage = I.interval_scores(b["lower"], b["upper"], y, levels)["coverage"].mean(axis=1)  # [L, T]
    return {
        "calibration": cal.to_dict(),
        "coverage": {t: {I.level_tag(v): float(coverage[i, j]) for i, v in enumerate(levels)}
                     for j, t in enumerate(dm.targets)},
    }  # fmt: skip


def _scored(lower: np.ndarray, upper: np.ndarray, y: np.ndarray, names: np.ndarray, levels) -> tuple[dict, dict]:
    """Scores per level, step and target (:func:`intervals.interval_scores`) and coverage per link [L, T]."""
    inside = (y[:, None] >= lower) & (y[:, None] <= upper)  # [N, L, H, T]
    links = {str(n): inside[names == n].mean(axis=(0, 2)) for n in pd.unique(names)}
    return I.interval_scores(lower, upper, y, levels), links


def _interval_checks(per_target: dict) -> dict:
    """The interval goals on ``{target: {level tag: figures}}``."""
    return {
        "coverage_within_2_points": {t: all(abs(v["coverage"] - float(k) / 100) <= 0.02 for k, v in m.items())
                                     for t, m in per_target.items()},
        "worst_link_within_10_points": {t: all(abs(v["worst_link_coverage"] - float(k) / 100) <= 0.10
                                               for k, v in m.items()) for t, m in per_target.items()},
        "winkler_below_conformal_persistence_and_ridge": {
            t: all(v["winkler"] < v["persistence_winkler"] and v["winkler"] < v["ridge_winkler"] for v in m.values())
            for t, m in per_target.items()
        },
    }  # fmt: skip


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
    steps = report.get("horizon")
    if steps and steps["gap_closed"] is not None:  # H > 1 with the per-step oracle
        out[f"horizon_gap_closed_ge_{TARGET_GAP_PER_STEP}_every_step"] = {
            t: all(v) for t, v in steps[f"gap_closed_ge_{TARGET_GAP_PER_STEP}"].items()
        }
    return out


PARITY_WINDOWS, PARITY_LIMIT = 256, 1e-3  # the report's own parity check of the run's model.onnx


def check_run_pair(path: Path, meta_path: Path, dm, module) -> tuple:
    """The run folder's model.onnx and model_metadata.json are the checkpoint's model: they pass the checks
    ``forecast`` makes, their contract (window, features, targets, horizon) is the data module's, and their
    forecasts equal the checkpoint's on up to 256 test windows (another run's pair copied in vouched for itself with
    the parity figure of its own metadata; found by fuzzing). Returns the :class:`~dwcp_lstm.serve.Predictor`, the
    test windows [N, W, F] and the parity; raises :class:`~dwcp_lstm.errors.DwcpError` naming what differs."""
    from dwcp_lstm.callbacks import onnx_parity
    from dwcp_lstm.serve import Predictor

    predictor = Predictor(path, meta_path, threads=1)  # a damaged pair: one line, not a JSON or protobuf traceback
    ours = {"window_size": dm.window_size, "features": list(dm.features), "targets": list(dm.targets),
            "horizon": dm.horizon}  # fmt: skip
    theirs = {"window_size": predictor.window, "features": predictor.features, "targets": predictor.targets,
              "horizon": predictor.horizon}  # fmt: skip
    differ = [k for k in ours if ours[k] != theirs[k]]
    if differ:
        k = differ[0]
        raise ModelFileError(f"{path}: its {k} is {theirs[k]}, the run's checkpoint has {ours[k]}")
    x = dm.windows(dm.raw_features, dm.starts["test"][:PARITY_WINDOWS]).astype(np.float32)  # [N, W, F]
    parity = onnx_parity(path, module.cpu().eval(), x)
    if not parity["max_rel_diff"] <= PARITY_LIMIT:
        raise ModelFileError(f"{path}: its forecasts differ from the run's checkpoint's by up to "
                             f"{parity['max_rel_diff']:.3g} (relative) on {len(x)} test windows: not this run's "
                             "model")  # fmt: skip
    return predictor, x, parity


def onnx_facts(run_dir: Path, dm, module, calibration: dict | None = None, runs: int = 300) -> dict | None:
    """Parity with the run's checkpoint (measured here on up to 256 test windows), file size and measured
    onnxruntime batch-1 latency of the run's model.onnx; None (with a warning) when the pair is missing or fails
    :func:`check_run_pair`: the report is still written. ``calibration``: the report's (``Calibration.to_dict``);
    whether the graph carries the same one (``calibration_matches``: a graph exported before the calibration changed,
    by another version of the package, returns other bounds than those the report judges; a warning says so)."""
    from dwcp_lstm.errors import DwcpError

    path, meta_path = model_path_of(run_dir), run_dir / METADATA_NAME
    if not path.exists() or not meta_path.exists():
        return None
    try:
        predictor, x, parity = check_run_pair(path, meta_path, dm, module)
    except DwcpError as exc:
        log.warning("%s; the report leaves out the ONNX figures (python -m dwcp_lstm export --run %s)", exc, run_dir)
        return None
    sess, meta = predictor.session, predictor.metadata
    matches = None
    if calibration is not None:
        matches = json.loads(json.dumps(calibration, default=_json_default)) == meta.get("calibration")
        if not matches:
            log.warning("%s carries another interval calibration than this report judges (exported before it "
                        "changed): its bounds are not the report's; python -m dwcp_lstm export --run %s re-exports "
                        "it", path, run_dir)  # fmt: skip
    feed = {sess.get_inputs()[0].name: x[:1]}  # [1, W, F]
    time_calls(lambda: sess.run(None, feed), 20)  # warm-up
    ns = time_calls(lambda: sess.run(None, feed), runs)
    return {
        "file_mb": path.stat().st_size / 1e6,
        "sha256_matches_metadata": sha256_of(path) == meta.get("model_sha256"),
        "parity_max_rel": parity["max_rel_diff"],
        "parity_max_abs": parity["max_abs_diff"],
        "parity_windows": parity["windows"],
        "b1_p50_ms": percentile_ms(ns, 50),
        "b1_p99_ms": percentile_ms(ns, 99),
        "opset": meta.get("opset"),
        "calibration_matches": matches,
    }


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


def planner_markdown(plan: dict | None) -> list[str]:
    """The migration planner's backtest (:func:`dwcp_lstm.planner.backtest_report`) as a report.md section."""
    if not plan:
        return []
    if "skipped" in plan:
        return ["", "## Migration planner backtest", "", f"Not run: {plan['skipped']}."]
    c = 100 * plan["confidence"]
    lines = ["", "## Migration planner backtest", "",
             f"Pre-copy migrations started at each of {plan['windows']} test windows, replayed over the measured "
             f"{plan['throughput']} (step {plan['step_s']:g} s, horizon {plan['horizon_s']:g} s). Coverage: the share "
             f"done by the time planned at {c:g} % (the model's {100 * plan['level']:g} % bounds); MdAPE: median "
             "absolute percentage error of the median time. Simple planners: the current rate held (QEMU's estimate), "
             "the harmonic mean of the last 5, persistence with conformal bounds. Online: the model's bound "
             "recalibrated per link from the migrations already ended (docs/method.md). 95 % CI: the coverage's "
             "block bootstrap over stretches of each link that share no row (blocks: how many; "
             "docs/planning.md). Coverage counts the plans that give a time; no time: the share of the model's that "
             f"say instead that nothing is guaranteed at {c:g} % (or that pre-copy does not converge).", "",
             "| GiB | dirty Mbit/s | migrations | coverage | 95 % CI (blocks) | no time | online coverage | "
             "persistence coverage | model MdAPE % | current held | HM-5 | persistence | beyond horizon |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in plan["runs"]:
        head = f"| {r['memory_gib']:g} | {r['dirty_rate_mbps']:g} |"
        if not r["migrations"]:
            lines.append(f"{head} 0 ({r['censored']} censored) | | | | | | | | | | |")
            continue
        s, ci, pct = r["simple"], r["model"].get("coverage_ci95"), lambda v: "" if v is None else f"{100 * v:.1f} %"
        ci = "" if ci is None else f"{100 * ci[0]:.1f}-{100 * ci[1]:.1f} % ({r['model']['coverage_blocks']})"
        lines.append(
            f"{head} {r['migrations']} | {pct(r['model']['coverage'])} | {ci} | {pct(r['model']['no_time_share'])} | "
            f"{pct(r['model'].get('online_coverage'))} | {pct(r['persistence_conformal_coverage'])} | "
            f"{r['model']['mdape']:.2f} | "
            f"{s['current_rate_held']['mdape']:.2f} | {s['harmonic_mean_5']['mdape']:.2f} | "
            f"{s['persistence_conformal']['mdape']:.2f} | {100 * r['model']['beyond_horizon_share']:.0f} % |"
        )
    oracle = [r["oracle_coverage"] for r in plan["runs"] if r["migrations"] and r.get("oracle_coverage") is not None]
    if oracle:
        lines += ["", f"The generator's oracle (a perfect forecast) with bounds calibrated the same way: its {c:g} % "
                  f"time covers {100 * min(oracle):.1f}-{100 * max(oracle):.1f} % of the same migrations (per size: "
                  "`oracle_coverage`), how far this test split alone moves the planner's coverage."]  # fmt: skip
    return lines


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
    every_step = f"horizon_gap_closed_ge_{TARGET_GAP_PER_STEP}_every_step"
    if every_step in ck:
        finite = [v for vs in report["horizon"]["gap_closed"].values() for v in vs if v is not None and np.isfinite(v)]
        worst = min(finite) if finite else None
        lines.append(
            f"| gap closed >= {TARGET_GAP_PER_STEP} at every horizon step, every target | min {_fmt(worst)} | "
            f"{_fmt(all(ck[every_step].values()))} |"
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
    # the unitless form papers report, so that figures compare across targets and sources
    lines += ["", "Relative errors: RMSE / mean and MAE / mean of the test targets each forecaster was judged on.", "",
              "| forecaster | " + " | ".join(f"{t} RMSE/mean | {t} MAE/mean" for t in targets) + " |",
              "|---" * (2 * len(targets) + 1) + "|"]  # fmt: skip
    for name, pt in rows.items():
        cells = " | ".join(f"{_fmt(pt[t]['rmse_over_mean'])} | {_fmt(pt[t]['mae_over_mean'])}" for t in targets)
        lines.append(f"| {name} | {cells} |")
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
    if report.get("blend"):
        bl = report["blend"]
        lines += ["", "## Mix with ridge", "",
                  "Each step and target's forecast is w x network + (1 - w) x ridge, w chosen on the validation split "
                  f"({bl['val_windows']} windows; 1 = the network alone). RMSE pooled over steps.", "",
                  "| target | w (mean over steps) | w range | val RMSE network | val RMSE ridge | val RMSE mix | "
                  "test RMSE network | test RMSE mix |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for t in targets:
            w, v, te = bl["weights"][t], bl["val_rmse"][t], bl["test_rmse"][t]
            cells = [_fmt(v["network"]), _fmt(v["ridge"]), _fmt(v["blend"]), _fmt(te["network"]), _fmt(te["blend"])]
            lines.append(f"| {t} | {np.mean(w):.2f} | {min(w):.2f}-{max(w):.2f} | " + " | ".join(cells) + " |")
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
    if report.get("horizon"):
        steps = report["horizon"]
        oracle = steps.get("oracle")
        about = ("the oracle of step h >= 2 is a Monte Carlo of the generator's own dynamics from its latent state"
                 if oracle else f"the per-step oracle is {steps.get('oracle_note', 'not available')}")  # fmt: skip
        lines += ["", f"## Per horizon step (RMSE, steps 1..{steps['steps']})", "",
                  "Every figure above is step 1. Model RMSE per step, the best baseline's and the oracle's beside it; "
                  "gap closed per step = (MSE_persistence - MSE_model) / (MSE_persistence - MSE_oracle) at that step "
                  f"({about}).", "",
                  "| target | step | model | best baseline | beats every baseline | oracle | gap closed |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for t in targets:
            for h in range(steps["steps"]):
                best = min(steps["baselines"], key=lambda b, h=h, t=t: steps["baselines"][b][t]["rmse"][h])
                o_rmse = oracle[t]["rmse"][h] if oracle else None
                gap = steps["gap_closed"][t][h] if oracle else None
                lines.append(
                    f"| {t} | {h + 1} | {_fmt(steps['model'][t]['rmse'][h])} | "
                    f"{_fmt(steps['baselines'][best][t]['rmse'][h])} ({best}) | "
                    f"{_fmt(steps['beats_every_baseline_on_rmse'][t][h])} | {_fmt(o_rmse)} | {_fmt(gap)} |"
                )
    if report.get("intervals"):
        iv = report["intervals"]
        cal = iv["calibration"]
        lines += ["", f"## Prediction intervals (split conformal, {cal['windows']} validation windows)", "",
                  "Pooled over steps; persistence and ridge get conformal intervals built the same way. Scale per "
                  "target: " + ", ".join(f"{t} {k}" for t, k in zip(targets, I.scale_kinds(cal), strict=True))
                  + " (plain: 1; adaptive: the window's volatility; fitted: a spread model of the window's "
                  "summaries; quantile: centre and width regressed on the step's forecast; docs/method.md).", "",
                  f"*online*: the same bounds recalibrated from realised errors as the test split unrolls (rate "
                  f"{iv['online_rate']:g}, each outcome used once it is known; every interval recalibrated alike).", "",
                  "| target | level | bounds | coverage | width | Winkler | persistence Winkler | ridge Winkler | "
                  "worst link |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for t in targets:
            for level, fig in iv["per_target"][t].items():
                for kind, v in (("static", fig), ("online", fig["online"])):
                    lines.append(
                        f"| {t} | {level} % | {kind} | {100 * v['coverage']:.1f} % | {_fmt(v['width'])} | "
                        f"{_fmt(v['winkler'])} | {_fmt(v['persistence_winkler'])} | {_fmt(v['ridge_winkler'])} | "
                        f"{v['worst_link']} {100 * v['worst_link_coverage']:.1f} % |"
                    )
        if iv.get("oracle"):
            cov = iv["oracle"]["coverage"]
            lines += ["", "Around the generator's oracle (a perfect forecast), intervals calibrated the same way on "
                      "validation cover " + "; ".join(f"{t} " + " / ".join(f"{100 * c:.1f} %" for c in cov[t].values())
                                                     for t in targets)
                      + f" ({' / '.join(f'{k} %' for k in cov[targets[0]])}) of the test windows: how far this test "
                      "split alone moves static coverage."]  # fmt: skip
    lines += planner_markdown(report.get("planner"))
    lines += ["", "## Plots", ""]
    lines += [f"![{p}]({p})" for p in plots.FILES if (Path(report["run_dir"]) / p).is_file()]  # a folder: none
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
        if onnx.get("calibration_matches") is not None:
            ok = onnx["calibration_matches"]
            lines.append(f"| the graph's interval calibration is this report's | {_fmt(ok)} | yes | {_fmt(ok)} |")
    return "\n".join(lines) + "\n"


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:+.1f} %"


def _metric_table(per_target: dict) -> list[str]:
    out = ["| target | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for t, m in per_target.items():
        out.append(f"| {t} | " + " | ".join(_fmt(m[k]) for k in METRICS) + " |")
    return out

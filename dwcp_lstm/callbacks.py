"""Callbacks: per-step reseeding (exact resume), weight averaging (EMA), checkpoints that stay in their folder and the
ONNX export at fit end (rank zero)."""

from __future__ import annotations

import datetime as dt
import json
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint, WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.optim.swa_utils import get_ema_multi_avg_fn

from dwcp_lstm import __version__
from dwcp_lstm.contract import (
    INPUT_NAME,
    METADATA_NAME,
    MODEL_NAME,
    OUTPUT_NAME,
    embed_contract,
    external_data_hashes,
    make_contract,
)
from dwcp_lstm.errors import CheckpointError, ConfigError, ModelFileError, check_seed
from dwcp_lstm.intervals import BOUND_NAMES, scale_kinds
from dwcp_lstm.model import count_parameters
from dwcp_lstm.tables import RANGES, atomic_path, atomic_write, sha256_of

UNITS = {
    "throughput_mbps": "Mbit/s", "rtt_ms": "ms", "packet_loss": "fraction of packets (0-1)", "jitter_ms": "ms",
    "time_of_day": "hour of day 0-23 (UTC)", "day_of_week": "0 = Monday .. 6 = Sunday",
    "congestion_window": "packets per stream", "queue_depth": "packets", "retransmits": "packets/s",
    # the Starlink traces (configs/real_starlink_fjord.yaml): names no suffix below can read
    "loss_rate": "fraction of pings dropped (0-1)", "obstructed": "1 while the sky view is blocked, else 0",
    "fraction_obstructed": "fraction of the sky view blocked (0-1)",
}  # fmt: skip
SUFFIX_UNITS = {"_mbps": "Mbit/s", "_ms": "ms", "_dbm": "dBm", "_db": "dB", "_kmh": "km/h"}


def unit_of(column: str) -> str:
    if column in UNITS:
        return UNITS[column]
    return next((u for s, u in SUFFIX_UNITS.items() if column.endswith(s)), "as in the training data")


class StepSeed(L.Callback):
    """Reseed torch before every training batch from ``seed + global_step``: dropout draws never depend on what ran
    before in the process (a resumed run creates its DataLoader iterator, which draws a seed, at another moment).

    With :class:`~dwcp_lstm.data.EpochShuffleSampler` this makes a run resumed from ``last.ckpt`` replay the epochs
    of an uninterrupted run exactly.

    Args:
        seed: base seed.
    """

    def __init__(self, seed: int = 42) -> None:
        check_seed(seed, "--step_seed.seed")
        self.seed = seed

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        torch.manual_seed(self.seed + 100_003 * trainer.global_rank + trainer.global_step)


class FolderCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, but a checkpoint's saved state can never make it delete or load a file outside
    its own folder.

    Resuming restores the file names the callback kept (best, k-th best, last, the top-k list), and at its next save
    Lightning deletes the "previous" one if the folder is among the name's parents, compared without resolving
    ``..``: a checkpoint whose state names ``<its folder>/../../x`` deleted ``x``, and its best name is what the
    final test and the export load. Restored names must resolve inside the folder (or the checkpoint is refused),
    and a file is deleted only when its resolved path is inside the resolved folder. The state key stays
    ModelCheckpoint's, so checkpoints read and written before this class are interchangeable with it.
    """

    def _generate_state_key(self, **kwargs) -> str:
        return f"ModelCheckpoint{kwargs!r}"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._trainer = trainer  # its ckpt_path names the checkpoint in a refusal (set after setup)

    def _inside(self, name: str) -> bool:
        """Whether ``name`` is a local file whose resolved path lies inside the resolved checkpoint folder."""
        if not name or not _is_local_file_protocol(name) or not _is_local_file_protocol(str(self.dirpath)):
            return False
        return Path(self.dirpath).resolve() in Path(name).resolve().parents

    def _restored_names(self, state_dict: dict) -> tuple[bool, list[str], list[str]]:
        """Whether the state is this folder's, the names Lightning would restore, and those outside the folder."""
        same = state_dict.get("dirpath", self.dirpath) == self.dirpath  # then Lightning restores every name
        names = [state_dict.get("best_model_path", "")]
        if same:
            names += [state_dict.get("kth_best_model_path", ""), state_dict.get("last_model_path", ""),
                      *(state_dict.get("best_k_models") or {})]  # fmt: skip
        names = ["" if n is None else n if isinstance(n, str) else repr(n) for n in names]  # a tensor: not a name
        return same, names, [n for n in names if n and not self._inside(n)]

    def check_state(self, state_dict: dict, ckpt_path: object) -> None:
        """Refuse a saved state naming files outside the folder. ``before_fit`` calls it (with the folder the run
        will use) before anything is written; :meth:`load_state_dict` again when Lightning restores it."""
        same, _, outside = self._restored_names(state_dict)
        if same and outside:
            raise CheckpointError(
                f"{ckpt_path or 'the checkpoint'}: its ModelCheckpoint state names "
                f"{str(outside[0])[:200]!r}, outside the checkpoint folder {self.dirpath}: resuming would delete or "
                "load that file; refusing the checkpoint"
            )

    def load_state_dict(self, state_dict: dict) -> None:
        self.check_state(state_dict, getattr(getattr(self, "_trainer", None), "ckpt_path", None))
        same, names, outside = self._restored_names(state_dict)
        if same and any(n and not Path(n).is_file() for n in names):
            # the same folder name, but not these files: another run's checkpoint resumed in a fresh folder (its
            # relative name, ./lightning_logs/version_0/checkpoints, is every first run's). Its best score would
            # outrank every epoch of this run, which then never saved a best and failed at the end.
            rank_zero_warn(f"{self.dirpath}: the checkpoint's best / last files are not in this folder (another "
                           "run's checkpoint?): this run keeps its own best from its first validation")  # fmt: skip
            return
        super().load_state_dict(state_dict)
        if outside:  # another folder's checkpoint: its best is not this run's (the first validation sets one)
            self.best_model_path = ""

    def _should_remove_checkpoint(self, trainer: L.Trainer, previous: str, current: str) -> bool:
        if previous == current or not self._inside(previous):
            return False
        resumed = Path(trainer.ckpt_path).resolve() if trainer.ckpt_path is not None else None
        return Path(previous).resolve() != resumed


def run_dir_of(trainer: L.Trainer) -> Path | None:
    """The run directory, read without collectives: ``Trainer.log_dir`` broadcasts under DDP, so calling it from
    rank zero alone (as rank-zero-only code does) deadlocks the ranks."""
    if trainer.logger is not None and getattr(trainer.logger, "log_dir", None):
        return Path(trainer.logger.log_dir)
    return Path(trainer.default_root_dir) if trainer.default_root_dir else None


def best_module(trainer: L.Trainer, pl_module: L.LightningModule) -> L.LightningModule:
    """The best checkpoint's weights (loaded with ``weights_only=True``), or the current ones with a warning, with
    its blend with ridge fitted on the validation split (:mod:`dwcp_lstm.blend`)."""
    from dwcp_lstm.blend import fit_blend

    ckpt = getattr(trainer.checkpoint_callback, "best_model_path", "") if trainer.checkpoint_callback else ""
    if ckpt and Path(ckpt).exists():
        module = type(pl_module).load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    else:
        rank_zero_warn("no best checkpoint (fast_dev_run or checkpointing off): using the current weights")
        module = pl_module
    module = module.cpu().eval()
    fit_blend(module, trainer.datamodule)
    return module


def max_opset() -> int:
    """The newest ONNX opset this torch's exporter writes (torch 2.13: 23); a larger one fails only at export."""
    try:
        from torch.onnx._constants import ONNX_MAX_OPSET  # private, so with a fallback

        return int(ONNX_MAX_OPSET)
    except (ImportError, AttributeError, TypeError, ValueError):  # pragma: no cover (another torch)
        return 23


def check_opset(opset, flag: str) -> int:
    """An opset from 17 (the graph's operators need it) to :func:`max_opset`, refused before any training."""
    top = max_opset()
    if isinstance(opset, bool) or not isinstance(opset, int) or not 17 <= opset <= top:
        raise ConfigError(f"{flag} must be an integer from 17 to {top} (the newest this torch exports), got {opset!r}")
    return opset


def export_onnx(module, path: str | Path, window: int, opset: int = 17, calibration=None) -> None:
    """Export raw-in/raw-out (scalers baked in), batch axis dynamic, window fixed, to ``path`` atomically; with a
    ``calibration`` (:mod:`dwcp_lstm.intervals`) the graph also returns the interval bounds (``interval_outputs``).

    The TorchScript-based exporter (``dynamo=False``) is chosen deliberately: it maps ``nn.LSTM`` to ONNX's fused
    ``LSTM`` operator in well under a second and needs no onnxscript; the dynamo exporter also works for this model
    but takes ~10 s and specialises the batch axis unless given dynamic shapes.
    """
    path = Path(path)
    graph, outputs = _graph(module, calibration)
    example = torch.zeros(2, window, module.fmean.numel())
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notice about dynamo=False
        torch.onnx.export(
            graph,
            (example,),
            str(tmp),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=outputs,
            dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *outputs)},
        )


def interval_outputs(horizon: int, calibration) -> list[str]:
    """The graph's bound outputs: lower/upper, and the mean over the first k steps for a multi-step model."""
    if calibration is None:
        return []
    return list(BOUND_NAMES if horizon > 1 else BOUND_NAMES[:2])


def _graph(module, calibration) -> tuple[torch.nn.Module, list[str]]:
    """The module to export (or to compare with onnxruntime) and its output names."""
    if calibration is None:
        return module.raw_forecaster().cpu().eval(), [OUTPUT_NAME]
    graph = module.interval_forecaster(calibration).cpu().eval()
    return graph, [OUTPUT_NAME, *interval_outputs(module.horizon, calibration)]


def onnx_parity(path: str | Path, module, x_raw: np.ndarray, calibration=None) -> dict[str, float]:
    """Largest difference between onnxruntime and PyTorch on raw windows [N, W, F], absolute and relative, of the
    forecast (and, with a calibration, of the interval bounds: ``bounds_max_rel_diff``).

    Relative = |onnx - torch| / max(|torch|, 1e-3 x the target's training sd), so values near zero do not explode.
    """
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    graph, names = _graph(module, calibration)
    got: dict[str, list] = {n: [] for n in names}
    want: dict[str, list] = {n: [] for n in names}
    with torch.no_grad():
        for i in range(0, len(x_raw), 512):
            xb = np.ascontiguousarray(x_raw[i : i + 512], dtype=np.float32)
            out = graph(torch.from_numpy(xb))
            out = out if isinstance(out, tuple) else (out,)
            for n, a, b in zip(names, sess.run(names, {INPUT_NAME: xb}), out, strict=True):
                got[n].append(a)
                want[n].append(b.numpy())
    floor = 1e-3 * module.tscale.cpu().numpy()  # [H * T], the step-major order of every output's last axes

    def diff(n: str) -> tuple[float, float]:
        a, b = np.concatenate(got[n]), np.concatenate(want[n])
        a, b = a.reshape(-1, floor.size), b.reshape(-1, floor.size)
        return float(np.abs(a - b).max()), float((np.abs(a - b) / np.maximum(np.abs(b), floor)).max())

    abs_f, rel_f = diff(OUTPUT_NAME)
    out = {"max_abs_diff": abs_f, "max_rel_diff": rel_f, "windows": len(x_raw)}
    if len(names) > 1:
        out["bounds_max_rel_diff"] = max(diff(n)[1] for n in names[1:])
    return out


def raw_windows(dm, stage: str = "test", limit: int | None = None) -> np.ndarray:
    """Unscaled input windows [N, W, F] of a split (materialised: only for small N)."""
    return dm.windows(dm.raw_features, dm.starts[stage][:limit])


class EMA(WeightAveraging):
    """Exponential moving average of the weights after every optimizer step (Lightning's ``WeightAveraging``):
    validation, early stopping, the LR scheduler, checkpoints, the test and the ONNX export all use the average;
    resuming restores both the average and the current weights.

    Why: on heavy-tailed real traces single batches move the weights far and the validation metrics jump from epoch
    to epoch; the average is smoother. Enable it in a config's ``trainer.callbacks`` (the shared real-trace recipe does
    not: it lost on Norway's validation split; docs/real_traces.md). Lightning's ``EMAWeightAveraging`` computes
    ``decay * a + (1 - decay) * b``, which nudges constant buffers (the train-fit scalers) by rounding; torch's
    multi-tensor lerp used here keeps them exact.

    Args:
        decay: per-step weight of the running average (0.999: a horizon of about 1,000 steps).
    """

    def __init__(self, decay: float = 0.999) -> None:
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"EMA decay must be in (0, 1), got {decay}")
        super().__init__(multi_avg_fn=get_ema_multi_avg_fn(decay))

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # Lightning puts the *current* weights back whenever the average exists, also for the trainer.test(ckpt_path=)
        # that follows fit; outside fitting, the checkpoint's state_dict (the average) is the model to evaluate.
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)


class OnnxExport(L.Callback):
    """At fit end (rank zero): export the best checkpoint to ``<log_dir>/model.onnx``, verify it with onnxruntime on
    the test windows, and write ``model_metadata.json``.

    Args:
        opset: ONNX opset, 17 to the newest this torch exports (23 with torch 2.13).
        filename: file name inside the run directory.
        parity_windows: test windows used for the parity check (null = all).
    """

    def __init__(self, opset: int = 17, filename: str = "model.onnx", parity_windows: int | None = 2048) -> None:
        check_opset(opset, "--onnx.opset")
        # a plain file name: "../x.onnx" would write outside the run directory, and the predictor finds the model
        # beside its metadata
        if Path(filename).name != filename or not filename.endswith(".onnx") or filename.startswith("."):
            raise ConfigError(f"--onnx.filename must be a plain file name ending in .onnx, got {filename!r}")
        if parity_windows is not None and (isinstance(parity_windows, bool) or parity_windows < 1):
            raise ConfigError(f"--onnx.parity_windows must be >= 1 or null (all), got {parity_windows!r}")
        self.opset, self.filename, self.parity_windows = opset, filename, parity_windows
        self.metadata: dict | None = None
        self.val_pred = None  # set at fit end, with the module and its calibration: the report reuses all three
        self.module = None
        self.calibration: tuple = (None, None)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The contract's data-derived parts, computed before the first training step: an empty training range made
        # them raise after a 10-minute fit (found re-running the real traces), and the training was lost.
        if trainer.datamodule is not None:
            json.dumps(data_contract(trainer.datamodule))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        run_dir = run_dir_of(trainer)
        # fast_dev_run has no logger, so no run folder: the export replaced model.onnx in the working directory
        if not trainer.is_global_zero or run_dir is None or trainer.fast_dev_run:
            return
        from dwcp_lstm.evaluate import validation_calibration

        run_dir.mkdir(parents=True, exist_ok=True)
        module = self.module = best_module(trainer, pl_module)
        # kept for the report that follows (the same module and data): one pass over the validation split
        self.val_pred, self.calibration = validation_calibration(module, trainer.datamodule)
        self.metadata = export_run(module, trainer.datamodule, run_dir, self.opset, self.filename, self.parity_windows,
                                   self.calibration[0])  # fmt: skip
        parity = self.metadata["parity"]["max_rel_diff"]
        rank_zero_info(f"ONNX model -> {run_dir / self.filename} (max rel diff vs PyTorch {parity:.2e})")


def export_run(
    module,
    dm,
    run_dir: Path,
    opset: int = 17,
    filename: str = MODEL_NAME,
    parity_windows: int | None = 2048,
    calibration=None,
) -> dict:
    """Export ``module`` to ``run_dir/filename`` with its interval ``calibration`` (None: calibrated here on the
    validation split, as the report does), check it against PyTorch on the test windows and write
    ``model_metadata.json`` beside it; both files atomically. Returns the metadata."""
    import os
    import shutil
    import tempfile

    from dwcp_lstm.evaluate import validation_calibration

    path = Path(run_dir) / filename
    for target in (path, Path(run_dir) / METADATA_NAME):  # found by fuzzing: a folder named model_metadata.json
        if target.is_dir():  # failed only after model.onnx was replaced: a new model beside the old metadata
            raise ModelFileError(f"{target}: is a directory, expected a file; nothing exported")
    check_finite_weights(module, f"{path}: not exported")  # a diverged or damaged model replaced a working one
    if calibration is None:
        _, (calibration, _) = validation_calibration(module, dm)
    # staged in a folder of its own beside the run's files, under the final name (the contract records it), and
    # moved into place only once its parity and metadata are known to be finite: a NaN model replaced model.onnx
    stage = Path(tempfile.mkdtemp(prefix=".export-", dir=run_dir))
    try:
        staged = stage / filename
        export_onnx(module, staged, dm.window_size, opset, calibration)
        parity = onnx_parity(staged, module, raw_windows(dm, "test", parity_windows), calibration)
        metadata = build_metadata(module, dm, staged, opset, parity, Path(run_dir), calibration)
        key = nonfinite_key(metadata)
        if key is not None:  # JSON has no NaN: "max_rel_diff": NaN is a token strict readers (Go's) refuse
            raise ModelFileError(f"{path}: not exported: {METADATA_NAME} would hold a non-finite {key} (NaN or "
                                 "infinite); the files in place are kept")  # fmt: skip
        text = json.dumps(metadata, indent=2, allow_nan=False)
        os.replace(staged, path)
        atomic_write(Path(run_dir) / METADATA_NAME, text)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return metadata


def check_finite_weights(module, where: str) -> None:
    """Every weight and scaler of ``module`` is finite: a NaN one exported, reported and served NaN forecasts (exit
    0). The clipping ranges (``low`` / ``high``) may be infinite by design and are not checked."""
    tensors = [*module.named_parameters()]
    tensors += [(n, b) for n, b in module.named_buffers() if n in ("fmean", "fscale", "tmean", "tscale")]
    for name, t in tensors:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{where}: the weight {name} holds NaN or infinite values (a diverged or damaged "
                                  "model)")  # fmt: skip


def nonfinite_key(value, key: str = "") -> str | None:
    """The dotted key of the first NaN or infinite float in a JSON-bound value, or None."""
    if isinstance(value, float) and not np.isfinite(value):
        return key or "value"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list | tuple) else ()
    for k, v in items:
        found = nonfinite_key(v, f"{key}.{k}" if key else str(k))
        if found is not None:
            return found
    return None


def range_entry(column: str) -> dict:
    """``{"range": [low, high]}`` (null: unbounded) for a target the graph clips (``tables.RANGES``), else empty."""
    if column not in RANGES:
        return {}
    return {"range": [float(v) if np.isfinite(v) else None for v in RANGES[column]]}


def data_contract(dm) -> dict:
    """The parts of an export's contract that come from the data: window, features with their training ranges,
    targets, target mode and the series definition."""
    return {
        "window_size": dm.window_size,
        "features": [
            {"name": c, "unit": unit_of(c), "train_range": [float(lo), float(hi)]}
            for c, (lo, hi) in zip(dm.features, dm.feature_ranges(), strict=True)
        ],
        "targets": [{"name": c, "unit": unit_of(c), **range_entry(c)} for c in dm.targets],
        "target_mode": dm.target_mode,
        "series": {
            "columns": list(dm.series_columns),
            "time_column": dm.time_column,
            "max_gap": float(dm.max_gap),
            "cadence_s": dm.cadence_s(),
            "duplicates": dm.duplicates,
            "fill_missing": dm.fill_missing,
            **({"clock": dict(dm.clock), "start_format": dm.series_start} if dm.clock else {}),
        },
    }


def build_metadata(module, dm, onnx_path: Path, opset: int, parity: dict, run_dir: Path, calibration=None) -> dict:
    """The metadata of an export; first embeds its contract in ``onnx_path`` (atomically), so the JSON's contract keys
    and the graph's copy are equal by construction and ``model_sha256`` covers the final file.

    Embedded here, not in :func:`export_onnx`, because the contract needs the data module (series definition, units)
    and the callers export before they build the metadata."""
    config_path = run_dir / "config.yaml"
    config = config_path.read_text() if config_path.exists() else None
    contract = make_contract(
        **data_contract(dm),
        external_data=external_data_hashes(onnx_path),
        horizon=dm.horizon,
        interval_levels=list(calibration.levels) if calibration is not None else None,
        beyond_horizon=calibration.beyond_horizon() if calibration is not None else None,
        interval_scales=scale_kinds(calibration.to_dict()) if calibration is not None else None,
    )
    embed_contract(onnx_path, contract)
    return {
        **contract,
        "model_file": onnx_path.name,
        "version": __version__,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "scaler": {
            "note": "applied inside the graph; listed for reference only",
            "feature_mean": module.fmean.tolist(),
            "feature_scale": module.fscale.tolist(),
            "target_mean": module.tmean.tolist(),
            "target_scale": module.tscale.tolist(),
        },
        "total_parameters": count_parameters(module.net),
        "opset": opset,
        "model_sha256": sha256_of(onnx_path),
        "model_bytes": onnx_path.stat().st_size,
        "parity": parity,
        "calibration": calibration.to_dict() if calibration is not None else None,  # applied inside the graph
        "blend": getattr(module, "blend_summary", None),  # the mix with ridge (blend.py), applied inside the graph
        "data": {"path": str(dm.path.resolve()), "sha256": sha256_of(dm.path)},
        "config": config,
    }

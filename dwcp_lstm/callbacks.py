"""Callbacks: per-step reseeding (exact resume), weight averaging (EMA) and the ONNX export at fit end (rank zero)."""

from __future__ import annotations

import datetime as dt
import json
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import WeightAveraging
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
from dwcp_lstm.errors import ConfigError
from dwcp_lstm.model import count_parameters
from dwcp_lstm.tables import atomic_path, atomic_write, sha256_of

UNITS = {
    "throughput_mbps": "Mbit/s", "rtt_ms": "ms", "packet_loss": "fraction of packets (0-1)", "jitter_ms": "ms",
    "time_of_day": "hour of day 0-23 (UTC)", "day_of_week": "0 = Monday .. 6 = Sunday",
    "congestion_window": "packets per stream", "queue_depth": "packets", "retransmits": "packets/s",
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
        self.seed = seed

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        torch.manual_seed(self.seed + 100_003 * trainer.global_rank + trainer.global_step)


def run_dir_of(trainer: L.Trainer) -> Path | None:
    """The run directory, read without collectives: ``Trainer.log_dir`` broadcasts under DDP, so calling it from
    rank zero alone (as rank-zero-only code does) deadlocks the ranks."""
    if trainer.logger is not None and getattr(trainer.logger, "log_dir", None):
        return Path(trainer.logger.log_dir)
    return Path(trainer.default_root_dir) if trainer.default_root_dir else None


def best_module(trainer: L.Trainer, pl_module: L.LightningModule) -> L.LightningModule:
    """The best checkpoint's weights (loaded with ``weights_only=True``), or the current ones with a warning."""
    ckpt = getattr(trainer.checkpoint_callback, "best_model_path", "") if trainer.checkpoint_callback else ""
    if ckpt and Path(ckpt).exists():
        module = type(pl_module).load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    else:
        rank_zero_warn("no best checkpoint (fast_dev_run or checkpointing off): using the current weights")
        module = pl_module
    return module.cpu().eval()


def export_onnx(module, path: str | Path, window: int, opset: int = 17) -> None:
    """Export raw-in/raw-out (scalers baked in), batch axis dynamic, window fixed, to ``path`` atomically.

    The TorchScript-based exporter (``dynamo=False``) is chosen deliberately: it maps ``nn.LSTM`` to ONNX's fused
    ``LSTM`` operator in well under a second and needs no onnxscript; the dynamo exporter also works for this model
    but takes ~10 s and specialises the batch axis unless given dynamic shapes.
    """
    path = Path(path)
    raw = module.raw_forecaster().cpu().eval()
    example = torch.zeros(2, window, module.fmean.numel())
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notice about dynamo=False
        torch.onnx.export(
            raw,
            (example,),
            str(tmp),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )


def onnx_parity(path: str | Path, module, x_raw: np.ndarray) -> dict[str, float]:
    """Largest difference between onnxruntime and PyTorch on raw windows [N, W, F], absolute and relative.

    Relative = |onnx - torch| / max(|torch|, 1e-3 x the target's training sd), so values near zero do not explode.
    """
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    raw = module.raw_forecaster().cpu().eval()
    onnx_out, torch_out = [], []
    with torch.no_grad():
        for i in range(0, len(x_raw), 512):
            xb = np.ascontiguousarray(x_raw[i : i + 512], dtype=np.float32)
            onnx_out.append(sess.run(None, {INPUT_NAME: xb})[0])
            torch_out.append(raw(torch.from_numpy(xb)).numpy())
    a, b = np.concatenate(onnx_out), np.concatenate(torch_out)
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)  # [N, H * T], the order of the target scales
    floor = 1e-3 * module.tscale.cpu().numpy()
    return {
        "max_abs_diff": float(np.abs(a - b).max()),
        "max_rel_diff": float((np.abs(a - b) / np.maximum(np.abs(b), floor)).max()),
        "windows": len(a),
    }


def raw_windows(dm, stage: str = "test", limit: int | None = None) -> np.ndarray:
    """Unscaled input windows [N, W, F] of a split (materialised: only for small N)."""
    return dm.windows(dm.raw_features, dm.starts[stage][:limit])


class EMA(WeightAveraging):
    """Exponential moving average of the weights after every optimizer step (Lightning's ``WeightAveraging``):
    validation, early stopping, the LR scheduler, checkpoints, the test and the ONNX export all use the average;
    resuming restores both the average and the current weights.

    Why: on heavy-tailed real traces single batches move the weights far and the validation metrics jump from epoch
    to epoch; the average is a smoother, usually better model. Enable it in a config's ``trainer.callbacks`` (the
    real-trace configs do). Lightning's ``EMAWeightAveraging`` computes ``decay * a + (1 - decay) * b``, which nudges
    constant buffers (the train-fit scalers) by rounding; torch's multi-tensor lerp used here keeps them exact.

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
        opset: ONNX opset (>= 17).
        filename: file name inside the run directory.
        parity_windows: test windows used for the parity check (null = all).
    """

    def __init__(self, opset: int = 17, filename: str = "model.onnx", parity_windows: int | None = 2048) -> None:
        if isinstance(opset, bool) or not isinstance(opset, int) or opset < 17:
            raise ConfigError(f"--onnx.opset must be an integer >= 17, got {opset!r}")
        # a plain file name: "../x.onnx" would write outside the run directory, and the predictor finds the model
        # beside its metadata
        if Path(filename).name != filename or not filename.endswith(".onnx") or filename.startswith("."):
            raise ConfigError(f"--onnx.filename must be a plain file name ending in .onnx, got {filename!r}")
        if parity_windows is not None and (isinstance(parity_windows, bool) or parity_windows < 1):
            raise ConfigError(f"--onnx.parity_windows must be >= 1 or null (all), got {parity_windows!r}")
        self.opset, self.filename, self.parity_windows = opset, filename, parity_windows
        self.metadata: dict | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        run_dir = run_dir_of(trainer)
        if not trainer.is_global_zero or run_dir is None:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        module = best_module(trainer, pl_module)
        self.metadata = export_run(module, trainer.datamodule, run_dir, self.opset, self.filename, self.parity_windows)
        parity = self.metadata["parity"]["max_rel_diff"]
        rank_zero_info(f"ONNX model -> {run_dir / self.filename} (max rel diff vs PyTorch {parity:.2e})")


def export_run(
    module, dm, run_dir: Path, opset: int = 17, filename: str = MODEL_NAME, parity_windows: int | None = 2048
) -> dict:
    """Export ``module`` to ``run_dir/filename``, check it against PyTorch on the test windows and write
    ``model_metadata.json`` beside it; both files atomically. Returns the metadata."""
    path = Path(run_dir) / filename
    export_onnx(module, path, dm.window_size, opset)
    parity = onnx_parity(path, module, raw_windows(dm, "test", parity_windows))
    metadata = build_metadata(module, dm, path, opset, parity, Path(run_dir))
    atomic_write(Path(run_dir) / METADATA_NAME, json.dumps(metadata, indent=2))
    return metadata


def build_metadata(module, dm, onnx_path: Path, opset: int, parity: dict, run_dir: Path) -> dict:
    """The metadata of an export; first embeds its contract in ``onnx_path`` (atomically), so the JSON's contract keys
    and the graph's copy are equal by construction and ``model_sha256`` covers the final file.

    Embedded here, not in :func:`export_onnx`, because the contract needs the data module (series definition, units)
    and the callers export before they build the metadata."""
    config_path = run_dir / "config.yaml"
    config = config_path.read_text() if config_path.exists() else None
    contract = make_contract(
        window_size=dm.window_size,
        features=[{"name": c, "unit": unit_of(c)} for c in dm.features],
        targets=[{"name": c, "unit": unit_of(c)} for c in dm.targets],
        target_mode=dm.target_mode,
        series={"columns": list(dm.series_columns), "time_column": dm.time_column, "max_gap": float(dm.max_gap)},
        external_data=external_data_hashes(onnx_path),
        horizon=dm.horizon,
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
        "data": {"path": str(dm.path.resolve()), "sha256": sha256_of(dm.path)},
        "config": config,
    }

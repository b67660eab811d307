"""Reopen a finished run: its DataModule from ``config.yaml`` and its best checkpoint (``weights_only=True``)."""

from __future__ import annotations

from pathlib import Path

import yaml
from jsonargparse import ArgumentError, ArgumentParser

from dwcp_lstm.data import DwcpDataModule
from dwcp_lstm.errors import CheckpointError, ConfigError, DataError
from dwcp_lstm.module import DwcpForecaster
from dwcp_lstm.tables import first_line


def find_checkpoint(run_dir: Path) -> Path:
    """``checkpoints/best.ckpt``, else ``last.ckpt``."""
    for name in ("best.ckpt", "last.ckpt"):
        path = run_dir / "checkpoints" / name
        if path.exists():
            return path
    raise CheckpointError(f"{run_dir}: no checkpoints/best.ckpt or checkpoints/last.ckpt (not a finished fit run?)")


def datamodule_from_config(config_path: Path) -> DwcpDataModule:
    """Instantiate the run's DataModule exactly as its saved config describes it."""
    try:
        cfg = yaml.safe_load(config_path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{config_path}: not valid YAML ({first_line(exc)})") from None
    if not isinstance(cfg, dict) or "data" not in cfg:
        raise ConfigError(f"{config_path}: no 'data' section")
    if not isinstance(cfg["data"], dict):  # anything else would silently fall back to the default data
        raise ConfigError(f"{config_path}: 'data' must be a mapping of the DataModule's settings")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(DwcpDataModule, "data")
    try:
        ns = parser.parse_object({"data": cfg["data"]})
        return parser.instantiate_classes(ns).data
    except ArgumentError as exc:  # an unknown key or a value of the wrong type
        raise ConfigError(f"{config_path}: {first_line(exc)}") from None
    except ConfigError as exc:  # a value the DataModule refuses: name the file it came from
        raise ConfigError(f"{config_path}: {exc}") from None


def load_run(run_dir: str | Path, stage: str = "test") -> tuple[DwcpForecaster, DwcpDataModule, Path]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: run directory not found")
    config = run_dir / "config.yaml"
    if not config.exists():
        raise DataError(f"{config}: file not found (not a run directory?)")
    ckpt = find_checkpoint(run_dir)
    dm = datamodule_from_config(config)
    dm.prepare_data()
    dm.setup(stage)
    try:
        module = DwcpForecaster.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which, not a traceback
        raise CheckpointError(f"{ckpt}: cannot load checkpoint ({type(exc).__name__}: {first_line(exc)})") from None
    h = module.hparams
    for key, ours, theirs in (
        ("features", dm.features, h.get("feature_names")),
        ("targets", dm.targets, h.get("target_names")),
        ("window_size", dm.window_size, h.get("window_size")),
        ("horizon", dm.horizon, h.get("horizon", 1)),
        ("target_mode", dm.target_mode, h.get("target_mode")),
    ):
        if theirs is not None and ours != (list(theirs) if isinstance(theirs, list | tuple) else theirs):
            raise ConfigError(f"{config}: data.{key} is {ours}, the checkpoint {ckpt.name} was trained with {theirs}")
    return module.eval(), dm, ckpt

"""Reopen a finished run: its DataModule from ``config.yaml`` and its best checkpoint (``weights_only=True``)."""

from __future__ import annotations

from pathlib import Path

import yaml
from jsonargparse import ArgumentError, ArgumentParser

from dwcp_lstm.data import DwcpDataModule, check_same_data
from dwcp_lstm.errors import CheckpointError, ConfigError, DataError
from dwcp_lstm.imports import restrict_config_imports
from dwcp_lstm.module import DwcpForecaster
from dwcp_lstm.preflight import load_checkpoint, plain_value
from dwcp_lstm.tables import first_line


def find_checkpoint(run_dir: Path) -> Path:
    """``checkpoints/best.ckpt``, else ``last.ckpt``."""
    for name in ("best.ckpt", "last.ckpt"):
        path = run_dir / "checkpoints" / name
        if path.exists():
            return path
    raise CheckpointError(f"{run_dir}: no checkpoints/best.ckpt or checkpoints/last.ckpt (not a finished fit run?)")


def read_config(config_path: Path) -> object:
    """A run's config.yaml, parsed; unreadable, not UTF-8, not YAML or nested beyond Python's recursion limit: one
    :class:`ConfigError` naming the file."""
    try:
        return yaml.safe_load(Path(config_path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{config_path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{config_path}: not UTF-8 text ({first_line(exc)})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{config_path}: not valid YAML ({first_line(exc)})") from None
    except RecursionError:
        raise ConfigError(f"{config_path}: not a usable config (nested too deeply)") from None


def datamodule_from_config(config_path: Path) -> DwcpDataModule:
    """Instantiate the run's DataModule exactly as its saved config describes it."""
    cfg = read_config(config_path)
    if not isinstance(cfg, dict) or "data" not in cfg:
        raise ConfigError(f"{config_path}: no 'data' section")
    if not isinstance(cfg["data"], dict):  # anything else would silently fall back to the default data
        raise ConfigError(f"{config_path}: 'data' must be a mapping of the DataModule's settings")
    restrict_config_imports()  # a run folder's config may come from anyone
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(DwcpDataModule, "data")
    try:
        ns = parser.parse_object({"data": cfg["data"]})
        return parser.instantiate_classes(ns).data
    except ArgumentError as exc:  # an unknown key or a value of the wrong type (jsonargparse's text spans lines)
        raise ConfigError(f"{config_path}: {' '.join(str(exc).split())[:400]}") from None
    except ConfigError as exc:  # a value the DataModule refuses: name the file it came from
        raise ConfigError(f"{config_path}: {exc}") from None


# DataModule settings a run's config.yaml may change after training: where the data lives and how it is batched.
# Any other change (split, gap policy, columns, synthetic seed...) would evaluate or calibrate on other rows than the
# training run held out: the test split could hold training rows, the intervals be calibrated on them.
DATA_MAY_CHANGE = ("data_path", "data_dir", "num_workers", "batch_size")


def _same_settings_as_trained(config: Path, ckpt: Path, dm: DwcpDataModule, contents: dict) -> None:
    """The run's data settings are the checkpoint's (but :data:`DATA_MAY_CHANGE`): compared before any data is read
    or generated, so that an edited config.yaml cannot make ``report`` write a 50M-row dataset anywhere first."""
    saved = contents.get("datamodule_hyper_parameters")
    if not saved:
        return
    now = dict(dm.hparams)
    changed = [k for k in saved if not k.startswith("_") and k not in DATA_MAY_CHANGE and k in now
               and plain_value(saved[k]) != plain_value(now[k])]  # fmt: skip
    if changed:
        k = changed[0]
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        raise ConfigError(f"{config}: data.{k} is {plain_value(now[k])!r}, the checkpoint {ckpt.name} was trained "
                          f"with {plain_value(saved[k])!r}{more}")  # fmt: skip


def load_run(run_dir: str | Path, stage: str = "test") -> tuple[DwcpForecaster, DwcpDataModule, Path]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: run directory not found")
    config = run_dir / "config.yaml"
    if not config.exists():
        raise DataError(f"{config}: file not found (not a run directory?)")
    ckpt = find_checkpoint(run_dir)
    dm = datamodule_from_config(config)
    contents = load_checkpoint(ckpt)  # weights only, like every checkpoint read here
    _same_settings_as_trained(config, ckpt, dm, contents)
    dm.prepare_data()
    dm.setup(stage)
    check_same_data(dm, contents.get(type(dm).__qualname__), f"the checkpoint {ckpt.name}")  # the file's bytes
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

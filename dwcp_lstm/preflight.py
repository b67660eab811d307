"""Checks that run before the first training (or evaluation) step, so that no compute is spent on a run that cannot
finish: the checkpoint (loadable without unpickling code, compatible with the model), the optimizer settings, the
splits, the output folder, and on resume the config against the run's own.

Every problem is a :class:`~dwcp_lstm.errors.DwcpError` with a one-line message; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _load as lightning_load
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.cli import SaveConfigCallback

from dwcp_lstm.errors import CheckpointError, ConfigError, DataError, check_seed, not_a_regular_file
from dwcp_lstm.tables import atomic_path, atomic_write, first_line, probe_writable

# Hyperparameters a checkpoint must share with the model it is loaded into (they fix the meaning of the weights).
CONTRACT_HPARAMS = (
    "feature_names", "target_names", "window_size", "horizon", "target_mode", "lstm_sizes", "head_sizes",
    "linear_skip", "skip_cross", "late_head_size", "cyclic",
)  # fmt: skip
# Config keys a resumed run may change: how long and how verbosely it runs, where, and which extra callbacks it has.
# Everything else (model, data, optimizer, seeds, early stopping, checkpointing) is restored from the checkpoint's
# state, so a changed value would be recorded in config.yaml while the run kept the old one.
RESUME_MAY_CHANGE = (
    "ckpt_path", "weights_only", "trainer.max_epochs", "trainer.max_steps", "trainer.max_time", "trainer.callbacks",
    "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.accelerator", "trainer.devices",
    "trainer.num_nodes", "trainer.strategy", "trainer.default_root_dir", "trainer.logger", "trainer.log_every_n_steps",
    "trainer.limit_test_batches", "trainer.limit_predict_batches", "data.num_workers", "data.data_dir", "threads",
)  # fmt: skip


def is_remote(path: str | Path) -> bool:
    return "://" in str(path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's contents, local or remote, loaded with ``weights_only=True`` (nothing in it can run code)."""
    path = str(path)
    if not is_remote(path):
        p = Path(path)
        if not p.exists():
            raise CheckpointError(f"{p}: checkpoint not found")
        if p.is_dir():
            raise CheckpointError(f"{p}: is a directory, expected a .ckpt file")
        problem = not_a_regular_file(p)  # /dev/zero, a FIFO: reading it never ends
        if problem:
            raise CheckpointError(f"{p}: {problem}, expected a .ckpt file")
        try:
            with open(p, "rb") as f:
                head = f.read(2)
        except OSError as exc:
            raise CheckpointError(f"{p}: cannot read checkpoint ({exc.strerror or first_line(exc)})") from None
        if head != b"PK":  # torch.save writes a zip; anything else went to the legacy unpickler (an IndexError)
            raise CheckpointError(f"{p}: not a checkpoint (not a PyTorch zip file)")
    try:
        ckpt = lightning_load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses any global outside plain tensors and containers: a file that needs one is not ours
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found:
            why = f"it references {found.group(1)}"
            msg = f"{path}: refused to load: {why} (checkpoints are loaded with weights_only=True)"
            raise CheckpointError(msg) from None
        detail = re.search(r"WeightsUnpickler error: (.*)", str(exc))
        why = detail.group(1).strip() if detail else first_line(exc)
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or corrupt ({why})") from None
    except OSError as exc:
        if is_remote(path):  # urllib's URLError is an OSError: the server, not the file
            raise CheckpointError(f"{path}: cannot fetch checkpoint ({first_line(exc)})") from None
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or corrupt ({first_line(exc)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or corrupt ({first_line(exc)})") from None
    except Exception as exc:  # fsspec/urllib raise their own types for unreachable URLs
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {first_line(exc)})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no state_dict)")
    return ckpt


def check_compatible(ckpt: dict[str, Any], model: torch.nn.Module, path: str | Path) -> None:
    """The checkpoint was trained for this model: same contract hyperparameters, same parameter names and shapes."""
    differences = hparam_differences(ckpt, model, CONTRACT_HPARAMS)
    if differences:
        key, theirs, ours = differences[0]
        raise CheckpointError(f"{path}: checkpoint has {key}={theirs}, this config has {ours}")
    own = model.state_dict()
    theirs = ckpt["state_dict"]
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    if missing or unexpected:
        what = f"lacks {missing[0]!r}" if missing else f"has unknown {unexpected[0]!r}"
        raise CheckpointError(f"{path}: checkpoint does not fit this model: it {what} (not a dwcp_lstm checkpoint?)")
    for k, v in own.items():
        if not isinstance(theirs[k], torch.Tensor) or theirs[k].shape != v.shape:
            shape = tuple(theirs[k].shape) if isinstance(theirs[k], torch.Tensor) else type(theirs[k]).__name__
            msg = f"{path}: checkpoint's {k} has shape {shape}, this model's {tuple(v.shape)} (other sizes?)"
            raise CheckpointError(msg)
    # a buffer, so loading restored the checkpoint's over the flag: `test --model.loss_weights ...` was dropped silently
    if "loss_weights" in own and not torch.allclose(theirs["loss_weights"].float(), own["loss_weights"].float()):
        n = len(getattr(model, "hparams", {}).get("target_names") or own["loss_weights"])  # per target, not step
        t, o = ([round(x, 4) for x in w["loss_weights"].float().tolist()[:n]] for w in (theirs, own))
        raise CheckpointError(f"{path}: checkpoint was trained with loss weights {t} (normalised), this config "
                              f"gives {o}; its own would be used: give --model.loss_weights as trained")  # fmt: skip


PROGRESS_KEYS = ("ready", "started", "processed", "completed")  # Lightning's loop progress counters


def check_resumable(ckpt: dict[str, Any], model, path: str | Path) -> None:
    """The training state a resume restores can be restored and used: what Lightning and the model will do with the
    optimizer, scheduler, early-stopping and loop state, done first on copies. A tampered or foreign state raised
    its traceback at the first step, or only after an epoch of training (early stopping's best score)."""
    import copy

    def refuse(what: str) -> None:
        raise CheckpointError(f"{path}: cannot resume from it: {what}")

    states = ckpt.get("optimizer_states")
    if states is not None:
        if not isinstance(states, list) or len(states) != 1:
            refuse("it holds no single optimizer state")
        probe = copy.deepcopy(model)
        probe._scheduler_state = ckpt.get("dwcp_lr_scheduler")
        try:
            optimizer = probe.configure_optimizers()  # loads the scheduler's state
            optimizer.load_state_dict(states[0])
            for group in optimizer.param_groups:
                for p in group["params"]:
                    for name, v in optimizer.state.get(p, {}).items():
                        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != p.shape:
                            refuse(f"the optimizer's {name} has shape {tuple(v.shape)}, its weight {tuple(p.shape)}")
            scheduler = probe.scheduler
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(0.0)
            else:
                scheduler.step()
        except CheckpointError:
            raise
        except Exception as exc:  # torch's own ValueError / KeyError / TypeError for a state that does not fit
            refuse(f"its optimizer or scheduler state does not fit ({type(exc).__name__}: {first_line(exc)[:200]})")
    for key, state in (ckpt.get("callbacks") or {}).items():
        if key.startswith("EarlyStopping") and isinstance(state, dict):
            best = state.get("best_score")
            if best is not None and not (isinstance(best, torch.Tensor) and best.numel() == 1
                                         or isinstance(best, int | float) and not isinstance(best, bool)):  # fmt: skip
                refuse(f"early stopping's best_score is {type(best).__name__}, not a number")
            for name in ("wait_count", "stopped_epoch", "patience"):
                v = state.get(name, 0)
                if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    refuse(f"early stopping's {name} is {v!r}, not a count")

    def counters(d: Any, where: str) -> None:
        if not isinstance(d, dict):
            return
        for k, v in d.items():
            if k in PROGRESS_KEYS and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                refuse(f"loop counter {where}{k} is {v!r}, not a count")
            counters(v, f"{where}{k}.")

    counters(ckpt.get("loops"), "")


def hparam_differences(ckpt: dict[str, Any], model, keys=None) -> list[tuple[str, Any, Any]]:
    """``(key, checkpoint's value, model's value)`` for each hyperparameter (of ``keys``, default all the model's)
    that the checkpoint records with another value; lists and tuples compare equal."""
    saved = ckpt.get("hyper_parameters") or {}
    keys = model.hparams.keys() if keys is None else keys
    return [(k, plain_value(saved[k]), plain_value(model.hparams.get(k))) for k in keys
            if k in saved and plain_value(saved[k]) != plain_value(model.hparams.get(k))]  # fmt: skip


def plain_value(v: Any) -> Any:
    """A setting as plain data, to compare by value: lists for tuples, dicts for dataclasses, recursively (a YAML
    round trip turns tuples into lists, and a checkpoint keeps the synthetic spec as a dict)."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        v = dataclasses.asdict(v)
    if isinstance(v, list | tuple):
        return [plain_value(x) for x in v]
    if isinstance(v, dict):
        return {k: plain_value(x) for k, x in v.items()}
    return v


def _named_object(value: Any) -> tuple[str, Any]:
    """``(name, object)`` of a config value naming a callable: a ``class_path`` namespace or dict, a dotted string,
    or the object itself. Only resolves the name (its module was already imported when the config was parsed)."""
    import importlib

    if isinstance(value, str):
        name = value
    elif getattr(value, "class_path", None) is not None or isinstance(value, dict):
        name = value["class_path"] if isinstance(value, dict) else value.class_path
    else:
        return getattr(value, "__qualname__", repr(value)), value
    module, _, attr = str(name).rpartition(".")
    try:
        return name, getattr(importlib.import_module(module), attr) if module else None
    except (ImportError, AttributeError, ValueError):
        return name, None


def check_factories(model_config: Any) -> None:
    """``model.optimizer`` names a torch optimizer class and ``model.scheduler`` a learning-rate scheduler class, and
    nothing else. Both are typed as callables, for which jsonargparse accepts any importable function and, when the
    model is built, calls it with the config's ``init_args``: ``class_path: os.system`` in a config file would run a
    shell command. Checked on the parsed config, before anything is instantiated."""
    get = model_config.get if hasattr(model_config, "get") else lambda k, d=None: getattr(model_config, k, d)
    sched = torch.optim.lr_scheduler
    kinds = (
        ("optimizer", (torch.optim.Optimizer,), "a torch.optim optimizer class (torch.optim.Adam, AdamW, ...)"),
        ("scheduler", (sched.LRScheduler, sched.ReduceLROnPlateau),
         "a torch.optim.lr_scheduler class (ReduceLROnPlateau, CosineAnnealingLR, ...) or null"),
    )  # fmt: skip
    for key, bases, what in kinds:
        value = get(key, None)
        if value is None:
            continue
        name, obj = _named_object(value)
        if not (isinstance(obj, type) and issubclass(obj, bases)):
            raise ConfigError(f"--model.{key}: {name} is not {what}; refusing to call it")
        if isinstance(obj, type) and issubclass(obj, torch.optim.SparseAdam):  # it failed at the first step
            raise ConfigError(f"--model.{key}: {name} takes sparse gradients only, and this model's are dense: use "
                              "torch.optim.Adam or AdamW")  # fmt: skip


def epoch_budget(trainer) -> int | None:
    """``--trainer.max_epochs`` where it bounds the run; None where it does not (-1 or None)."""
    return trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs > 0 else None


def validations(trainer) -> int:
    """How many validation epochs a fit may run (the module steps its scheduler after each), at most 10,000: the
    epoch budget (Lightning's 1,000 when unbounded) over ``check_val_every_n_epoch``, times the validations a
    fractional ``val_check_interval`` adds per epoch."""
    epochs = epoch_budget(trainer) or 1000
    every = trainer.check_val_every_n_epoch or 1
    interval = trainer.val_check_interval
    per_epoch = int(1 / interval) if isinstance(interval, float) and 0 < interval < 1 else 1
    return min(10_000, math.ceil(epochs / every) * per_epoch)


def check_optimizer(model, steps: int = 1) -> None:
    """Build the optimizer and scheduler once on the model's parameters: torch checks their arguments (a negative
    learning rate, betas outside [0, 1), a ReduceLROnPlateau factor >= 1) when they are constructed. Then step the
    scheduler ``steps`` times (:func:`validations`; on a throwaway optimizer, no weight changes): some arguments
    fail only there (StepLR's step_size 0, CosineAnnealingLR's T_max 0: a ZeroDivisionError after the first
    epoch; OneCycleLR's total_steps below the epochs: a ValueError once they are spent), a traceback after the
    training compute."""
    import warnings

    scheduler = None
    try:
        optimizer = model.optimizer_factory(model.param_groups())
        if model.scheduler_factory is not None:
            scheduler = model.scheduler_factory(optimizer)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"--model.optimizer / --model.scheduler: {first_line(exc)}") from None
    # found by fuzzing: lr 0 (torch refuses only < 0) trained nothing, and the untrained network was exported and
    # reported, exit 0, like --trainer.max_epochs 0; read after the scheduler, which may set its own starting rate
    # (and before it is stepped: a cosine schedule ends at 0)
    if all(float(group["lr"]) == 0 for group in optimizer.param_groups):
        raise ConfigError("--model.optimizer: a learning rate of 0 never changes the weights (the untrained network "
                          "would be exported and reported); give --model.optimizer.init_args.lr > 0")  # fmt: skip
    if scheduler is None:
        return
    plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": no training here
        warnings.simplefilter("ignore")
        for k in range(steps):
            try:
                scheduler.step(1.0) if plateau else scheduler.step()
            except (ValueError, TypeError, ZeroDivisionError, OverflowError) as exc:
                raise ConfigError(f"--model.scheduler fails when stepped after validation {k + 1} of the {steps} "
                                  f"this run may have: {first_line(exc)}") from None  # fmt: skip


def logged_metrics(model) -> set[str]:
    """Every metric name the module logs (see ``DwcpForecaster._common_step`` and ``_log_metrics``)."""
    from dwcp_lstm.metrics import METRICS

    names = {"train_loss", "train_loss_step", "train_loss_epoch", "val_loss", "test_loss"}
    for stage in ("train", "val", "test"):
        for who in [*model.hparams.target_names, "mean"]:
            names |= {f"{stage}/{who}/{m}" for m in METRICS}
    return names


# DataModule settings that may differ from a checkpoint's: where the data lives and how it is batched. Any other
# change (split, gap policy, columns, synthetic seed...) would evaluate, calibrate or train on other rows than the
# checkpoint's run held out: the test split could hold its training rows.
DATA_MAY_CHANGE = ("data_path", "data_dir", "num_workers", "batch_size")


def check_data_settings(ckpt: dict, dm, where, ckpt_path) -> None:
    """The data settings of ``dm`` are those the checkpoint was trained with (but :data:`DATA_MAY_CHANGE`): for
    ``report`` / ``export`` (the run's config.yaml, before any data is read or generated), ``test`` / ``validate`` /
    ``predict`` and a resume from a checkpoint with no run config beside it (the flags)."""
    saved = ckpt.get("datamodule_hyper_parameters")
    if not saved:
        return
    now = dict(dm.hparams)
    changed = [k for k in saved if not k.startswith("_") and k not in DATA_MAY_CHANGE and k in now
               and plain_value(saved[k]) != plain_value(now[k])]  # fmt: skip
    if changed:
        k = changed[0]
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        what = f"--data.{k}" if where is None else f"{where}: data.{k}"  # None: the command's flags
        raise ConfigError(f"{what} is {plain_value(now[k])!r}, the checkpoint {Path(str(ckpt_path)).name} was "
                          f"trained with {plain_value(saved[k])!r}{more}")  # fmt: skip


def check_monitors(trainer, model) -> None:
    """ModelCheckpoint and EarlyStopping monitor a metric the model logs: Lightning itself only finds out at the end of
    the first validation epoch, after that epoch's compute."""
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    known = {k for k in logged_metrics(model) if not k.startswith("test")}  # fit logs no test metric (a traceback
    # after the first epoch)
    no_validation = trainer.limit_val_batches == 0  # Lightning's own name for "validation switched off"
    every = trainer.check_val_every_n_epoch
    never = every is not None and trainer.max_epochs is not None and 0 < trainer.max_epochs < every
    for cb in trainer.callbacks:
        if not isinstance(cb, ModelCheckpoint | EarlyStopping) or cb.monitor is None:
            continue
        flag = "early_stopping" if isinstance(cb, EarlyStopping) else "checkpoint"
        if cb.monitor not in known:
            val = sorted(k for k in known if k.startswith("val"))
            raise ConfigError(
                f"--{flag}.monitor {cb.monitor!r} is not a metric this model logs (e.g. {', '.join(val[:3])}, ...)"
            )
        if no_validation and cb.monitor.startswith("val"):  # else: a traceback after the first training epoch
            way = (
                "validate, or set the monitor to null"
                if flag == "early_stopping"
                else "validate: the report and the export read the best checkpoint, which validation chooses"
            )  # null: two equal callbacks
            raise ConfigError(f"--trainer.limit_val_batches 0 runs no validation, but --{flag}.monitor is "
                              f"{cb.monitor!r}: {way}")  # fmt: skip
        if never and cb.monitor.startswith("val"):  # else: no checkpoint at all, and the report of the last weights
            raise ConfigError(f"--trainer.check_val_every_n_epoch {every} never validates in --trainer.max_epochs "
                              f"{trainer.max_epochs}, but --{flag}.monitor is {cb.monitor!r}")  # fmt: skip
        on_train_end = isinstance(cb, EarlyStopping) and cb._check_on_train_epoch_end is True
        if on_train_end and cb.monitor.startswith("val") and (every or 1) > 1:  # a traceback after epoch 1
            raise ConfigError(f"--early_stopping.check_on_train_epoch_end true checks {cb.monitor!r} after every "
                              f"training epoch, but --trainer.check_val_every_n_epoch {every} validates only every "
                              f"{every} epochs: set it false, or validate every epoch")  # fmt: skip


def check_logger(trainer) -> None:
    """The run logs to TensorBoard (curves, hyperparameters, the learning-rate monitor): with ``--trainer.logger
    false`` Lightning refused the learning-rate monitor only after the sanity validation."""
    if trainer.logger is None:
        raise ConfigError("--trainer.logger false leaves the learning-rate monitor and the run's curves without a "
                          "logger: keep the default TensorBoard logger (or give another one)")  # fmt: skip


RUN_ARTIFACTS = ("config.yaml", "hparams.yaml", "model.onnx", "model_metadata.json", "report.json", "checkpoints")


def check_fresh_run_dir(trainer, ckpt_path=None, fitting: bool = True) -> None:
    """A command never writes into another run's folder. With an explicit logger version (or an empty name and
    version, which log into the save_dir itself) the folder can already hold a run: a second fit there mixed two
    runs' checkpoints (best-v1.ckpt) and curves, and ``test`` replaced the run's config.yaml with its own. A
    ``sub_dir`` moves the logs but not the checkpoints (Lightning keeps them in the version folder), and
    ``--checkpoint.dirpath`` can name another run's checkpoints folder: both are checked too. Resuming (``fit
    --ckpt_path`` a checkpoint inside that folder) is the one way back into a run's folder. Without ``fitting``
    (validate / test / predict write no checkpoint) only the log folder is checked."""
    folders: list[tuple[Path, str]] = []  # (folder, the flag that chose it)
    logger = trainer.logger
    if logger is not None and getattr(logger, "_version", None) is not None and getattr(logger, "log_dir", None):
        flag = "--trainer.logger.init_args.version"
        folders.append((Path(logger.log_dir), flag))
        if getattr(logger, "sub_dir", None) and getattr(logger, "root_dir", None):  # where the checkpoints go
            version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
            folders.append((Path(logger.root_dir) / version, flag))
    for cb in getattr(trainer, "checkpoint_callbacks", []) if fitting else []:
        if cb.dirpath is not None:
            folders.append((Path(cb.dirpath), "--checkpoint.dirpath / --last_checkpoint.dirpath"))
    resumed = None if ckpt_path is None or is_remote(ckpt_path) else Path(ckpt_path).resolve()
    for run, flag in folders:
        held = [name for name in RUN_ARTIFACTS if (run / name).is_file() or any((run / name).glob("*"))]
        held += sorted(p.name for p in run.glob("events.out.tfevents.*"))[:1]
        held += sorted(p.name for p in run.glob("*.ckpt"))[:1]
        if not held or (resumed is not None and run.resolve() in resumed.parents):
            continue  # a fresh folder, or resuming the run it holds
        raise ConfigError(f"{run}: already holds a run ({held[0]}); give a new folder ({flag}; none: a fresh "
                          "version_<N>), or resume that run with --ckpt_path")  # fmt: skip


def check_training_runs(trainer) -> None:
    """Some training step runs: with ``max_epochs 0``, ``max_steps 0``, ``limit_train_batches 0`` or a zero
    ``max_time`` Lightning only warns, and the run exported, reported and checkpointed nothing but the untrained
    network, exit 0."""
    from lightning.pytorch.callbacks import Timer

    timer = next((cb for cb in trainer.callbacks if isinstance(cb, Timer)), None)
    for flag, value in (("max_epochs", trainer.max_epochs), ("max_steps", trainer.max_steps),
                        ("limit_train_batches", trainer.limit_train_batches),
                        ("max_time", timer and timer._duration)):  # fmt: skip
        if value is not None and value == 0 and not isinstance(value, bool):
            raise ConfigError(f"--trainer.{flag} {value} runs no training step: the run would report and export an "
                              "untrained network")  # fmt: skip
    # A minimum above the maximum: Lightning stops at the maximum without a word, so the run was not what was asked
    loop = trainer.fit_loop
    for unit, low, high in (("epochs", loop.min_epochs, loop.max_epochs), ("steps", loop.min_steps, loop.max_steps)):
        if low is not None and high is not None and high >= 0 and low > high:
            raise ConfigError(f"--trainer.min_{unit} {low} is more than --trainer.max_{unit} {high}, which ends the "
                              f"training first; give min_{unit} <= max_{unit}")  # fmt: skip


def check_callbacks(trainer) -> None:
    """Callbacks that need what this model does not have: a ``backbone`` attribute (BackboneFinetuning) or an
    ``lr`` hyperparameter (LearningRateFinder; the learning rate is ``--model.optimizer.init_args.lr``). Both raised
    an AttributeError traceback at fit start."""
    from lightning.pytorch.callbacks import BackboneFinetuning, GradientAccumulationScheduler, LearningRateFinder

    for cb in trainer.callbacks:
        if isinstance(cb, GradientAccumulationScheduler) and trainer.accumulate_grad_batches != 1:  # else a traceback
            raise ConfigError(f"--trainer.accumulate_grad_batches {trainer.accumulate_grad_batches} and a "
                              "GradientAccumulationScheduler callback both set the accumulation: give one")  # fmt: skip
        if isinstance(cb, BackboneFinetuning):
            raise ConfigError("--trainer.callbacks BackboneFinetuning unfreezes a model's 'backbone', which this "
                              "model does not have")  # fmt: skip
        if isinstance(cb, LearningRateFinder):
            raise ConfigError("--trainer.callbacks LearningRateFinder sets a model's 'lr' hyperparameter, which this "
                              "model does not have: the learning rate is --model.optimizer.init_args.lr")  # fmt: skip


def check_prediction_writers(trainer) -> None:
    """A prediction writer must implement the method its ``write_interval`` calls: BasePredictionWriter itself (or a
    subclass that overrides only the other one) raised NotImplementedError, a traceback, after predicting."""
    from lightning.pytorch.callbacks import BasePredictionWriter

    methods = {"batch": ("write_on_batch_end",), "epoch": ("write_on_epoch_end",),
               "batch_and_epoch": ("write_on_batch_end", "write_on_epoch_end")}  # fmt: skip
    for cb in trainer.callbacks:
        if not isinstance(cb, BasePredictionWriter):
            continue
        interval = getattr(getattr(cb, "interval", None), "value", "batch")
        for name in methods.get(interval, ()):
            if getattr(type(cb), name) is getattr(BasePredictionWriter, name):
                raise ConfigError(f"--trainer.callbacks {type(cb).__name__} does not implement {name}, which its "
                                  f"write_interval {interval!r} calls: give a writer that does (a subclass of "
                                  "BasePredictionWriter), or use python -m dwcp_lstm forecast")  # fmt: skip


def check_checkpoint_names(callbacks) -> None:
    """No two checkpoint callbacks write the same file: with ``--last_checkpoint.filename best`` the every-epoch copy
    overwrote the best one, and the report and the ONNX model came silently from the last epoch's weights."""
    seen: dict = {}
    for cb in callbacks:
        if cb.filename is None:  # Lightning's own epoch/step names never collide with a fixed one
            continue
        if "/" in cb.filename or "\\" in cb.filename:  # the file would leave its folder: refused only at the end
            raise ConfigError(f"checkpoint filename {cb.filename!r} must be a plain file name (its folder is "
                              "--checkpoint.dirpath / --last_checkpoint.dirpath)")  # fmt: skip
        key = (str(Path(cb.dirpath).resolve()) if cb.dirpath is not None else None, cb.filename)
        if key in seen:
            raise ConfigError(
                f"two checkpoints would be written to the same file ({cb.filename!r} in "
                f"{cb.dirpath or 'the run folder'}): give --checkpoint.filename and --last_checkpoint.filename "
                "different names"
            )
        seen[key] = cb


def check_trainer_config(trainer: dict, seed) -> None:
    """Trainer values that Lightning accepts at construction and fails on mid-training (a modulo by zero at the first
    batch or validation check), and a seed numpy refuses."""
    for key in ("accumulate_grad_batches", "check_val_every_n_epoch"):
        value = trainer.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"--trainer.{key} must be an integer >= 1, got {value!r}")
    interval = trainer.get("val_check_interval")
    if interval is not None and not (
        (isinstance(interval, int) and not isinstance(interval, bool) and interval >= 1)
        or (isinstance(interval, float) and 0.0 < interval <= 1.0)
    ):
        what = "an integer >= 1 or a fraction in (0, 1]"
        raise ConfigError(f"--trainer.val_check_interval must be {what}, got {interval!r}")
    if seed is not None and not isinstance(seed, bool):  # true: Lightning draws one; false: no seeding
        check_seed(seed, "--seed_everything")
    clip = trainer.get("gradient_clip_val")
    if clip is not None and not (isinstance(clip, int | float) and not isinstance(clip, bool) and 0 <= clip < math.inf):
        raise ConfigError(f"--trainer.gradient_clip_val must be a number >= 0 (0 or null: no clipping; Lightning "
                          f"would silently skip a negative one), got {clip!r}")  # fmt: skip
    precision = str(trainer.get("precision"))
    if precision in ("64", "64-true", "16-true", "bf16-true") or precision.startswith("transformer-engine"):
        raise ConfigError(f"--trainer.precision {precision}: the batches and the exported graph are float32, so the "
                          "weights must be too: use 32-true, 16-mixed or bf16-mixed")  # fmt: skip
    strategy = trainer.get("strategy")
    path, init = _class_and_args(strategy)
    start = init.get("start_method") if isinstance(init, Mapping) else None
    if any(w in path.lower() for w in ("spawn", "fork", "notebook")) or start not in (None, "popen"):
        shown = path if start in (None, "popen") else f"{path} with start_method {start}"
        raise ConfigError(f"--trainer.strategy {shown} starts its processes from inside Python, which this CLI "
                          "cannot be pickled for: use ddp, which runs the command once per process "
                          "(docs/scaling_out.md)")  # fmt: skip
    callbacks = trainer.get("callbacks")
    for cb in callbacks if isinstance(callbacks, list | tuple) else [callbacks] if callbacks is not None else []:
        if _class_and_args(cb)[0].rsplit(".", 1)[-1] == "Timer":  # its enum argument cannot be saved in config.yaml:
            raise ConfigError("--trainer.callbacks Timer: give --trainer.max_time DD:HH:MM:SS instead (Lightning adds "
                              "its own Timer for it)")  # fmt: skip  # jsonargparse's refusal named no reason
    plugins = trainer.get("plugins")
    for plugin in plugins if isinstance(plugins, list | tuple) else [plugins] if plugins is not None else []:
        path, init = _class_and_args(plugin)
        name = path.rsplit(".", 1)[-1]
        if name.endswith("Precision") and name not in ("Precision", "MixedPrecision"):  # the precision check's bypass
            raise ConfigError(f"--trainer.plugins {name}: the batches and the exported graph are float32, so the "
                              "weights must be too: use --trainer.precision 32-true, 16-mixed or "
                              "bf16-mixed")  # fmt: skip
        args = init if isinstance(init, Mapping) else {}
        if name == "MixedPrecision" and str(args.get("precision")) == "16-mixed" and args.get("device") == "cpu":
            # float16 autocast on the CPU: the LSTM kernel has no such primitive, and the first step raised
            raise ConfigError("--trainer.plugins MixedPrecision with precision 16-mixed on device cpu: the CPU's LSTM "
                              "has no float16 kernel; use --trainer.precision 16-mixed (bf16 on a CPU) or "
                              "bf16-mixed")  # fmt: skip


def check_early_stopping(early_stopping) -> None:
    """``--early_stopping.min_delta`` is a finite number >= 0 and ``patience`` a count: a NaN delta made every epoch
    count as no improvement (training ended after ``patience`` epochs whatever the loss did, exit 0), and a negative
    one made every epoch count as one, so early stopping could never fire. Checked on the config, because the
    callback flips the delta's sign by its mode."""
    if early_stopping is None:
        return
    get = early_stopping.get if hasattr(early_stopping, "get") else lambda k, d=None: getattr(early_stopping, k, d)
    delta = get("min_delta", 0.0)
    if isinstance(delta, bool) or not isinstance(delta, int | float) or not 0 <= delta < math.inf:
        raise ConfigError(f"--early_stopping.min_delta must be a finite number >= 0 (the improvement that counts; a "
                          f"negative or NaN one stops on a schedule, not on the loss), got {delta!r}")  # fmt: skip
    patience = get("patience", 3)
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
        raise ConfigError(f"--early_stopping.patience must be an integer >= 0 (validations without improvement "
                          f"before stopping), got {patience!r}")  # fmt: skip


def _class_and_args(value) -> tuple[str, object]:
    """A config value that names a class: its class path (a plain string as given) and its init_args."""
    if isinstance(value, str):
        return value, None
    get = value.get if isinstance(value, Mapping) else (lambda k, d=None: getattr(value, k, d))
    path = get("class_path", None)
    init = get("init_args", None)
    if init is not None and not isinstance(init, Mapping):  # a jsonargparse Namespace
        init = vars(init) if hasattr(init, "__dict__") else None
    return (path if isinstance(path, str) else type(value).__name__ if value is not None else ""), init


def train_batches(trainer, dm) -> int:
    """The training batches of an epoch (``limit_train_batches`` applied); refused where there are none."""
    windows = len(dm.starts["train"])
    n = windows // dm.batch_size + (windows % dm.batch_size > 1)  # a last batch of one is dropped (batch norm)
    if n < 1:  # Lightning only says "No training batches", and the untrained network was exported and reported
        raise DataError(
            f"{dm.path}: the training split has {windows} window, which gives no training batch (a last "
            "batch of one window is dropped): give more rows or a larger training share (--data.split)"
        )
    limit = trainer.limit_train_batches
    n = min(n, limit) if isinstance(limit, int) else int(n * limit)
    if n < 1:
        raise ConfigError(f"--trainer.limit_train_batches {limit} leaves no training batch of the {windows} training "
                          f"windows' batches of {dm.batch_size}: give at least one batch")  # fmt: skip
    return n


def check_val_interval(trainer, dm) -> None:
    """An integer ``val_check_interval`` counts training batches: more than an epoch has, Lightning raised a
    traceback once the data was loaded. And a ``max_steps`` that ends training before the first validation leaves
    the validation monitors without a value: early stopping raised a traceback after the training, nothing exported."""
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    n = train_batches(trainer, dm)
    interval, every = trainer.val_check_interval, trainer.check_val_every_n_epoch
    counted = isinstance(interval, int) and not isinstance(interval, bool)
    if counted and every is not None and interval > n:
        raise ConfigError(f"--trainer.val_check_interval {interval} is more than the {n} training batches of an "
                          "epoch: give at most that, or a fraction of the epoch (e.g. 0.5)")  # fmt: skip
    epochs = epoch_budget(trainer)
    if counted and every is None and epochs is not None and interval > epochs * n:  # no validation, no best
        raise ConfigError(f"--trainer.val_check_interval {interval} with --trainer.check_val_every_n_epoch null "
                          f"counts batches across epochs, but --trainer.max_epochs {epochs} trains {epochs * n} "
                          "batches: no validation would run, so no best checkpoint; validate sooner")  # fmt: skip
    steps = trainer.max_steps
    monitor = next((cb.monitor for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint | EarlyStopping)
                    and cb.monitor is not None and cb.monitor.startswith("val")), None)  # fmt: skip
    if steps is None or steps < 1 or monitor is None or trainer.limit_val_batches == 0:
        return
    within = interval if counted else max(1, int(n * interval))  # Lightning's val_check_batch
    first = within if counted and every is None else ((every or 1) - 1) * n + within  # batches before it validates
    batches = steps * trainer.accumulate_grad_batches
    if batches < first:
        raise ConfigError(
            f"--trainer.max_steps {steps} ends training after {batches} batches, before the first validation (after "
            f"batch {first}): {monitor!r}, which the checkpoint and early stopping watch, would have no value; allow "
            "more steps or validate sooner (--trainer.val_check_interval)"
        )


def check_checkpoint_schedule(trainer, batches_per_epoch: int) -> None:
    """The checkpoint callback keeps a best checkpoint: the report, ``export --run`` and a resume read
    ``checkpoints/best.ckpt``. ``save_top_k 0``, or saving every N epochs or training steps beyond the run's, kept
    none: the run shipped its last weights, and its own ``report`` / ``export`` refused the folder afterwards."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    epochs = epoch_budget(trainer)
    steps = epochs * batches_per_epoch // max(1, trainer.accumulate_grad_batches) if epochs else None
    if trainer.max_steps is not None and trainer.max_steps > 0:
        steps = trainer.max_steps if steps is None else min(steps, trainer.max_steps)
    for cb in trainer.checkpoint_callbacks:
        if not isinstance(cb, ModelCheckpoint) or cb.monitor is None:
            continue  # the last-checkpoint callback (no monitor) keeps last.ckpt only, by design
        why = None
        if cb.save_top_k == 0:
            why = "--checkpoint.save_top_k 0 keeps none"
        elif epochs is not None and cb._every_n_epochs > epochs:
            why = f"--checkpoint.every_n_epochs {cb._every_n_epochs} saves after more epochs than the {epochs} trained"
        elif steps is not None and cb._every_n_train_steps > steps:
            why = (f"--checkpoint.every_n_train_steps {cb._every_n_train_steps} saves after more steps than the "
                   f"{steps} trained")  # fmt: skip
        if why:
            raise ConfigError(f"{why}: the run would have no best checkpoint, which the report, export and a resume "
                              "read (the last weights would be shipped)")  # fmt: skip


def check_test_batches(trainer, dm) -> None:
    """A fractional ``limit_test_batches`` leaves at least one test batch: the fit ends by testing the best
    checkpoint, and Lightning refused a fraction too small only then, after the training and the export."""
    limit = trainer.limit_test_batches
    if isinstance(limit, float) and 0 < limit < 1:
        n = math.ceil(len(dm.starts["test"]) / dm.batch_size)
        if int(n * limit) < 1:
            raise ConfigError(f"--trainer.limit_test_batches {limit} of the {n} test batches is none: give at least "
                              f"{1 / n:.3g}, or 1.0")  # fmt: skip


def check_calibration(dm, model) -> None:
    """The validation split holds enough windows to calibrate the widest interval level (found now, not after the
    training compute)."""
    from dwcp_lstm.intervals import windows_needed

    levels = model.hparams.get("interval_levels") or ()
    need, have = windows_needed(levels), len(dm.starts["val"])
    if levels and have < need:
        raise DataError(
            f"{dm.path}: the validation split has {have} windows; calibrating {100 * max(levels):g} % intervals "
            f"needs at least {need} (more data, a larger validation fraction, or lower --model.interval_levels)"
        )


def check_splits(dm) -> None:
    """Every split has windows: validation drives early stopping and checkpoints, test the report."""
    for stage, what in (("train", "training"), ("val", "validation"), ("test", "test")):
        if len(dm.starts[stage]) == 0:
            raise ConfigError(
                f"{dm.path}: no {what} windows with window_size {dm.window_size} and split {list(dm.split)} "
                f"(longest series segment: {int((dm.bounds[:, 1] - dm.bounds[:, 0]).max())} rows)"
            )


def check_writable(folder: str | Path) -> None:
    """The run folder can be created and written: found now, not after training."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe_writable(folder)
    except OSError as exc:
        raise ConfigError(f"{folder}: output folder is not writable ({exc.strerror or exc})") from None


def config_changes(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every config value that differs and is not allowed to change on resume."""
    a, b = _flatten(old), _flatten(new)
    out = []
    for key in sorted(set(a) | set(b)):
        if any(key == k or key.startswith(k + ".") for k in RESUME_MAY_CHANGE):
            continue
        if a.get(key) != b.get(key):
            out.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return out


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out if out else {prefix: d}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Local checkpoints go to a temporary file in the same folder, are fsynced, then renamed over the old one: a
    full disk or a kill mid-write leaves the previous checkpoint intact (Lightning's own writer stages the file
    elsewhere and moves it, which on another device is a copy that can stop half way)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if is_remote(path) or storage_options is not None:
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        get_filesystem(str(path)).makedirs(str(path.parent), exist_ok=True)
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                torch.save(checkpoint, f)
        except OSError as exc:
            why = exc.strerror or first_line(exc)
            msg = f"cannot write checkpoint ({why}); the previous one is intact"
            raise OSError(exc.errno, msg, str(path)) from None


class AtomicSaveConfig(SaveConfigCallback):
    """``config.yaml`` written to a temporary name and renamed (rank zero, no collectives): an interrupted write
    never leaves a half config beside a run's artifacts. Runs after the pre-flight checks, at trainer setup."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        from dwcp_lstm.callbacks import run_dir_of

        run_dir = run_dir_of(trainer)
        if run_dir is None or trainer.logger is None:  # no run folder (validate / test / predict without a logger):
            return  # the working directory's config.yaml, maybe the user's own --config, stays untouched
        run_dir.mkdir(parents=True, exist_ok=True)
        config = self.config.clone()
        for key in ("checkpoint.dirpath", "last_checkpoint.dirpath"):
            # Lightning resolves a relative folder against the working directory, which the run does not record:
            # read later from elsewhere, `export --run` found another run's checkpoint there and exported it here
            value = config.get(key) if key in config else None
            if isinstance(value, str) and value and not is_remote(value) and not Path(value).expanduser().is_absolute():
                config[key] = str(Path(value).expanduser().resolve())
        atomic_write(run_dir / self.config_filename, self.parser.dump(config, skip_none=False))

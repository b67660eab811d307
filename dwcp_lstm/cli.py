"""``python -m dwcp_lstm``: LightningCLI's fit / validate / test / predict plus the project's own subcommands.

Bad input of any kind ends in one line on stderr (``error: <file>: <what>``) and exit code 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from dwcp_lstm.errors import check_seed, parse_flags

if TYPE_CHECKING:
    from lightning.pytorch.cli import ArgsType

# The built-in configs: the package dwcp_lstm.configs, which pyproject.toml maps to the repository's configs/ folder
# (in a wheel and in the editable install alike); a source tree run without installing falls back to the folder.
try:
    from importlib.resources import files

    CONFIG_DIR = Path(str(files("dwcp_lstm.configs")))
except ModuleNotFoundError:
    CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
MAX_MESSAGE = 1000  # characters of a parser message shown: it quotes the value it refuses, whatever its size
# name -> (help, "module:function"); each takes the remaining argv. Imported lazily: `forecast` stays torch-free.
OWN_COMMANDS = {
    "generate": ("write synthetic DWCP telemetry (and its oracle sidecar)", "dwcp_lstm.cli:cmd_generate"),
    "report": ("rebuild report.json/.md and plots of a run from its best checkpoint", "dwcp_lstm.cli:cmd_report"),
    "export": ("export a run's best checkpoint again to model.onnx + model_metadata.json", "dwcp_lstm.cli:cmd_export"),
    "forecast": ("next-step forecasts per link from model.onnx (no torch needed)", "dwcp_lstm.serve:cmd_forecast"),
    "plan": ("live-migration time per link from model.onnx (no torch needed)", "dwcp_lstm.planner:cmd_plan"),
    "bench": ("latency, throughput and memory figures as JSON", "dwcp_lstm.bench:cmd_bench"),
}


# Trainer arguments where an int counts batches and a float is a fraction of them.
INT_OR_FRACTION = {f"trainer.{k}" for k in ("limit_train_batches", "limit_val_batches", "limit_test_batches",
                                           "limit_predict_batches", "overfit_batches")}  # fmt: skip


def _lightning_cli_class():
    from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor
    from lightning.pytorch.cli import LightningCLI

    from dwcp_lstm import preflight
    from dwcp_lstm.callbacks import FolderCheckpoint, OnnxExport, StepSeed
    from dwcp_lstm.preflight import AtomicCheckpointIO

    class DwcpCLI(LightningCLI):
        """Links the data's column lists to the model, adds the project's callbacks as config sections."""

        def add_arguments_to_parser(self, parser) -> None:
            parser.link_arguments("data.features", "model.feature_names")
            parser.link_arguments("data.targets", "model.target_names")
            parser.link_arguments("data.window_size", "model.window_size")
            parser.link_arguments("data.horizon", "model.horizon")
            parser.link_arguments("data.target_mode", "model.target_mode")
            parser.link_arguments("data.cyclic", "model.cyclic")
            parser.add_lightning_class_args(FolderCheckpoint, "checkpoint")
            parser.set_defaults(
                {
                    "checkpoint.monitor": "val_loss",
                    "checkpoint.filename": "best",
                    "checkpoint.auto_insert_metric_name": False,
                }
            )
            # last.ckpt after *every* epoch, for resuming: ModelCheckpoint(save_last=True) only refreshes it when a
            # new best is saved, so an interrupted run would lose every epoch since its best one.
            parser.add_lightning_class_args(FolderCheckpoint, "last_checkpoint")
            parser.set_defaults(
                {
                    "last_checkpoint.filename": "last",
                    "last_checkpoint.monitor": None,
                    "last_checkpoint.save_top_k": 1,
                    "last_checkpoint.enable_version_counter": False,
                }
            )
            parser.add_lightning_class_args(EarlyStopping, "early_stopping")
            parser.set_defaults({"early_stopping.monitor": "val_loss", "early_stopping.patience": 15})
            parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
            parser.add_lightning_class_args(StepSeed, "step_seed")
            parser.add_lightning_class_args(OnnxExport, "onnx")
            # Trainer's limit_*_batches / overfit_batches are Optional[Union[int, float]], but typing's Union cache
            # hands back an equal Union[float, int] made earlier, so jsonargparse tried float first: `1` (one batch)
            # became 1.0, i.e. every batch. int first again, as a PEP 604 union (no cache).
            for action in parser._actions:
                if action.dest in INT_OR_FRACTION and hasattr(action, "_typehint"):
                    action._typehint = int | float | None
            parser.add_argument(
                "--threads",
                type=int | None,
                default=None,
                help="torch CPU threads; null = OMP_NUM_THREADS if set, else half the usable cores (1..8): one per "
                "core collapses when another job shares the CPU (see dwcp_lstm/runtime.py)",
            )

        def before_instantiate_classes(self) -> None:
            import torch

            from dwcp_lstm.runtime import MAX_THREADS, resolve_threads, usable_cores

            preflight.check_factories(self.config[self.subcommand].get("model") or {})  # before any is called
            self._logger_follows_root()
            threads, source = resolve_threads(self.config[self.subcommand].get("threads"))
            if not 1 <= threads <= MAX_THREADS:  # named as given: the flag, or the environment variable
                where = "the environment variable OMP_NUM_THREADS" if source == "OMP_NUM_THREADS" else "--threads"
                raise _data_error(f"{where} must be from 1 to {MAX_THREADS}, got {threads}")
            torch.set_num_threads(threads)
            print(f"Using {threads} CPU thread(s) of {usable_cores()} usable cores ({source})", file=sys.stderr)

        def _logger_follows_root(self) -> None:
            """``--trainer.default_root_dir`` moves the runs: the config's logger writes under ``save_dir: .``, which
            would keep them in the working directory while Lightning's own default logger follows the root."""
            trainer = self.config[self.subcommand].get("trainer")
            root = trainer.get("default_root_dir") if trainer is not None else None
            logger = trainer.get("logger") if trainer is not None else None
            init = logger.get("init_args") if hasattr(logger, "get") else None
            if root is not None and init is not None and init.get("save_dir") in (".", "./"):
                init["save_dir"] = str(root)

        def instantiate_classes(self) -> None:
            """A class the config names (a callback, logger, profiler) that refuses its own ``init_args`` is a
            config error, one line, not a traceback; the project's own errors pass through as they are."""
            from lightning.fabric.utilities.exceptions import MisconfigurationException

            from dwcp_lstm.errors import DwcpError

            try:
                super().instantiate_classes()
            # ImportError: e.g. a TPU accelerator without XLA; RuntimeError: e.g. a second checkpoint callback whose
            # state key clashes with the run's own (same monitor and mode), refused by the Trainer's constructor
            except (ValueError, TypeError, ImportError, RuntimeError, MisconfigurationException) as exc:
                if isinstance(exc, DwcpError):
                    raise
                text = " ".join(str(exc).split())
                raise _data_error(f"cannot build the run from its config: {text[:400]}") from None

        def _parse_ckpt_path(self) -> None:
            """Lightning would copy the checkpoint's hyperparameters over the config here, silently overriding the
            user's flags (and unpickling the file before any check). The pre-flight checks compare them instead and
            name any difference. What runs here instead: the Trainer values that would fail only mid-training, and
            the seed, which Lightning applies right after this."""
            cfg = self.config.get(self.config.get("subcommand") or "", None)
            if cfg is not None:
                trainer = cfg.get("trainer")  # nested (a class path's init_args as a mapping), not flattened keys
                trainer = trainer.as_dict() if hasattr(trainer, "as_dict") else dict(trainer or {})
                preflight.check_trainer_config(trainer, cfg.get("seed_everything"))
                preflight.check_early_stopping(cfg.get("early_stopping"))

        def instantiate_trainer(self, **kwargs):
            # checkpoints are written to a temporary name and renamed (see preflight.AtomicCheckpointIO)
            if self._get(self.config_init, "trainer", default={}).get("plugins") is None:
                kwargs.setdefault("plugins", [AtomicCheckpointIO()])
            return super().instantiate_trainer(**kwargs)

        def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
            """Checkpoints are always loaded with ``weights_only=True``: for a URL Lightning would otherwise fall back
            to full unpickling, which runs whatever code the file carries."""
            kwargs = super()._prepare_subcommand_kwargs(subcommand)
            if kwargs.get("weights_only") is False:
                raise _data_error("--weights_only false is refused: a checkpoint is never unpickled with code")
            if "weights_only" in self._subcommand_method_arguments[subcommand]:
                kwargs["weights_only"] = True
            return kwargs

        def before_fit(self) -> None:
            """Everything the run needs is checked here, before the first training step."""
            cfg = self.config_init[self.subcommand]
            run_config = None
            if cfg.get("ckpt_path") == "last":
                run_config = self._resolve_last(cfg)
            elif cfg.get("ckpt_path") is not None and not preflight.is_remote(cfg["ckpt_path"]):
                beside = Path(cfg["ckpt_path"]).parent.parent / "config.yaml"
                run_config = beside if beside.is_file() else None
            # the logger's root, not its version folder: reading log_dir would fix the version before DDP agrees on it
            logger = self.trainer.logger
            root = getattr(logger, "root_dir", None) if logger is not None else None
            preflight.check_writable(root or self.trainer.default_root_dir)
            for cb in self.trainer.checkpoint_callbacks:  # --checkpoint.dirpath / --last_checkpoint.dirpath
                if cb.dirpath is not None:
                    preflight.check_writable(cb.dirpath)
            profiler_dir = getattr(self.trainer.profiler, "dirpath", None)  # written after the training and export
            if profiler_dir is not None:
                preflight.check_writable(profiler_dir)
            preflight.check_checkpoint_names(self.trainer.checkpoint_callbacks)
            preflight.check_fresh_run_dir(self.trainer, cfg.get("ckpt_path"))
            self._check_checkpoint(cfg, run_config)
            self._check_data("fit")
            preflight.check_calibration(self.datamodule, self.model)
            preflight.check_optimizer(self.model, preflight.validations(self.trainer))
            preflight.check_monitors(self.trainer, self.model)
            preflight.check_training_runs(self.trainer)
            preflight.check_callbacks(self.trainer)
            preflight.check_prediction_writers(self.trainer)
            preflight.check_logger(self.trainer)
            preflight.check_val_interval(self.trainer, self.datamodule)
            preflight.check_checkpoint_schedule(self.trainer, preflight.train_batches(self.trainer, self.datamodule))
            preflight.check_test_batches(self.trainer, self.datamodule)

        def before_validate(self) -> None:
            preflight.check_fresh_run_dir(self.trainer, fitting=False)
            self._check_checkpoint(self.config_init[self.subcommand], None)
            self._check_data("validate")

        def before_test(self) -> None:
            preflight.check_fresh_run_dir(self.trainer, fitting=False)
            self._check_checkpoint(self.config_init[self.subcommand], None)
            self._check_data("test")

        def before_predict(self) -> None:
            from lightning.pytorch.callbacks import BasePredictionWriter

            preflight.check_fresh_run_dir(self.trainer, fitting=False)
            self._check_checkpoint(self.config_init[self.subcommand], None)
            preflight.check_prediction_writers(self.trainer)
            if not any(isinstance(cb, BasePredictionWriter) for cb in self.trainer.callbacks):  # found by fuzzing
                raise _data_error("predict keeps its forecasts in memory and writes none (it ran, exit 0, and "
                                  "left nothing): use python -m dwcp_lstm forecast --model RUN --input FILE --output "
                                  "F, or give a writer (--trainer.callbacks+=<a BasePredictionWriter>)")  # fmt: skip
            self._check_data("predict")

        def _resolve_last(self, cfg) -> Path | None:
            """``--ckpt_path last`` resumes the newest run *in its own directory* (Lightning alone would look in a
            fresh version_N and silently start over). Returns that run's config.yaml."""
            logger = self.trainer.logger
            root = Path(logger.root_dir) if logger is not None else Path(self.trainer.default_root_dir)
            runs = sorted(
                (
                    p
                    for p in root.glob("version_*/checkpoints/last.ckpt")  # not a copy named version_0_old
                    if p.parent.parent.name.removeprefix("version_").isdigit()
                ),
                key=lambda p: p.stat().st_mtime,
            )
            if not runs:
                raise _data_error(f"--ckpt_path last: no {root}/version_<N>/checkpoints/last.ckpt to resume from")
            run = runs[-1].parent.parent
            links = sorted(p.name for p in run.iterdir() if p.is_symlink())
            if links:  # Lightning writes hparams.yaml and the event files with a plain open: through the link
                raise _data_error(f"{run}: {links[0]} is a symbolic link, and resuming would write through it "
                                  "(outside the run); replace it with a file or remove it")  # fmt: skip
            if logger is not None:
                logger._version = int(run.name.split("_")[-1])  # artifacts land beside the checkpoint
            cfg.ckpt_path = str(runs[-1])
            self._resumed_run = run
            print(f"Resuming {run} from {runs[-1]}")
            return run / "config.yaml" if (run / "config.yaml").is_file() else None

        def _check_checkpoint(self, cfg, run_config: Path | None) -> None:
            path = cfg.get("ckpt_path")
            if path is None and self.subcommand != "fit":  # Lightning would score the freshly initialised network
                raise _data_error(
                    f"{self.subcommand} needs --ckpt_path: a checkpoint file or URL (e.g. "
                    "lightning_logs/version_0/checkpoints/best.ckpt); without one the untrained network is scored"
                )
            if path is None:
                return
            if path in ("best", "last", "hpc", "registry") or str(path).startswith("registry:"):
                raise _data_error(
                    f"{self.subcommand} --ckpt_path {path}: give a checkpoint file or URL "
                    "(e.g. lightning_logs/version_0/checkpoints/best.ckpt)"
                )
            ckpt = preflight.load_checkpoint(path)
            preflight.check_compatible(ckpt, self.model, path)
            if self.subcommand != "fit" or run_config is None:  # no run config beside it: compare with its own record
                preflight.check_data_settings(ckpt, self.datamodule, None, path)
            if self.subcommand != "fit":
                return
            preflight.check_resumable(ckpt, self.model, path)
            self._check_restored_state(ckpt, path)
            # Resuming restores the model, optimizer, scheduler, loops and callbacks from the checkpoint: a changed
            # value would be written to config.yaml and report.json while the run kept the old one.
            if run_config is not None:
                import yaml

                from dwcp_lstm.runs import read_config

                old = read_config(run_config) or {}
                if not isinstance(old, dict):
                    raise _data_error(f"{run_config}: expected a mapping of settings, got {type(old).__name__}")
                new = yaml.safe_load(self._parser(self.subcommand).dump(self.config[self.subcommand], skip_none=False))
                changes = preflight.config_changes(old, new)
                where = run_config
            else:
                changes = [f"model.{k}: {a!r} -> {b!r}" for k, a, b in preflight.hparam_differences(ckpt, self.model)]
                where = path
            if changes:
                raise _data_error(
                    f"{where}: resuming needs the run's own settings; changed: {'; '.join(changes[:3])}"
                    + (f" (and {len(changes) - 3} more)" if len(changes) > 3 else "")
                    + " (start a new run to change them)"
                )

        def _check_restored_state(self, ckpt: dict, path) -> None:
            """What Lightning would refuse only while restoring the checkpoint, after config.yaml and the logger's
            event file were written into the run folder: checked here, before anything is written. The data file's
            bytes (again after the data is read, for a file that prepare_data writes) and the checkpoint callbacks'
            saved file names."""
            from dwcp_lstm.data import check_same_data

            self._resume_state = ckpt.get(type(self.datamodule).__qualname__)
            check_same_data(self.datamodule, self._resume_state, "the checkpoint")
            states = ckpt.get("callbacks") if isinstance(ckpt.get("callbacks"), dict) else {}
            for cb in self.trainer.checkpoint_callbacks:
                state = states.get(cb.state_key)
                if not isinstance(cb, FolderCheckpoint) or not isinstance(state, dict):
                    continue
                # --ckpt_path last fixed the logger's version: the folder is the one setup() will resolve, exactly
                if cb.dirpath is None and getattr(self, "_resumed_run", None) is not None:
                    cb.dirpath = cb._ModelCheckpoint__resolve_ckpt_dir(self.trainer)
                    try:
                        cb.check_state(state, path)
                    finally:
                        cb.dirpath = None
                elif cb.dirpath is not None:
                    cb.check_state(state, path)

        def _check_data(self, stage: str) -> None:
            dm = self.datamodule
            dm.prepare_data()
            dm.setup("fit" if stage == "fit" else "test")
            if stage == "fit":
                from dwcp_lstm.evaluate import oracle_forecasts

                preflight.check_splits(dm)
                if getattr(self, "_resume_state", None) is not None:  # a file prepare_data generated just now
                    from dwcp_lstm.data import check_same_data

                    check_same_data(dm, self._resume_state, "the checkpoint")
                oracle_forecasts(dm, dm.target_rows("test"))  # the report reads it: a broken sidecar fails now
            else:
                split = "val" if stage == "validate" else "test"
                if len(dm.starts[split]) == 0:
                    raise _data_error(f"{dm.path}: no {split} windows to {stage} on")
                limit = {"validate": "limit_val_batches", "test": "limit_test_batches"}.get(
                    stage, "limit_predict_batches"
                )
                if getattr(self.trainer, limit) == 0:  # Lightning then scores nothing and exits 0
                    raise _data_error(f"--trainer.{limit} 0 leaves nothing to {stage}")

        def after_fit(self) -> None:
            from dwcp_lstm.callbacks import best_module, run_dir_of
            from dwcp_lstm.evaluate import evaluate

            trainer = self.trainer
            run_dir = run_dir_of(trainer)
            if trainer.fast_dev_run or run_dir is None:
                return
            best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best" if best else None, weights_only=True)
            if not trainer.is_global_zero:
                return
            export = next((cb for cb in trainer.callbacks if isinstance(cb, OnnxExport)), None)
            reuse = {"val_pred": export.val_pred, "val_calibration": export.calibration} if export else {}
            module = export.module if export is not None else None  # its blend fitted: not fitted twice
            if module is None:
                module = best_module(trainer, self.model)
            report = evaluate(module, self.datamodule, run_dir, best or None, **reuse)
            log_to_tensorboard(trainer, self.model, report, run_dir)
            print_summary(report, str(run_dir))

    return DwcpCLI


def log_to_tensorboard(trainer, model, report: dict, run_dir: Path) -> None:
    """HPARAMS tab (hyperparameters with the final test figures) and the report's figures as images."""
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = trainer.logger
    if not isinstance(logger, TensorBoardLogger):
        return
    figures = {f"hp/test_{k}": v for k, v in report["overall"].items()}
    figures.update({f"hp/gap_closed_{t}": v for t, v in (report.get("gap_closed") or {}).items()})
    # numbers only, and only defined ones (a target that never changes has no correlation)
    final = {k: float(v) for k, v in figures.items() if isinstance(v, int | float) and not isinstance(v, bool)
             and math.isfinite(v)}  # fmt: skip
    hparams = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in model.hparams.items()}
    logger.log_hyperparams(hparams, metrics=final)
    import matplotlib.image as mpimg

    for name in ("predictions_scatter", "timeseries", "baselines", "error_distribution"):
        path = run_dir / f"{name}.png"
        if path.exists():
            logger.experiment.add_image(f"test/{name}", mpimg.imread(path)[..., :3], dataformats="HWC")
    logger.experiment.flush()


def print_summary(report: dict, run_dir: str) -> None:
    ov = report["overall"]
    print(f"\nTest set ({report['windows']} windows), report in {run_dir}/report.md")
    for t, m in report["per_target"].items():
        print(f"  {t:16s} corr {m['correlation']:.4f}  MAPE {m['mape']:6.2f} %  RMSE {m['rmse']:.4g}  R2 {m['r2']:.4f}")
    print(
        f"  mean correlation {ov['average_correlation']:.4f} (accuracy {ov['accuracy_percent']:.2f} %), "
        f"mean MAPE {ov['average_mape']:.2f} %, target met: {ov['target_met']}"
    )
    if report.get("gap_closed"):
        print("  gap closed to oracle: " + ", ".join(f"{t} {v:.3f}" for t, v in report["gap_closed"].items()))
    print(f"Run directory: {run_dir}")


def check_config_files(args: list[str]) -> None:
    """Every ``--config`` file is UTF-8 text (jsonargparse's UnicodeDecodeError named no file and left a traceback)
    whose aliases do not expand without end and whose keys are not written twice
    (:func:`dwcp_lstm.runs.check_yaml_size`), holding a mapping of settings."""
    import yaml

    from dwcp_lstm.runs import check_yaml_size
    from dwcp_lstm.tables import first_line, short_repr

    paths = [b for a, b in zip(args, args[1:], strict=False) if a == "--config"]
    paths += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    for path in map(Path, paths):
        if path.is_file():  # a missing one, or a config given inline, is jsonargparse's to report
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise _data_error(f"{path}: not UTF-8 text ({first_line(exc)[:120]})") from None
            if isinstance(check_yaml_size(text, path), yaml.MappingNode):
                continue
            try:  # not a mapping: jsonargparse said only "Unexpected config: <the text>"
                value = yaml.safe_load(text)  # its size was checked above
            except yaml.YAMLError:
                continue  # jsonargparse names the syntax error
            what = "empty (or only comments)" if value is None else f"a {type(value).__name__}, {short_repr(value)}"
            raise _data_error(f"{path}: the config is {what}; expected a mapping of settings (e.g. trainer: ...)")


def run_lightning(args: list[str]) -> None:
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from dwcp_lstm.data import DwcpDataModule
    from dwcp_lstm.imports import config_files_checked
    from dwcp_lstm.module import DwcpForecaster
    from dwcp_lstm.preflight import AtomicSaveConfig
    from dwcp_lstm.tables import first_line

    # The built-in default goes first so that the user's --config files and flags layer on top of it. (jsonargparse's
    # default_config_files drops the class_path of callable arguments such as model.optimizer, so it is not used.)
    if args and args[0] in LIGHTNING_COMMANDS and not any(a in ("-h", "--help") for a in args):
        args = [args[0], "--config", str(DEFAULT_CONFIG), *args[1:]]
    check_config_files(args)
    # LightningCLI warns when both `args` and sys.argv carry arguments; `args` is the truth here. sys.argv itself must
    # stay intact: DDP's launcher re-runs it for the other ranks.
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended to run from within Python")
    try:
        with config_files_checked():  # a group given as a file (--data FILE) is checked like a --config file
            _lightning_cli_class()(
                DwcpForecaster,
                DwcpDataModule,
                save_config_callback=AtomicSaveConfig,
                save_config_kwargs={"overwrite": True, "save_to_log_dir": False},  # AtomicSaveConfig writes it
                parser_kwargs={"exit_on_error": False},  # errors reach cli_main, which prints one line
                args=args,
            )
    except MisconfigurationException as exc:  # a Trainer argument Lightning refuses (e.g. max_epochs < -1)
        raise _data_error(" ".join(first_line(exc).split())) from None


def cmd_generate(argv: list[str]) -> None:
    from jsonargparse import ArgumentParser

    from dwcp_lstm import synthetic
    from dwcp_lstm.tables import check_output_file, check_table_suffix

    p = ArgumentParser(prog="python -m dwcp_lstm generate", description=OWN_COMMANDS["generate"][0])
    p.add_argument("--output", default="data/dwcp_training.csv", help="CSV or Parquet file to write")
    p.add_argument("--samples", type=int, default=15_000, help="total rows over all links")
    p.add_argument("--seed", type=int, default=42, help="generator seed")
    p.add_argument("--profile", choices=list(synthetic.PROFILES), default="dynamic", help="data model")
    p.add_argument("--links", type=int, default=None, help="number of links (dynamic); default samples / 3000")
    p.add_argument("--noise", type=float, default=0.02, help="relative measurement noise of the targets (dynamic)")
    p.add_argument("--oracle", type=bool, default=True, help="also write the oracle sidecar <output>.oracle.<ext>")
    p.add_argument(
        "--oracle-steps",
        type=int,
        default=1,
        help="steps the sidecar forecasts: oracle_<target> (step 1) and oracle_<target>_h<k> for k = 2..K, the "
        "Monte Carlo of the h-step forecast (dynamic: about 4 s per 15,000 rows x 12 steps); for data.horizon K",
    )
    p.add_argument("--card", action="store_true", help="print the data card's oracle/persistence table and exit")
    a = parse_flags(p, argv)
    check_seed(a.seed, "--seed")
    if a.card:  # the card of both profiles at --samples and --seed: other flags would be ignored, silently
        given = [f for f in ("--output", "--profile", "--links", "--noise", "--oracle", "--oracle-steps")
                 if any(arg == f or arg.startswith(f"{f}=") for arg in argv)]  # fmt: skip
        if given:
            raise _data_error(f"--card prints the data card of --samples and --seed only; {given[0]} does not apply")
        if a.samples < 1000:  # the last 15 % of each link: too few rows give NaN correlations
            raise _data_error(f"--card needs --samples of at least 1000, got {a.samples}")
        try:
            print(synthetic.card_markdown(a.samples, a.seed))
        except ValueError as exc:  # the generator's own range checks (--samples)
            raise _data_error(str(exc)) from None
        return
    if not a.oracle and any(arg == "--oracle-steps" or arg.startswith("--oracle-steps=") for arg in argv):
        raise _data_error("--oracle-steps sets the steps of the oracle sidecar, which --oracle false does not write")
    if not 1 <= a.oracle_steps <= 288:  # the Monte Carlo's time grows with rows x steps; a day at 5 minutes is plenty
        raise _data_error(f"--oracle-steps must be from 1 to 288, got {a.oracle_steps}")
    if not 0 <= a.noise <= 0.1:  # beyond ~0.2 the noise drives throughput, RTT or jitter below zero: unreadable data
        raise _data_error(f"--noise must be from 0 to 0.1 (relative), got {a.noise}")
    if a.profile == "seed" and any(arg == "--noise" or arg.startswith("--noise=") for arg in argv):
        raise _data_error("--noise applies to the dynamic profile only; the seed profile's noise is its own (fixed)")
    out = Path(a.output)
    check_table_suffix(out)
    if out.stem.endswith(".oracle"):  # it would replace the sidecar of the data file beside it, and get its own
        raise _data_error(f"{out}: a name ending in .oracle{out.suffix} is the oracle sidecar of another data file; "
                          "choose another name")  # fmt: skip
    try:  # the folder is created (the default is data/...), and checked, before any row is generated
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _data_error(f"{out}: cannot create folder {out.parent} ({exc.strerror or exc})") from None
    check_output_file(out)
    if a.oracle:  # a folder holding the sidecar's name was found only after the data file had been replaced
        check_output_file(synthetic.oracle_path(out))
    try:
        df, oracle = synthetic.generate_with_oracle(
            a.samples, a.seed, a.profile, a.links, a.noise, oracle_steps=a.oracle_steps if a.oracle else 1
        )
    except ValueError as exc:
        raise _data_error(str(exc)) from None
    synthetic.write_frame(df, out)  # checks the suffix before anything is written
    if a.oracle:
        synthetic.write_oracle(oracle, out)
    elif synthetic.oracle_path(out).is_file():  # the previous data's oracle: its keys match every new row
        synthetic.oracle_path(out).unlink()
        print(f"removed {synthetic.oracle_path(out)}: the oracle of the data this file held before", file=sys.stderr)
    n_links = df.groupby(["node_id", "peer_id"], observed=True).ngroups
    print(f"wrote {len(df)} rows, {n_links} links ({a.profile} profile, seed {a.seed}) -> {out}")


def cmd_report(argv: list[str]) -> None:
    from jsonargparse import ArgumentParser

    from dwcp_lstm.errors import check_named
    from dwcp_lstm.evaluate import evaluate
    from dwcp_lstm.online import RATE
    from dwcp_lstm.runs import load_run

    p = ArgumentParser(prog="python -m dwcp_lstm report", description=OWN_COMMANDS["report"][0])
    p.add_argument("--run", required=True, help="a run directory, e.g. lightning_logs/version_0")
    p.add_argument("--online-rate", type=float, default=RATE, help="step of the online recalibration judged beside "
                   "the static intervals (log multiplier per outcome; docs/method.md)")  # fmt: skip
    a = parse_flags(p, argv)
    check_named(a.run, "--run", "a run directory")  # '' is the working directory
    if not (math.isfinite(a.online_rate) and 0 < a.online_rate <= 1):  # 1: a miss at 80 % already widens 2.2x
        raise _data_error(f"--online-rate must be a number in (0, 1] (default {RATE}), got {a.online_rate:g}")
    module, dm, ckpt = load_run(a.run)
    report = evaluate(module, dm, a.run, str(ckpt), online_rate=a.online_rate)
    print_summary(report, a.run)


def cmd_export(argv: list[str]) -> None:
    from jsonargparse import ArgumentParser

    from dwcp_lstm.callbacks import check_opset, export_run
    from dwcp_lstm.errors import check_named
    from dwcp_lstm.runs import load_run

    p = ArgumentParser(prog="python -m dwcp_lstm export", description=OWN_COMMANDS["export"][0])
    p.add_argument("--run", required=True, help="a run directory, e.g. lightning_logs/version_0")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (17 to the newest this torch exports)")
    a = parse_flags(p, argv)
    check_named(a.run, "--run", "a run directory")
    check_opset(a.opset, "--opset")
    module, dm, ckpt = load_run(a.run)
    meta = export_run(module, dm, Path(a.run), a.opset)
    parity = meta["parity"]["max_rel_diff"]
    print(f"exported {ckpt} -> {Path(a.run) / 'model.onnx'} (max rel diff vs PyTorch {parity:.2e})")


def _data_error(msg: str):
    """A configuration problem found by the CLI (the name predates :mod:`dwcp_lstm.errors`)."""
    from dwcp_lstm.errors import ConfigError

    return ConfigError(msg)


def config_files(argv: list[str]) -> list[tuple[int, str]]:
    """The ``--config`` files of a command line, each with the position of the argument after it, in reading order."""
    found = []
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            found.append((i + 2, argv[i + 1]))
        elif a.startswith("--config="):
            found.append((i + 1, a.split("=", 1)[1]))
    return found


def blame_config(text: str, argv: list[str]) -> str:
    """``text`` (a one-line error) with the ``--config`` file behind it in front: jsonargparse's messages say which
    key is wrong (``Parser key "trainer.max_epochs"``), or that some YAML did not parse, but not in which file, and a
    command may read several. jsonargparse checks each file as it reads it, so its ``Given value`` is blamed on the
    first file holding that value; the project's own checks (``--model.loss must be ...``) see the final value, the
    last file's unless a flag later on the line sets it again. A YAML error is the first file that does not parse.
    ``text`` unchanged where no file is to blame."""
    import re

    import yaml

    key = re.match(r'Parser key "([^"]+)"|--([\w.]+) ', text)
    key = key and (key.group(1) or key.group(2))
    setters = []  # (position after it, file, value) of every file that sets the key, in reading order
    for i, path in config_files(argv):
        try:
            doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except yaml.YAMLError:
            if not key:  # jsonargparse reads the files in order: this is the one that failed
                return f"{path}: {text}"
            continue
        except (OSError, UnicodeDecodeError):
            continue  # a missing or unreadable file: jsonargparse's message names it already
        if key and key != "config":  # "config": a file that does not exist, named by jsonargparse already
            node = doc
            for part in key.split("."):
                node = node.get(part, KeyError) if isinstance(node, dict) else KeyError
            if node is not KeyError:
                setters.append((i, path, node))
    given = re.search(r"Given value: (.*)$", text)
    if given:
        return next((f"{p}: {text}" for _, p, v in setters if str(v) == given.group(1).strip()), text)
    if setters:
        i, path, _ = setters[-1]
        later = any(a == f"--{key}" or a.startswith(f"--{key}=") for a in argv[i:])
        return text if later else f"{path}: {text}"
    return text


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (a StreamHandler would keep a stream that may be closed)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr)


class _Stopped(BaseException):  # noqa: N818 (a signal, not an error: no `except Exception` may swallow it)
    """SIGTERM or Ctrl-C inside a project command: raised in place of dying, so that every ``finally`` runs (the
    temporary files of ``generate``, ``report`` and ``export`` were left behind, and Ctrl-C printed a traceback)."""


@contextlib.contextmanager
def _sigterm_unwinds():
    """SIGTERM (exit 143) and SIGINT (130) raise :class:`_Stopped` while the block runs (main thread only)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, _frame):
        name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
        raise _Stopped(name, 128 + signum)

    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def cli_main(args: ArgsType = None) -> None:
    """Entry point; ``args`` (a list) lets tests call it in-process."""
    argv = list(sys.argv[1:] if args is None else args)
    log = logging.getLogger("dwcp_lstm")  # data warnings (sorted rows, gaps, skipped links) go to stderr
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("warning: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    if argv[:1] in (["-h"], ["--help"]) or not argv:
        print("usage: python -m dwcp_lstm {" + ",".join([*LIGHTNING_COMMANDS, *OWN_COMMANDS]) + "} [options]\n")
        print("Lightning subcommands (configs/default.yaml is the built-in default; see `fit --help`):")
        for c in LIGHTNING_COMMANDS:
            print(f"  {c}")
        print("Project subcommands:")
        for c, (h, _) in OWN_COMMANDS.items():
            print(f"  {c:10s} {h}")
        return
    from importlib.util import find_spec

    from dwcp_lstm.errors import ConfigError, DwcpError

    try:
        from jsonargparse import ArgumentError  # a bad flag or config value (absent from a serving install)
    except ImportError:  # pragma: no cover (then only `forecast` runs, whose parser raises ConfigError)
        ArgumentError = ConfigError  # noqa: N806

    try:
        # A serving install (`pip install dwcp_lstm`, no extras) runs `forecast` and `plan` only; the rest needs the
        # extra `train` (`generate` just its scipy). Looked up by name, before anything heavy is imported.
        if argv[0] not in ("forecast", "plan"):
            stack = ["torch", "lightning", "torchmetrics", "scipy", "sklearn", "onnx", "onnxscript", "matplotlib",
                     "jsonargparse", "yaml"]  # fmt: skip
            needs = ["scipy", "jsonargparse"] if argv[0] == "generate" else stack
            missing = [m for m in needs if find_spec(m) is None]
            if missing:
                known = argv[0] in (*LIGHTNING_COMMANDS, *OWN_COMMANDS)
                serving = "this install runs 'forecast' and 'plan' only; the rest needs"
                what = "needs" if known else f"is unknown here: {serving}"
                raise ConfigError(
                    f"{argv[0]!r} {what} the training stack (missing: {', '.join(missing)}): "
                    "pip install -c constraints.txt 'dwcp_lstm[train]'"
                )
        if argv[0] not in ("forecast", "plan"):  # the serving commands parse no config (and may lack jsonargparse)
            from dwcp_lstm.imports import restrict_config_imports

            restrict_config_imports()  # before any config is parsed: a config must not name code to import or run
        if argv[0] in OWN_COMMANDS:
            module, func = OWN_COMMANDS[argv[0]][1].split(":")
            with _sigterm_unwinds():
                getattr(importlib.import_module(module), func)(argv[1:])
        else:
            run_lightning(argv)
    except SystemExit as exc:
        if type(exc).__name__ != "SIGTERMException":  # Lightning's, code None: a terminated run exited 0
            raise
        print("error: stopped by SIGTERM before the run finished (nothing exported or reported); resume it with "
              "python -m dwcp_lstm fit --ckpt_path last and the same flags", file=sys.stderr)  # fmt: skip
        raise SystemExit(128 + 15) from None  # what a shell reports for a process that SIGTERM ended
    except _Stopped as exc:  # SIGTERM / Ctrl-C in a project command: its temporary files were removed on the way
        print(f"error: stopped by {exc.args[0]} (nothing half-written was kept)", file=sys.stderr)
        raise SystemExit(exc.args[1]) from None
    except DwcpError as exc:
        print(f"error: {blame_config(str(exc), argv) if argv[0] in LIGHTNING_COMMANDS else exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except ArgumentError as exc:  # jsonargparse's message, on one line
        from dwcp_lstm.imports import denied_message

        text = denied_message(str(exc)) or blame_config(" ".join(str(exc).split()), argv)
        if len(text) > MAX_MESSAGE:  # it quotes the value: a 1 MB string in a config was one 1 MB error line
            text = f"{text[:MAX_MESSAGE]}... ({len(text) - MAX_MESSAGE:,} more characters)"
        print(f"error: {text}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as exc:  # the machine, not the input: a full disk, a folder that vanished (exit 1)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except FloatingPointError as exc:  # raised by the training step before any checkpoint of the bad state
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(3) from None

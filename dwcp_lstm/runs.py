"""Reopen a finished run: its DataModule from ``config.yaml`` and its best checkpoint (``weights_only=True``)."""

from __future__ import annotations

from pathlib import Path

import yaml
from jsonargparse import ArgumentError, ArgumentParser

from dwcp_lstm.blend import fit_blend
from dwcp_lstm.callbacks import check_finite_weights
from dwcp_lstm.data import DwcpDataModule, check_same_data
from dwcp_lstm.errors import CheckpointError, ConfigError, DataError
from dwcp_lstm.imports import config_files_checked, restrict_config_imports
from dwcp_lstm.module import DwcpForecaster
from dwcp_lstm.preflight import check_data_settings, load_checkpoint, plain_value
from dwcp_lstm.tables import first_line, log, short_repr


def _named(cfg: object, section: str, default: str, run_dir: Path) -> tuple[Path, str]:
    """The folder and file name (no suffix) a run's config gave one of its checkpoint callbacks."""
    s = cfg.get(section) if isinstance(cfg, dict) else None
    s = s if isinstance(s, dict) else {}
    if not s.get("dirpath"):
        return run_dir / "checkpoints", str(s.get("filename") or default)
    folder = Path(str(s["dirpath"])).expanduser()
    if not folder.is_absolute():  # fit records it absolute: relative to which folder is not known
        raise ConfigError(f"{run_dir / 'config.yaml'}: {section}.dirpath {str(folder)!r} is relative to the folder "
                          "the fit ran in, which the run does not record; write it as an absolute path")  # fmt: skip
    return folder, str(s.get("filename") or default)


def find_checkpoint(run_dir: Path) -> Path:
    """The run's best checkpoint, named as its config named it (``--checkpoint.filename`` / ``dirpath``; default
    ``checkpoints/best.ckpt``). A name with a template (``{epoch}-{val_loss:.3f}``) is found through the best name
    that the last checkpoint's state recorded. Never ``last.ckpt`` in its place: that exported and reported the last
    epoch's weights, silently, over the best's figures."""
    cfg = read_config(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else None
    folder, name = _named(cfg, "checkpoint", "best", run_dir)
    last_folder, last_name = _named(cfg, "last_checkpoint", "last", run_dir)
    last = last_folder / f"{last_name}.ckpt"
    if "{" not in name:
        if (folder / f"{name}.ckpt").exists():  # a directory or a device too: load_checkpoint says what it is
            return folder / f"{name}.ckpt"
        if last.is_file():  # every fit writes both: the best one was removed, and the last epoch is another model
            raise CheckpointError(
                f"{folder / f'{name}.ckpt'}: the run's best checkpoint is missing ({last.name} holds the last epoch, "
                f"not the best); restore it, or copy {last.name} to {name}.ckpt to use the last epoch"
            )
    elif last.is_file():
        for key, state in (load_checkpoint(last).get("callbacks") or {}).items():
            if key.startswith("ModelCheckpoint") and isinstance(state, dict) and state.get("monitor") is not None:
                path = folder / Path(str(state.get("best_model_path") or "")).name
                if path.name and path.is_file():
                    return path
        raise CheckpointError(f"{run_dir}: cannot tell which checkpoint is the best ({name!r} is a template and "
                              f"{last.name} records none of its files)")  # fmt: skip
    raise CheckpointError(f"{run_dir}: no checkpoints/best.ckpt or checkpoints/last.ckpt (not a finished fit run?)")


MAX_CONFIG_VALUES = 100_000  # a config has hundreds; YAML aliases of aliases ("billion laughs") expand to billions


def check_yaml_size(text: str, path: str | Path) -> yaml.Node | None:
    """Refuse YAML whose aliases expand to more than :data:`MAX_CONFIG_VALUES` values: the parser stores each
    anchor once, but jsonargparse copies every expansion (a 9-level bomb of 1 KB took over 2 GB and never ended).
    Refuse a key written twice in one mapping, too: YAML readers keep the last, so a second ``data:`` section
    replaced the first whole (its ``data_path`` with it: the run trained on the built-in data, exit 0). Returns the
    composed document (None: empty, or a syntax error that the reader which follows names)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None  # the reader that follows names the syntax error
    except RecursionError:
        raise ConfigError(f"{path}: not a usable config (nested too deeply)") from None
    stack, seen = [root] if root is not None else [], 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_CONFIG_VALUES:
            raise ConfigError(f"{path}: the YAML expands to more than {MAX_CONFIG_VALUES:,} values (aliases of "
                              "aliases?); not a config this CLI reads")  # fmt: skip
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            keys: set = set()
            for key, _ in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else None
                if name is not None and name in keys:
                    raise ConfigError(f"{path}: line {key.start_mark.line + 1}: key {short_repr(name)} appears twice "
                                      "in one section (the second would replace the first whole)")  # fmt: skip
                keys.add(name)
            stack.extend(v for pair in node.value for v in pair)
    return root


def read_config(config_path: Path) -> object:
    """A run's config.yaml, parsed; unreadable, not UTF-8, not YAML or nested beyond Python's recursion limit: one
    :class:`ConfigError` naming the file."""
    try:
        text = Path(config_path).read_text(encoding="utf-8")
        check_yaml_size(text, config_path)
        return yaml.safe_load(text)
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
    for key, value in cfg["data"].items():  # the fit writes every group inline: a file name here was put there
        if key == "synthetic" and isinstance(value, str):  # (report read any YAML file and echoed its keys)
            raise ConfigError(f"{config_path}: data.synthetic is {short_repr(value)}, a file name; a run's "
                              "config.yaml holds every setting inline (as the fit wrote it)")  # fmt: skip
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(DwcpDataModule, "data")
    try:
        with config_files_checked(str(config_path)):  # no other file is read for it
            ns = parser.parse_object({"data": cfg["data"]})
        return parser.instantiate_classes(ns).data
    except ArgumentError as exc:  # an unknown key or a value of the wrong type (jsonargparse's text spans lines)
        raise ConfigError(f"{config_path}: {' '.join(str(exc).split())[:400]}") from None
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
    contents = load_checkpoint(ckpt)  # weights only, like every checkpoint read here
    check_data_settings(contents, dm, config, ckpt)  # before any data is read or generated
    state = contents.get(type(dm).__qualname__)
    # the file's bytes, before it is parsed: a tampered data_path naming any CSV had its header echoed in a refusal
    check_same_data(dm, state, f"the checkpoint {ckpt.name}")
    dm.prepare_data()
    dm.setup(stage)
    check_same_data(dm, state, f"the checkpoint {ckpt.name}")  # again: a file that prepare_data generated
    cfg = read_config(config)
    # before the module is built from them: a tampered window_size of 10**9 first allocated 36 GB
    check_run_hparams(contents.get("hyper_parameters") or {}, dm, cfg, config, ckpt)
    try:
        module = DwcpForecaster.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which, not a traceback
        raise CheckpointError(f"{ckpt}: cannot load checkpoint ({type(exc).__name__}: {cause(exc)})") from None
    check_finite_weights(module, str(ckpt))  # report printed "mean correlation nan", export replaced model.onnx
    warn_edited_model_settings(cfg, module.hparams, config, ckpt)
    module = module.eval()
    fit_blend(module, dm)  # after training, like the intervals: from the checkpoint and the validation split
    return module, dm, ckpt


def cause(exc: BaseException) -> str:
    """An exception's message on one line, at most 300 characters: jsonargparse's begins with a line that ends in a
    colon (``Parser key "module.optimizer":``) and says what is wrong on the next one."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    return text if len(text) <= 300 else text[:300] + "..."


MODEL_SIZES = ("lstm_sizes", "head_sizes", "late_head_size")  # fix the weights' shapes, so the memory of the model


def check_run_hparams(h: dict, dm: DwcpDataModule, cfg: object, config: Path, ckpt: Path) -> None:
    """The checkpoint's hyperparameters describe the run's model: its data settings are the config's, and so are the
    layer sizes (the fit wrote both). Checked before the module is built from them."""
    for key, ours, theirs in (
        ("features", dm.features, h.get("feature_names")),
        ("targets", dm.targets, h.get("target_names")),
        ("window_size", dm.window_size, h.get("window_size")),
        ("horizon", dm.horizon, h.get("horizon", 1)),
        ("target_mode", dm.target_mode, h.get("target_mode")),
    ):
        if theirs is not None and ours != plain_value(theirs):
            raise ConfigError(f"{config}: data.{key} is {ours}, the checkpoint {ckpt.name} was trained with "
                              f"{short_repr(theirs)}")  # fmt: skip
    model = cfg.get("model") if isinstance(cfg, dict) else None
    args = model.get("init_args", model) if isinstance(model, dict) else None
    for key in MODEL_SIZES if isinstance(args, dict) else ():
        if key in args and key in h and plain_value(args[key]) != plain_value(h[key]):
            raise CheckpointError(f"{ckpt}: its model.{key} is {short_repr(h[key])}, but the run's config.yaml "
                                  f"records {short_repr(args[key])} (one of the two was edited)")  # fmt: skip


def warn_edited_model_settings(cfg: object, hparams, config: Path, ckpt: Path) -> None:
    """The model's settings come from the checkpoint: a ``model`` value in config.yaml that differs from what the
    checkpoint was trained with is ignored, and says so (an edited ``interval_levels`` or ``mape_floor`` changed
    nothing in the report, while the report echoed the edited file; found by fuzzing)."""
    model = cfg.get("model") if isinstance(cfg, dict) else None
    args = model.get("init_args", model) if isinstance(model, dict) else None
    if not isinstance(args, dict):
        return
    for key, value in args.items():
        if key in hparams and plain_value(value) != plain_value(hparams[key]):
            log.warning("%s: model.%s is %s, but the checkpoint %s was trained with %s; the checkpoint's value is "
                        "used", config, key, value, ckpt.name, hparams[key])  # fmt: skip
            return

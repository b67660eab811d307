"""Checks before the first step: checkpoints never run code, bad settings and incompatible checkpoints are refused
with one line (exit 2) before any training, and a refused resume leaves the run untouched."""

from __future__ import annotations

import functools
import http.server
import shutil
import threading
from pathlib import Path

import pytest
import torch
import yaml
from conftest import fit_args, run_dir_of

from dwcp_lstm.cli import cli_main
from dwcp_lstm.errors import ConfigError

LIGHTNING = ("fit", "validate", "test", "predict")


class _Payload:
    """Unpickling this creates a file: the proof that a checkpoint ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def evil_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {}, "hyper_parameters": {}, "payload": _Payload(marker)}, path)
    return path


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


def run_cli(args, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        cli_main(args)
    assert exc.value.code == 2
    return one_error(capsys)


def with_command(cmd: str, args: list[str]) -> list[str]:
    return [cmd, *args[1:]]


@pytest.fixture
def http_dir(tmp_path):
    """A local HTTP server over tmp_path/www (loopback only)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("command", LIGHTNING)
def test_a_checkpoint_url_never_runs_code(tmp_path, http_dir, capsys, monkeypatch, command):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # torch.hub's download cache
    www, url = http_dir
    marker = tmp_path / "PWNED"
    evil_checkpoint(www / "evil.ckpt", marker)
    err = run_cli(with_command(command, fit_args(tmp_path, f"--ckpt_path={url}/evil.ckpt")), capsys)
    assert "refused to load" in err and "weights_only=True" in err
    assert not marker.exists(), "unpickling the checkpoint ran code"


def test_a_checkpoint_url_that_cannot_be_fetched_says_so(tmp_path, http_dir, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    _, url = http_dir
    err = run_cli(fit_args(tmp_path, f"--ckpt_path={url}/missing.ckpt"), capsys)  # 404: not "truncated or corrupt"
    assert "missing.ckpt: cannot fetch checkpoint" in err, err


@pytest.mark.parametrize("command", LIGHTNING)
def test_a_local_checkpoint_never_runs_code(tmp_path, capsys, command):
    marker = tmp_path / "PWNED"
    path = evil_checkpoint(tmp_path / "evil.ckpt", marker)
    err = run_cli(with_command(command, fit_args(tmp_path, f"--ckpt_path={path}")), capsys)
    assert f"{path}: refused to load: it references" in err
    assert not marker.exists()


def test_resume_never_runs_code(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    run = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    run.mkdir(parents=True)
    evil_checkpoint(run / "last.ckpt", marker)
    err = run_cli(fit_args(tmp_path, "--ckpt_path=last"), capsys)
    assert "refused to load" in err and not marker.exists()


def test_weights_only_false_is_refused(tmp_path, capsys):
    err = run_cli(fit_args(tmp_path, "--weights_only=false"), capsys)
    assert "--weights_only false is refused" in err


# -- checkpoints that cannot be used: said before training, the run folder untouched ---------------------------------
def _truncate(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return dst


CKPT_CASES = [
    ("missing", lambda run, d: d / "nope.ckpt", [], "nope.ckpt: checkpoint not found"),
    ("directory", lambda run, d: d, [], "is a directory"),
    ("truncated", lambda run, d: _truncate(run / "checkpoints" / "last.ckpt", d / "t.ckpt"), [], "or corrupt"),
    ("text-file", lambda run, d: run / "config.yaml", [], "config.yaml: not a checkpoint (not a PyTorch zip file)"),
    ("device", lambda run, d: Path("/dev/zero"), [], "/dev/zero: not a regular file"),
    ("foreign-dict", lambda run, d: _save(d / "f.ckpt", {"w": torch.zeros(3)}), [], "not a Lightning checkpoint"),
    (
        "foreign-model",
        lambda run, d: _save(d / "g.ckpt", {"state_dict": {"layer.weight": torch.zeros(2)}}),
        [],
        "checkpoint does not fit this model",
    ),
    (
        "other-widths",
        lambda run, d: run / "checkpoints" / "best.ckpt",
        ["--model.lstm_sizes=[32,16]", "--model.head_sizes=[8]", "--model.head_dropouts=[]"],
        "checkpoint has lstm_sizes=[256, 128, 64], this config has [32, 16]",
    ),
    (
        "other-features",
        lambda run, d: run / "checkpoints" / "best.ckpt",
        ["--data.features=[throughput_mbps,rtt_ms,packet_loss,jitter_ms]"],
        "checkpoint has feature_names=",
    ),
    (  # a buffer: the checkpoint's was restored over the flag, which test and validate then dropped silently
        "other-loss-weights",
        lambda run, d: run / "checkpoints" / "best.ckpt",
        ["--model.loss_weights=[100,1,1,1]"],
        "checkpoint was trained with loss weights [1.0, 1.0, 1.0, 1.0] (normalised), this config gives [3.8835",
    ),
]


def _save(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("command", ["fit", "test"])
@pytest.mark.parametrize(("case", "make", "flags", "expected"), CKPT_CASES, ids=[c[0] for c in CKPT_CASES])
def test_unusable_checkpoints_are_refused_before_training(tmp_path, smoke_run, capsys, command, case, make, flags,
                                                          expected):  # fmt: skip
    path = make(smoke_run, tmp_path)
    err = run_cli(with_command(command, fit_args(tmp_path, f"--ckpt_path={path}", *flags)), capsys)
    assert expected in err, err
    assert not list(tmp_path.glob("lightning_logs/version_*")), "nothing started"


# -- settings that would reach PyTorch unchecked -----------------------------------------------------------------
CONFIG_CASES = [
    ("negative-window", ["--data.window_size=-3"], "--data.window_size must be >= 2 (a change needs two rows), got -3"),
    ("window-of-one", ["--data.window_size=1"], "--data.window_size must be >= 2"),
    ("bad-monitor", ["--checkpoint.monitor=bogus"], "--checkpoint.monitor 'bogus' is not a metric this model logs"),
    ("bad-es-monitor", ["--early_stopping.monitor=val/rtt_ms/bogus"], "--early_stopping.monitor 'val/rtt_ms/bogus'"),
    ("negative-epochs", ["--trainer.max_epochs=-5"], "max_epochs"),
    ("old-opset", ["--onnx.opset=5"], "--onnx.opset must be an integer from 17 to"),
    ("new-opset", ["--onnx.opset=24"], "(the newest this torch exports), got 24"),
    ("escaping-onnx-name", ["--onnx.filename=../../x.onnx"], "--onnx.filename must be a plain file name"),
    ("zero-parity-windows", ["--onnx.parity_windows=0"], "--onnx.parity_windows must be >= 1"),
    ("no-targets", ["--data.targets=[]"], "--data.features and --data.targets must not be empty"),
    ("zero-accumulation", ["--trainer.accumulate_grad_batches=0"], "--trainer.accumulate_grad_batches must be"),
    ("zero-val-every", ["--trainer.check_val_every_n_epoch=0"], "--trainer.check_val_every_n_epoch must be"),
    ("zero-val-interval", ["--trainer.val_check_interval=0"], "--trainer.val_check_interval must be"),
    ("negative-seed", ["--seed_everything=-5"], "--seed_everything must be an integer from 0 to 2**32 - 1"),
    ("negative-data-seed", ["--data.seed=-5"], "--data.seed must be an integer from 0 to 2**32 - 1, got -5"),
    # Lightning only warns, and the run exported and reported an untrained network (or never validated: no checkpoint)
    ("no-epochs", ["--trainer.max_epochs=0"], "--trainer.max_epochs 0 runs no training step"),
    ("no-steps", ["--trainer.max_steps=0"], "--trainer.max_steps 0 runs no training step"),
    ("no-batches", ["--trainer.limit_train_batches=0"], "--trainer.limit_train_batches 0 runs no training step"),
    ("no-time", ["--trainer.max_time=00:00:00:00"], "--trainer.max_time 0.0 runs no training step"),
    # Lightning stopped at the maximum silently: a run shorter than asked
    (
        "min-epochs-over-max",
        ["--trainer.min_epochs=1000", "--trainer.max_epochs=1"],
        "--trainer.min_epochs 1000 is more than --trainer.max_epochs 1, which ends the training first",
    ),
    (
        "min-steps-over-max",
        ["--trainer.min_steps=50", "--trainer.max_steps=20"],
        "--trainer.min_steps 50 is more than --trainer.max_steps 20",
    ),
    ("interval-beyond-epoch", ["--trainer.val_check_interval=100000"], "--trainer.val_check_interval 100000 is more"),
    # early stopping raised a traceback after the training, with nothing exported
    ("steps-before-validation", ["--trainer.max_steps=2"], "--trainer.max_steps 2 ends training after 2 batches"),
    (
        "steps-before-late-validation",
        ["--trainer.max_steps=5", "--trainer.val_check_interval=6"],
        "--trainer.max_steps 5 ends training after 5 batches, before the first validation (after batch 6)",
    ),
    # the precision and spawn checks' bypasses through class paths
    (
        "double-precision-plugin",
        ["--trainer.plugins.class_path=lightning.pytorch.plugins.precision.DoublePrecision"],
        "--trainer.plugins DoublePrecision: the batches and the exported graph are float32",
    ),
    (
        "spawning-ddp-class",
        [
            "--trainer.strategy.class_path=lightning.pytorch.strategies.DDPStrategy",
            "--trainer.strategy.init_args.start_method=spawn",
        ],
        "--trainer.strategy lightning.pytorch.strategies.DDPStrategy with start_method spawn starts its processes",
    ),
    ("tpu-without-xla", ["--trainer.accelerator=tpu"], "cannot build the run from its config: Requirement"),
    ("spawning-strategy", ["--trainer.strategy=ddp_spawn"], "--trainer.strategy ddp_spawn starts its processes"),
    ("double-precision", ["--trainer.precision=64-true"], "--trainer.precision 64-true: the batches and the exported"),
    ("half-precision", ["--trainer.precision=bf16-true"], "--trainer.precision bf16-true: the batches"),
    ("no-logger", ["--trainer.logger=false"], "--trainer.logger false leaves the learning-rate monitor"),
    ("escaping-checkpoint-name", ["--checkpoint.filename=../best"], "checkpoint filename '../best' must be a plain"),
    (
        "never-validates",
        ["--trainer.max_epochs=3", "--trainer.check_val_every_n_epoch=5"],
        "--trainer.check_val_every_n_epoch 5 never validates in --trainer.max_epochs 3",
    ),
    ("huge-step-seed", ["--step_seed.seed=99999999999999999999999"], "--step_seed.seed must be an integer from 0"),
    ("too-few-to-calibrate", ["--data.split=[0.94,0.01,0.05]"], "calibrating 95 % intervals needs at least 39"),
    ("bad-levels", ["--model.interval_levels=[0.8,1.2]"], "--model.interval_levels must be distinct numbers"),
    ("batch-of-one", ["--data.batch_size=1"], "--data.batch_size must be >= 2"),
    ("empty-lstm", ["--model.lstm_sizes=[]"], "--model.lstm_sizes must list at least one layer size"),
    ("zero-lstm", ["--model.lstm_sizes=[64,0]"], "--model.lstm_sizes must be positive integers"),
    ("negative-head", ["--model.head_sizes=[16,-4]", "--model.head_dropouts=[0.1]"], "--model.head_sizes must be"),
    ("dropout-count", ["--model.head_dropouts=[0.3]"], "--model.head_dropouts needs 2 entries"),
    ("dropout-range", ["--model.head_dropouts=[0.3,1.5]"], "--model.head_dropouts must be in [0, 1)"),
    ("negative-lr", ["--model.optimizer.init_args.lr=-0.001"], "Invalid learning rate: -0.001"),
    ("zero-lr", ["--model.optimizer.init_args.lr=0"], "--model.optimizer: a learning rate of 0 never changes"),
    # each used to fail with a traceback once training started
    ("sparse-adam", ["--model.optimizer=torch.optim.SparseAdam"], "SparseAdam takes sparse gradients only"),
    (
        "half-autocast-on-cpu",
        [
            "--trainer.plugins=lightning.pytorch.plugins.MixedPrecision",
            "--trainer.plugins.init_args.precision=16-mixed",
            "--trainer.plugins.init_args.device=cpu",
        ],
        "--trainer.plugins MixedPrecision with precision 16-mixed on device cpu",
    ),  # fmt: skip
    ("backbone", ["--trainer.callbacks+=lightning.pytorch.callbacks.BackboneFinetuning"], "BackboneFinetuning unfre"),
    ("lr-finder", ["--trainer.callbacks+=lightning.pytorch.callbacks.LearningRateFinder"], "LearningRateFinder sets"),
    (
        "clashing-checkpoint-state",
        ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint", "--trainer.callbacks.monitor=val_loss"],
        "cannot build the run from its config: Found more than one stateful callback of type `FolderCheckpoint`",
    ),
    ("timer", ["--trainer.callbacks+=lightning.pytorch.callbacks.Timer"], "--trainer.callbacks Timer: give --trainer"),
    ("plateau-factor", ["--model.scheduler.init_args.factor=2.0"], "--model.scheduler"),
    ("nan-split", ["--data.split=[0.7,.nan,0.15]"], "--data.split must be three non-negative fractions"),
    ("no-val", ["--data.split=[0.85,0.0,0.15]"], "no validation windows"),
    ("no-test", ["--data.split=[0.85,0.15,0.0]"], "no test windows"),
    ("nan-gap", ["--data.max_gap=.nan"], "--data.max_gap must be a finite number"),
    (
        "time-as-input",
        ["--data.features=[timestamp,throughput_mbps,rtt_ms,packet_loss,jitter_ms]"],
        "--data.features / --data.targets: 'timestamp' is the time column (--data.time_column), not a measurement; to",
    ),
    (
        "link-as-input",
        ["--data.features=[node_id,throughput_mbps,rtt_ms,packet_loss,jitter_ms]"],
        "'node_id' is a series id column (--data.series_columns), not a measurement",
    ),
    ("data-dir-in-a-file", ["--data.data_dir=/dev/null/d"], "--data.data_dir /dev/null/d: cannot create or write"),
    ("data-dir-in-proc", ["--data.data_dir=/proc/x"], "--data.data_dir /proc/x: cannot create or write the folder"),
    ("time-is-series", ["--data.time_column=node_id"], "--data.time_column must be a column other than"),
    ("bad-samples", ["--data.synthetic.samples=1"], "--data.synthetic:"),
    ("negative-mape-floor", ["--model.mape_floor=-1"], "--model.mape_floor must be"),
    ("body-beyond-horizon", ["--data.horizon=3", "--model.body_steps=4"], "--model.body_steps must be null or an"),
    ("late-head-unsplit", ["--data.horizon=3", "--model.late_head_size=8"], "--model.late_head_size must be null"),
    ("cyclic-target", ["--data.cyclic={rtt_ms: 10}"], "--data.cyclic: 'rtt_ms' is a target; only inputs can be"),
    (
        "cross-without-skip",
        ["--model.linear_skip=false", "--model.skip_frozen=false", "--model.head_init=0", "--model.skip_cross=true"],
        "--model.skip_cross needs --model.linear_skip true",
    ),
    # the default config freezes the skip and starts the head at 1: turning the skip off alone names both flags
    ("skip-off-alone", ["--model.linear_skip=false"], "for the network alone also give --model.head_init 0"),
    ("clock-not-a-feature", ["--data.clock={beat_s: 15}"], "--data.clock: 'beat_s' is not among the features"),
    ("negative-clip", ["--trainer.gradient_clip_val=-1"], "--trainer.gradient_clip_val must be a number >= 0"),
    ("nan-min-delta", ["--early_stopping.min_delta=.nan"], "--early_stopping.min_delta must be a finite number >="),
    ("negative-min-delta", ["--early_stopping.min_delta=-5.0"], "--early_stopping.min_delta must be a finite"),
    ("inf-min-delta", ["--early_stopping.min_delta=.inf"], "--early_stopping.min_delta must be a finite number"),
    ("negative-patience", ["--early_stopping.patience=-1"], "--early_stopping.patience must be an integer >= 0"),
    ("fraction-clip", ["--trainer.gradient_clip_val=-0.5"], "--trainer.gradient_clip_val must be a number >= 0"),
    ("zero-loss-weights", ["--model.loss_weights=[0,0,0,0]"], "--model.loss_weights needs 4 finite numbers"),
    ("bad-target-mode", ["--data.target_mode=bogus"], "--data.target_mode must be delta or level, got 'bogus'"),
    # both used to fail only after the first training epoch
    ("no-validation", ["--trainer.limit_val_batches=0"], "--trainer.limit_val_batches 0 runs no validation, but"),
    ("checkpoint-dir-in-a-file", ["--checkpoint.dirpath=/dev/null/ckpt"], "/dev/null/ckpt: output folder is not"),
    ("last-dir-in-a-file", ["--last_checkpoint.dirpath=/dev/null/c"], "/dev/null/c: output folder is not writable"),
    # the every-epoch copy overwrote the best one: the report and the ONNX model came from the last epoch
    ("same-checkpoint-file", ["--last_checkpoint.filename=best"], "two checkpoints would be written to the same file"),
    # found by a hunt for fits that fail after training (2026-12-02): each trained, then ended in a traceback, an
    # unreported run, or one that shipped its last weights and whose own report / export refused it
    ("test-metric-es-monitor", ["--early_stopping.monitor=test/mean/rmse"], "'test/mean/rmse' is not a metric"),
    ("test-metric-ckpt-monitor", ["--checkpoint.monitor=test_loss"], "--checkpoint.monitor 'test_loss' is not a"),
    (
        "es-on-train-end-sparse-val",
        ["--early_stopping.check_on_train_epoch_end=true", "--trainer.check_val_every_n_epoch=2"],
        "validates only every 2 epochs",
    ),
    (
        "steplr-zero",
        ["--model.scheduler=torch.optim.lr_scheduler.StepLR", "--model.scheduler.init_args.step_size=0"],
        "--model.scheduler fails when stepped after validation 1 of the 2 this run may have: integer modulo by zero",
    ),
    (
        "onecycle-too-short",
        [
            "--model.scheduler=torch.optim.lr_scheduler.OneCycleLR",
            "--model.scheduler.init_args.max_lr=0.01",
            "--model.scheduler.init_args.total_steps=1",
        ],
        "after validation 2 of the",
    ),
    ("no-test-batch", ["--trainer.limit_test_batches=0.001"], "--trainer.limit_test_batches 0.001 of the 10 test"),
    (
        "never-validates",
        ["--trainer.check_val_every_n_epoch=null", "--trainer.val_check_interval=100"],
        "no validation would run, so no best checkpoint",
    ),
    ("keeps-no-best", ["--checkpoint.save_top_k=0"], "--checkpoint.save_top_k 0 keeps none: the run would have no"),
    ("best-after-the-end", ["--checkpoint.every_n_epochs=3"], "saves after more epochs than the 2 trained"),
    ("best-after-the-steps", ["--checkpoint.every_n_train_steps=1000"], "saves after more steps than the 20 trained"),
    (
        "profiler-dir-in-a-file",
        [
            "--trainer.profiler=lightning.pytorch.profilers.SimpleProfiler",
            "--trainer.profiler.init_args.dirpath=/dev/null/p",
        ],
        "/dev/null/p: output folder is",
    ),
    (
        "two-accumulations",
        [
            "--trainer.accumulate_grad_batches=2",
            "--trainer.callbacks+=lightning.pytorch.callbacks.GradientAccumulationScheduler",
            "--trainer.callbacks.scheduling={0: 2}",
        ],
        "--trainer.accumulate_grad_batches 2 and a GradientAccumulationScheduler callback both set the accumulation",
    ),
    (
        "no-validation-checkpoint",
        ["--trainer.limit_val_batches=0", "--early_stopping.monitor=train_loss_epoch"],
        "--checkpoint.monitor is 'val_loss': validate: the report and the export read the best checkpoint",
    ),
]


def test_a_training_split_without_a_batch_is_refused_before_training(tmp_path, capsys):
    """One training window: its only batch (of one) is dropped, Lightning said "No training batches" and the run
    exported, reported and exited 0 with the untrained network, and no checkpoint to report on again."""
    from dwcp_lstm import synthetic

    path = tmp_path / "one_link.csv"
    synthetic.generate(samples=3000, seed=0).iloc[:210].to_csv(path, index=False)  # 21 training rows: one window
    err = run_cli(fit_args(tmp_path, f"--data.data_path={path}", "--data.split=[0.1,0.8,0.1]"), capsys)
    assert err == (f"error: {path}: the training split has 1 window, which gives no training batch (a last batch of "
                   "one window is dropped): give more rows or a larger training share (--data.split)")  # fmt: skip
    assert not list(tmp_path.glob("lightning_logs/version_*/model.onnx"))


@pytest.mark.parametrize(("case", "flags", "expected"), CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_settings_are_refused_before_training(tmp_path, capsys, case, flags, expected):
    err = run_cli(fit_args(tmp_path, *flags), capsys)
    assert expected in err, err
    assert not list(tmp_path.glob("lightning_logs/version_*/checkpoints"))


@pytest.mark.parametrize(
    ("key", "class_path", "arg"),
    [("optimizer", "os.system", "command"), ("scheduler", "os.system", "command"),
     ("optimizer", "builtins.eval", "source"), ("optimizer", "subprocess.call", "args")],
)  # fmt: skip
def test_a_config_cannot_make_the_optimizer_or_scheduler_call_a_function(tmp_path, capsys, key, class_path, arg):
    """Both are typed as callables, so jsonargparse would build them from any importable function and call it with
    the config's init_args: the class must be a torch optimizer / scheduler, checked before anything is called."""
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w')" if class_path == "builtins.eval" else f"touch {marker}"
    evil = tmp_path / "evil.yaml"
    evil.write_text(yaml.safe_dump({"model": {key: {"class_path": class_path, "init_args": {arg: code}}}}))
    err = run_cli([*fit_args(tmp_path), "--config", str(evil)], capsys)
    assert f"--model.{key}: a config may not name {class_path}: only code from torch.optim" in err, err
    assert not marker.exists()


@pytest.mark.parametrize("opset", ["16", "24"])
def test_export_refuses_an_opset_torch_cannot_write_before_loading_the_run(tmp_path, capsys, opset):
    err = run_cli(["export", "--run", str(tmp_path / "no-such-run"), "--opset", opset], capsys)
    assert "--opset must be an integer from 17 to" in err and f"got {opset}" in err, err


def test_no_function_or_foreign_class_passes_as_optimizer_or_scheduler():
    """The class, not the examples: every public callable of modules that can run code or touch files is refused by
    name, and no torch optimizer is accepted as a scheduler or the reverse."""
    import builtins
    import importlib
    import os
    import pickle
    import shutil
    import subprocess

    from dwcp_lstm.preflight import check_factories

    names = [f"{m.__name__}.{n}" for m in (builtins, os, shutil, subprocess, pickle, importlib)
             for n in dir(m) if not n.startswith("_") and callable(getattr(m, n))]  # fmt: skip
    names += ["torch.optim.lr_scheduler.StepLR", "torch.nn.Linear", "torch.load", "numpy.load"]
    assert len(names) > 300
    for name in names:
        for key in ("optimizer", "scheduler"):
            if key == "scheduler" and name.startswith("torch.optim.lr_scheduler."):
                continue
            with pytest.raises(ConfigError, match=f"--model.{key}: .* refusing to call it"):
                check_factories({key: {"class_path": name, "init_args": {}}})
    with pytest.raises(ConfigError, match="--model.scheduler: torch.optim.Adam is not"):
        check_factories({"scheduler": "torch.optim.Adam"})


def test_optimizer_and_scheduler_classes_pass_the_check():
    from jsonargparse import Namespace

    from dwcp_lstm.preflight import check_factories

    check_factories({"optimizer": torch.optim.Adam, "scheduler": None})  # the defaults, as objects
    check_factories(Namespace(optimizer=Namespace(class_path="torch.optim.AdamW", init_args=Namespace(lr=1e-3)),
                              scheduler={"class_path": "torch.optim.lr_scheduler.ReduceLROnPlateau"}))  # fmt: skip
    check_factories({"optimizer": "torch.optim.SGD", "scheduler": "torch.optim.lr_scheduler.CosineAnnealingLR"})
    for bad in ("torch.optim.lr_scheduler.StepLR", "no_such_module.Thing", "torch.nn.Linear", len):
        with pytest.raises(ConfigError, match="--model.optimizer: .* is not a torch.optim optimizer class"):
            check_factories({"optimizer": bad})


def test_unwritable_output_folder_is_refused_before_training(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "runs"
    args = fit_args(tmp_path, f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out}")
    err = run_cli(args, capsys)
    assert "output folder is not writable" in err and str(out) in err


# -- resume ------------------------------------------------------------------------------------------------------
def test_resume_with_changed_settings_is_refused_and_leaves_the_run_untouched(tmp_path, smoke_run, capsys):
    root = tmp_path / "copy"
    shutil.copytree(smoke_run.parent.parent, root)
    run = root / "lightning_logs" / smoke_run.name
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for flag, key in (
        ("--model.optimizer.init_args.lr=0.01", "model.optimizer.init_args.lr"),
        ("--early_stopping.patience=3", "early_stopping.patience"),
        ("--data.batch_size=16", "data.batch_size"),
    ):
        err = run_cli(fit_args(root, "--ckpt_path=last", flag), capsys)
        assert "resuming needs the run's own settings" in err and key in err, err
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before, "a refused resume changed the run's files"


def test_resume_may_extend_the_epoch_budget(tmp_path, smoke_run):
    root = tmp_path / "copy"
    shutil.copytree(smoke_run.parent.parent, root)
    cli_main(fit_args(root, "--ckpt_path=last", "--trainer.max_epochs=3"))
    run = root / "lightning_logs" / smoke_run.name
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["max_epochs"] == 3
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 2


def _popen(marker) -> dict:
    return {"class_path": "subprocess.Popen", "init_args": {"args": f"touch {marker}", "shell": True}}


def _mock(marker) -> dict:  # a "callable class" whose untyped init_args jsonargparse would build too
    return {"class_path": "unittest.mock.Mock", "init_args": {"return_value": _popen(marker)}}


CODE_IN_CONFIG = {  # payloads a fuzzing session found, each ran a shell command before the import policy
    "scheduler-lambda": lambda m: {"model": {"scheduler": {"class_path": "torch.optim.lr_scheduler.LambdaLR",
                                                           "init_args": {"lr_lambda": _mock(m)}}}},
    "scheduler-nested": lambda m: {"model": {"scheduler": {"class_path": "torch.optim.lr_scheduler.StepLR",
                                                           "init_args": {"step_size": _mock(m)}}}},
    "callback-hook": lambda m: {"trainer": {"callbacks": [{"class_path": "lightning.pytorch.callbacks.LambdaCallback",
                                                           "init_args": {"on_fit_start": _mock(m)}}]}},
    "callback-any": lambda m: {"trainer": {"callbacks": [_mock(m)]}},
    "profiler-dict": lambda m: {"trainer": {"profiler": {"class_path": "lightning.pytorch.profilers.PyTorchProfiler",
                                                         "init_args": {"table_kwargs": {"x": _popen(m)}}}}},
    "logger": lambda m: {"trainer": {"logger": _popen(m)}},
    # the banned class under the module that defines it (jsonargparse checks the most specific entry)
    "callback-module-path": lambda m: {"trainer": {"callbacks": [{
        "class_path": "lightning.pytorch.callbacks.lambda_function.LambdaCallback",
        "init_args": {"on_fit_start": "lightning.pytorch.callbacks.progress.tqdm_progress.convert_inf"}}]}},
}  # fmt: skip


def test_lightnings_own_plugins_are_allowed(tmp_path, capsys):
    """Lightning's cluster environments and checkpoint IO are defined in lightning.fabric (configs/ddp.yaml's SLURM)."""
    with pytest.raises(SystemExit) as exc:  # --print_config exits 0 after printing
        cli_main([*fit_args(tmp_path), "--print_config",
                  "--trainer.plugins=lightning.pytorch.plugins.environments.SLURMEnvironment"])  # fmt: skip
    assert exc.value.code == 0
    assert "class_path: lightning.pytorch.plugins.environments.SLURMEnvironment" in capsys.readouterr().out


@pytest.mark.parametrize("case", list(CODE_IN_CONFIG))
def test_no_config_can_name_code_outside_the_allowed_packages(tmp_path, capsys, case):
    """jsonargparse builds whatever a class_path names, nested anywhere (a Mock returning Popen passed every type
    check); only the packages a run is built from may be named (dwcp_lstm/imports.py), checked before any import."""
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.yaml"
    evil.write_text(yaml.safe_dump(CODE_IN_CONFIG[case](marker)))
    err = run_cli([*fit_args(tmp_path), "--config", str(evil)], capsys)
    assert "a config may not name" in err or "cannot build the run" in err or "Expected a <class 'int'>" in err, err
    assert not marker.exists()
    assert not list(tmp_path.glob("lightning_logs/version_*/checkpoints"))


def test_naming_a_module_does_not_import_it(tmp_path, capsys, monkeypatch):
    """Resolving a name used to import its module first: any module's top-level code ran at parse time."""
    (tmp_path / "sideeffect.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'w')\nclass Foo: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    err = run_cli([*fit_args(tmp_path), "--model.optimizer", "sideeffect.Foo"], capsys)
    assert "--model.optimizer: a config may not name sideeffect.Foo" in err, err
    assert not (tmp_path / "imported").exists()
    # allowed by the person running the command (never by a config): imported, then checked as a type as before
    monkeypatch.setenv("DWCP_LSTM_ALLOW_IMPORTS", "sideeffect")
    err = run_cli([*fit_args(tmp_path), "--model.optimizer", "sideeffect.Foo"], capsys)
    assert "Expected 'sideeffect.Foo' to be a subclass of <class 'Optimizer'>" in err, err
    assert (tmp_path / "imported").exists()


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [("DWCP_LSTM_ALLOW_IMPORTS", "*", "DWCP_LSTM_ALLOW_IMPORTS: '*' is not a module or object path"),
     ("DWCP_LSTM_ALLOW_IMPORTS", "jsonargparse", "jsonargparse itself cannot be allowed"),
     ("DWCP_LSTM_ALLOW_IMPORTS", "os..path", "'os..path' is not a module or object path"),
     ("JSONARGPARSE_DEBUG", "1", "JSONARGPARSE_DEBUG")],
)  # fmt: skip
def test_bad_import_settings_in_the_environment_are_one_line_errors(tmp_path, capsys, monkeypatch, name, value,
                                                                    expected):  # fmt: skip
    monkeypatch.setenv(name, value)
    err = run_cli(fit_args(tmp_path), capsys)
    assert expected in err, err


@pytest.mark.parametrize(("given", "read"), [("1", "1"), ("1.0", "1.0"), ("0.25", "0.25"), ("3", "3")])
def test_a_batch_count_stays_a_count(tmp_path, capsys, given, read):
    """Lightning reads an int as a number of batches and a float as a fraction; the CLI used to turn `1` into 1.0
    (every batch: a full epoch where one batch was asked for)."""
    with pytest.raises(SystemExit) as exc:
        cli_main([*fit_args(tmp_path), "--print_config", f"--trainer.limit_train_batches={given}",
                  f"--trainer.overfit_batches={given}"])  # fmt: skip
    out = capsys.readouterr().out
    assert exc.value.code == 0
    assert f"limit_train_batches: {read}\n" in out and f"overfit_batches: {read}\n" in out, out


def test_the_import_policy_refuses_every_callable_of_modules_that_can_run_code():
    """The class, not the fuzzer's examples: every public callable of modules that run code, touch files or the
    network, or unpickle, named as a callable value, is refused before import; the packages a run is built from pass."""
    import importlib
    from collections.abc import Callable

    from jsonargparse import ArgumentParser

    from dwcp_lstm.imports import restrict_config_imports

    restrict_config_imports()
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--f", type=Callable)
    modules = [
        "builtins",
        "os",
        "shutil",
        "subprocess",
        "pickle",
        "importlib",
        "unittest.mock",
        "code",
        "pdb",
        "runpy",
        "ctypes",
        "socket",
        "urllib.request",
        "pathlib",
        "io",
        "sys",
        "yaml",
        "numpy",
        "torch",
        "torch.hub",
        "torch.serialization",
        "lightning.pytorch.cli",
        "dwcp_lstm.cli",
        "dwcp_lstm.tables",
    ]
    names = [f"{m}.{n}" for m in modules for n in dir(importlib.import_module(m))
             if not n.startswith("_") and callable(getattr(importlib.import_module(m), n))]  # fmt: skip
    assert len(names) > 1000
    for name in names:
        with pytest.raises(Exception, match="is not allowed") as exc:
            parser.parse_args(["--f", name])
        assert name in str(exc.value)
    for name in ("torch.optim.AdamW", "torch.optim.lr_scheduler.StepLR", "lightning.pytorch.callbacks.EarlyStopping",
                 "lightning.pytorch.loggers.CSVLogger", "dwcp_lstm.callbacks.EMA"):  # fmt: skip
        try:  # imported; whether it is a fitting callable is the type check's business
            parser.parse_args(["--f", name])
        except Exception as exc:
            assert "is not allowed" not in str(exc), exc


def test_evaluating_nothing_is_refused(tmp_path, smoke_run, capsys):
    """``test --trainer.limit_test_batches 0`` exited 0 having scored nothing (found by fuzzing)."""
    ckpt = smoke_run / "checkpoints" / "best.ckpt"
    err = run_cli(with_command("test", fit_args(tmp_path, f"--ckpt_path={ckpt}", "--trainer.limit_test_batches=0")),
                  capsys)  # fmt: skip
    assert "--trainer.limit_test_batches 0 leaves nothing to test" in err, err


@pytest.mark.parametrize("command", ["validate", "test", "predict"])
def test_evaluating_without_a_checkpoint_is_refused(tmp_path, capsys, command):
    """Without --ckpt_path Lightning scored the freshly initialised network, exit 0, and made a run folder."""
    err = run_cli(with_command(command, fit_args(tmp_path)), capsys)
    assert f"{command} needs --ckpt_path" in err, err
    assert not list(tmp_path.glob("lightning_logs/version_*")), "nothing started"


@pytest.mark.parametrize("command", ["fit", "test", "validate"])
def test_a_checkpoint_is_used_only_with_the_data_settings_it_was_trained_with(tmp_path, smoke_run, capsys, command):
    """``test`` with another split scored the checkpoint's own training rows, and a resume from a checkpoint with no
    run config beside it trained on another split, both silently (found by fuzzing): the checkpoint's record of its
    data settings is compared with the flags, as ``report`` compares the run's config.yaml."""
    import shutil

    ckpt = tmp_path / "elsewhere" / "copy.ckpt"  # no config.yaml two folders up
    ckpt.parent.mkdir()
    shutil.copy(smoke_run / "checkpoints" / "best.ckpt", ckpt)
    err = run_cli(with_command(command, fit_args(tmp_path, f"--ckpt_path={ckpt}", "--data.split=[0.3,0.1,0.6]")),
                  capsys)  # fmt: skip
    assert "--data.split is [0.3, 0.1, 0.6], the checkpoint copy.ckpt was trained with [0.7, 0.15, 0.15]" in err
    assert not list(tmp_path.glob("lightning_logs/version_*")), "nothing started"


@pytest.mark.parametrize("command", ["fit", "test"])
def test_a_command_never_writes_into_another_runs_folder(tmp_path, smoke_run, capsys, command):
    """An explicit logger version named an existing run's folder: a second fit mixed both runs' checkpoints
    (best-v1.ckpt) and ``test`` replaced the run's config.yaml with its own (found by fuzzing)."""
    run = tmp_path / "lightning_logs" / "version_0"
    shutil.copytree(smoke_run, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    ckpt = [f"--ckpt_path={run / 'checkpoints' / 'best.ckpt'}"] if command == "test" else []
    err = run_cli(with_command(command, fit_args(tmp_path, *ckpt, "--trainer.logger.init_args.version=0")), capsys)
    assert f"{run}: already holds a run (config.yaml)" in err, err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    if command == "fit":  # a sub_dir moves the logs, not the checkpoints; a dirpath can name the run's folder
        for extra, folder, held in (
            (["--trainer.logger.init_args.version=0", "--trainer.logger.init_args.sub_dir=x"], run, "config.yaml"),
            ([f"--checkpoint.dirpath={run / 'checkpoints'}"], run / "checkpoints", "best.ckpt"),
        ):
            err = run_cli(fit_args(tmp_path, *extra), capsys)
            assert f"{folder}: already holds a run ({held})" in err, err
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_resuming_is_the_way_back_into_a_runs_folder(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    from dwcp_lstm.preflight import check_fresh_run_dir

    ckpt = tmp_path / "lightning_logs" / "version_3" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")

    class Trainer:
        logger = TensorBoardLogger(tmp_path, version=3)

    check_fresh_run_dir(Trainer, str(ckpt))  # its own checkpoint: resuming
    with pytest.raises(ConfigError, match="already holds a run .checkpoints."):
        check_fresh_run_dir(Trainer, str(tmp_path / "other.ckpt"))
    Trainer.logger = TensorBoardLogger(tmp_path)  # no version: Lightning's fresh version_<N>
    check_fresh_run_dir(Trainer, None)
    Trainer.checkpoint_callbacks = [type("Cb", (), {"dirpath": str(ckpt.parent)})()]  # another run's checkpoints
    with pytest.raises(ConfigError, match="already holds a run .last.ckpt.; give a new folder .--checkpoint.dirpath"):
        check_fresh_run_dir(Trainer, None)
    check_fresh_run_dir(Trainer, None, fitting=False)  # `test` with the run's own config writes no checkpoint


def test_without_a_logger_the_working_directorys_config_stays(tmp_path, smoke_run, monkeypatch):
    """``test --trainer.logger false`` wrote its config.yaml over the working directory's, the user's own --config
    among them (found by fuzzing): without a run folder no config is written."""
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "config.yaml"
    mine.write_text("trainer:\n  max_epochs: 2\n")
    args = fit_args(tmp_path, f"--ckpt_path={smoke_run / 'checkpoints' / 'best.ckpt'}", "--trainer.logger=false",
                    "--config", str(mine))  # fmt: skip
    cli_main(with_command("test", [a for a in args if "logger.init_args" not in a]))
    assert mine.read_text() == "trainer:\n  max_epochs: 2\n"


def test_the_logger_follows_the_default_root_dir(tmp_path, smoke_run, monkeypatch):
    """``--trainer.default_root_dir`` was ignored: the config's logger (save_dir .) kept the runs in the working
    directory (found by fuzzing)."""
    monkeypatch.chdir(tmp_path)
    args = fit_args(tmp_path / "root", f"--ckpt_path={smoke_run / 'checkpoints' / 'best.ckpt'}")
    cli_main(with_command("test", [a for a in args if "logger.init_args" not in a]))
    assert (tmp_path / "root" / "lightning_logs" / "version_0" / "config.yaml").is_file()
    assert not (tmp_path / "lightning_logs").exists()


def test_a_relative_checkpoint_folder_is_recorded_absolute(tmp_path, monkeypatch, capsys):
    """Lightning reads ``--checkpoint.dirpath ck`` from the working directory, which config.yaml did not record:
    ``export --run`` from another folder with its own ``ck/`` exported that other run's checkpoint into this run's
    model.onnx, exit 0. The saved config now names the folder absolute; an edited relative one is refused."""
    import yaml

    from dwcp_lstm.runs import find_checkpoint

    work = tmp_path / "a"
    work.mkdir()
    monkeypatch.chdir(work)
    cli_main(fit_args(tmp_path, "--checkpoint.dirpath=ck", "--last_checkpoint.dirpath=ck"))
    capsys.readouterr()
    run = run_dir_of(tmp_path)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["checkpoint"]["dirpath"] == cfg["last_checkpoint"]["dirpath"] == str(work / "ck")
    monkeypatch.chdir(tmp_path)  # elsewhere: the same checkpoint
    assert find_checkpoint(run) == work / "ck" / "best.ckpt"
    cfg["checkpoint"]["dirpath"] = "ck"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    err = run_cli(["export", "--run", str(run)], capsys)
    assert "checkpoint.dirpath 'ck' is relative to the folder the fit ran in" in err, err


def test_predict_without_a_writer_is_refused(tmp_path, smoke_run, capsys):
    """It forecast the test split, kept the result in memory and wrote nothing, exit 0 (found by fuzzing)."""
    ckpt = smoke_run / "checkpoints" / "best.ckpt"
    err = run_cli(with_command("predict", fit_args(tmp_path, f"--ckpt_path={ckpt}")), capsys)
    assert "predict keeps its forecasts in memory and writes none" in err and "dwcp_lstm forecast" in err, err


def test_an_abstract_prediction_writer_is_refused(tmp_path, smoke_run, capsys):
    """BasePredictionWriter itself implements no write method: predict ran, then a NotImplementedError traceback."""
    ckpt = smoke_run / "checkpoints" / "best.ckpt"
    writer = "--trainer.callbacks+=lightning.pytorch.callbacks.BasePredictionWriter"
    err = run_cli(with_command("predict", fit_args(tmp_path, f"--ckpt_path={ckpt}", writer)), capsys)
    assert "BasePredictionWriter does not implement write_on_batch_end" in err, err


@pytest.mark.parametrize(
    ("target", "expected"),
    [("/etc/passwd", "best.ckpt: not a checkpoint (not a PyTorch zip file)"), ("/dev/zero", "not a regular file")],
)
def test_a_run_whose_best_checkpoint_is_not_a_checkpoint_says_so(tmp_path, smoke_run, capsys, target, expected):
    """A best.ckpt linked to a text file said "cannot read checkpoint (IndexError: list index out of range)"; one
    linked to /dev/zero said "the run's best checkpoint is missing"."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    best = run / "checkpoints" / "best.ckpt"
    best.unlink()
    best.symlink_to(target)
    err = run_cli(["report", "--run", str(run)], capsys)
    assert expected in err, err


@pytest.mark.parametrize(
    ("text", "after", "blamed", "expected"),
    [
        ("trainer:\n  max_epochs: [1\n", [], True, "Problems parsing config"),  # YAML that does not parse
        ("trainer:\n  max_epochs: abc\n", [], True, 'Parser key "trainer.max_epochs"'),  # a value of the wrong type
        ("model:\n  loss: bogus\n", [], True, "--model.loss must be one of"),  # refused by the project's own check
        # jsonargparse checks each file as it reads it: the file's value is the one refused, whatever comes later
        ("trainer:\n  max_epochs: abc\n", ["--trainer.max_epochs=2"], True, "Given value: abc"),
        ("trainer:\n  max_epochs: 2\n", ["--trainer.max_epochs=abd"], False, "Given value: abd"),  # the flag's
        ("model:\n  loss: bogus\n", ["--model.loss=l2"], False, "got 'l2'"),  # the final value: the flag's
    ],
)
def test_an_error_in_one_of_several_config_files_names_that_file(tmp_path, capsys, text, after, blamed, expected):
    """Found by a hostile-input hunt: with two --config files, an error in one said what was wrong but not in which
    file. The file that set the refused value is named; a flag's value is not blamed on a file."""
    good = tmp_path / "good.yaml"
    good.write_text("trainer:\n  max_epochs: 1\nmodel:\n  loss: mse\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    err = run_cli(fit_args(tmp_path, "--config", str(good), f"--config={bad}", *after), capsys)
    assert expected in err, err
    assert err.startswith(f"error: {bad}: ") == blamed and str(good) not in err, err
    assert not list(tmp_path.glob("lightning_logs/version_*/checkpoints"))


def test_a_schedule_that_ends_at_a_rate_of_zero_still_trains(tmp_path):
    """The scheduler is stepped as often as the run may step it before training (to find a StepLR of step size 0,
    say); a cosine schedule over the run's epochs ends at a rate of 0 there, which the check for a learning rate of
    0 must not read: it reads the rate the schedule starts from."""
    cli_main(fit_args(tmp_path, "--model.scheduler=torch.optim.lr_scheduler.CosineAnnealingLR",
                      "--model.scheduler.init_args.T_max=2", "--trainer.max_epochs=2"))  # fmt: skip
    assert (run_dir_of(tmp_path) / "report.json").is_file()

"""A run SIGKILLed mid-epoch and resumed with ``--ckpt_path last`` ends exactly like an uninterrupted one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, fit_args, run_dir_of

from dwcp_lstm.cli import cli_main
from dwcp_lstm.plots import read_scalars

EPOCHS = "--trainer.max_epochs=3"


SKIP = pytest.param(["--model.linear_skip=true"], id="linear_skip", marks=pytest.mark.slow)  # same path, 40 s


@pytest.mark.parametrize("extra", [pytest.param([], id="lstm"), SKIP])
def test_killed_and_resumed_run_matches_an_uninterrupted_one(tmp_path, extra):
    """With the linear skip, setup() starts it at ridge before Lightning restores the checkpoint: the resumed run
    must go on from the restored weights."""
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    cli_main(fit_args(straight, EPOCHS, *extra))

    kill_cfg = tmp_path / "kill.yaml"
    kill_cfg.write_text(
        "trainer:\n  callbacks:\n    - class_path: killer.KillAt\n      init_args: {epoch: 1, batch: 3}\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
        "DWCP_LSTM_ALLOW_IMPORTS": "killer",
    }  # a config may name only allowed code (dwcp_lstm/imports.py)
    proc = subprocess.run(
        [sys.executable, "-m", "dwcp_lstm", *fit_args(broken, EPOCHS, *extra), "--config", str(kill_cfg)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    run = run_dir_of(broken)
    assert (run / "checkpoints" / "last.ckpt").exists() and not (run / "report.json").exists()

    cli_main(fit_args(broken, EPOCHS, *extra, "--ckpt_path=last"))
    assert run_dir_of(broken) == run, "resumed in the same run directory"

    a, b = run_dir_of(straight), run
    val_a, val_b = read_scalars(a)["val_loss"][-1][1], read_scalars(b)["val_loss"][-1][1]
    assert val_b == pytest.approx(val_a, rel=1e-6)
    ra, rb = (json.loads((d / "report.json").read_text())["per_target"] for d in (a, b))
    for target, metrics in ra.items():
        for name, value in metrics.items():
            assert rb[target][name] == pytest.approx(value, rel=1e-6), (target, name)


def test_a_terminated_run_exits_non_zero_and_resumes(tmp_path):
    """SIGTERM (a scheduler's stop, `kill`): Lightning stops gracefully and exited 0, so a supervisor saw success
    with nothing exported."""
    kill_cfg = tmp_path / "term.yaml"
    kill_cfg.write_text("trainer:\n  callbacks:\n    - class_path: killer.KillAt\n"
                        "      init_args: {epoch: 1, batch: 3, sig: SIGTERM}\n")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
           "DWCP_LSTM_ALLOW_IMPORTS": "killer"}  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "dwcp_lstm", *fit_args(tmp_path, EPOCHS), "--config", str(kill_cfg)],
                          cwd=tmp_path, env=env, capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: stopped by SIGTERM before the run finished")
    assert "Traceback" not in proc.stderr
    run = run_dir_of(tmp_path)
    assert (run / "checkpoints" / "last.ckpt").exists() and not (run / "model.onnx").exists()
    cli_main(fit_args(tmp_path, EPOCHS, "--ckpt_path=last"))
    assert (run / "model.onnx").exists() and (run / "report.json").exists()


def test_resume_last_without_a_run_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(fit_args(tmp_path, "--ckpt_path=last"))
    assert exc.value.code == 2
    assert "checkpoints/last.ckpt to resume from" in capsys.readouterr().err
    run = tmp_path / "lightning_logs" / "version_0"  # a link in the run folder: Lightning would write through it
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    (run / "hparams.yaml").symlink_to(tmp_path / "outside.txt")
    with pytest.raises(SystemExit) as exc:
        cli_main(fit_args(tmp_path, "--ckpt_path=last"))
    assert exc.value.code == 2 and "hparams.yaml is a symbolic link" in capsys.readouterr().err
    assert not (tmp_path / "outside.txt").exists()
    import shutil

    shutil.rmtree(run)
    backup = tmp_path / "lightning_logs" / "version_0_backup" / "checkpoints"  # a copy's name is not a version
    backup.mkdir(parents=True)
    (backup / "last.ckpt").write_bytes(b"")
    with pytest.raises(SystemExit) as exc:  # was: ValueError: invalid literal for int() with base 10: 'backup'
        cli_main(fit_args(tmp_path, "--ckpt_path=last"))
    assert exc.value.code == 2
    assert "no " in (err := capsys.readouterr().err) and "version_<N>/checkpoints/last.ckpt to resume from" in err


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` and its bytes."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_refuses_a_data_file_changed_in_place(tmp_path, small_csv, capsys):
    """The config still names the same file, but its rows changed: resuming would train on other splits than the
    checkpoint's, silently. The checkpoint records the file's sha256. The refusal comes before anything is written:
    it came while Lightning restored the checkpoint, after config.yaml was rewritten (max_epochs 2 -> 3, ckpt_path
    null -> last) and the logger had added an event file."""
    import shutil

    import pandas as pd

    data = tmp_path / "d.csv"
    shutil.copy(small_csv, data)
    cli_main(fit_args(tmp_path, f"--data.data_path={data}", "--trainer.max_epochs=1"))
    df = pd.read_csv(data)
    df.groupby(["node_id", "peer_id"]).head(len(df) // 8).to_csv(data, index=False)  # rows cut: other splits
    before = snapshot(run_dir_of(tmp_path))
    with pytest.raises(SystemExit) as exc:
        cli_main(fit_args(tmp_path, f"--data.data_path={data}", "--trainer.max_epochs=2", "--ckpt_path=last"))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exc.value.code == 2 and len(err) == 1 and "d.csv: the file changed since the checkpoint" in err[0], err
    assert snapshot(run_dir_of(tmp_path)) == before, "the refused resume wrote into the run folder"


def test_a_tampered_checkpoint_cannot_delete_files_outside_its_folder(tmp_path, small_csv, capsys):
    """Resuming restores the names ModelCheckpoint kept, and Lightning deleted the "previous" best / last file at the
    next save if the folder was among its parents *unresolved*: a checkpoint naming ``<folder>/../../x`` deleted x
    (found by fuzzing). Such a checkpoint is refused before any training step, and nothing is deleted."""
    import torch

    data = tmp_path / "d.csv"
    data.write_bytes(small_csv.read_bytes())
    args = [f"--data.data_path={data}", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2"]
    cli_main(fit_args(tmp_path, *args, "--trainer.max_epochs=1"))
    last = run_dir_of(tmp_path) / "checkpoints" / "last.ckpt"
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    ckpt = torch.load(last, weights_only=True, map_location="cpu")
    states = [v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint")]
    assert len(states) == 2  # best and last: the state keys are Lightning's own, so old checkpoints still resume
    escape = f"{states[0]['dirpath']}/../../../victim.txt"
    assert (Path(escape)).resolve() == victim.resolve()
    for state in states:
        state["best_model_path"] = escape
        state["best_k_models"] = {escape: torch.tensor(float("inf"))}
    torch.save(ckpt, last)
    before = snapshot(run_dir_of(tmp_path))
    with pytest.raises(SystemExit) as exc:
        cli_main(fit_args(tmp_path, *args, "--trainer.max_epochs=2", "--ckpt_path=last"))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exc.value.code == 2 and len(err) == 1, err
    assert "last.ckpt: its ModelCheckpoint state names" in err[0] and "outside the checkpoint folder" in err[0]
    assert victim.read_text() == "precious"
    assert snapshot(run_dir_of(tmp_path)) == before, "the refused resume wrote into the run folder"


def test_checkpoint_names_are_compared_resolved(tmp_path):
    """The callback itself: a restored name must resolve inside its folder; another folder's best is dropped (the
    run's first validation sets its own); a file is deleted only inside the resolved folder."""
    from types import SimpleNamespace

    from dwcp_lstm.callbacks import FolderCheckpoint
    from dwcp_lstm.errors import CheckpointError

    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    cb = FolderCheckpoint(dirpath=str(folder), monitor="val_loss")
    state = cb.state_dict()
    assert cb.state_key.startswith("ModelCheckpoint{")
    inside, escape = str(folder / "best.ckpt"), f"{folder}/../../victim.txt"
    gone = FolderCheckpoint(dirpath=str(folder), monitor="val_loss")  # another run's names, not files here
    gone.load_state_dict({**state, "best_model_path": inside, "best_model_score": torch_inf()})
    assert gone.best_model_path == "" and gone.best_model_score is None
    (folder / "best.ckpt").write_bytes(b"")
    cb.load_state_dict({**state, "best_model_path": inside, "best_k_models": {inside: torch_inf()}})
    assert cb.best_model_path == inside
    for key, value in (
        ("best_model_path", escape),
        ("last_model_path", escape),
        ("kth_best_model_path", escape),
        ("best_k_models", {escape: torch_inf()}),
        ("best_model_path", "memory://x.ckpt"),
        ("best_model_path", torch_inf().repeat(2)),  # not a name at all (a tensor raised "ambiguous" before)
    ):
        with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
            FolderCheckpoint(dirpath=str(folder)).load_state_dict({**state, key: value})
    moved = FolderCheckpoint(dirpath=str(folder))
    moved.load_state_dict({**state, "dirpath": str(tmp_path / "elsewhere"), "best_model_path": escape})
    assert moved.best_model_path == ""  # Lightning restores only this one from another folder: not kept
    trainer = SimpleNamespace(ckpt_path=None)
    assert cb._should_remove_checkpoint(trainer, str(folder / "old.ckpt"), inside)
    assert not cb._should_remove_checkpoint(trainer, escape, inside)
    assert not cb._should_remove_checkpoint(
        SimpleNamespace(ckpt_path=str(folder / "old.ckpt")), str(folder / "old.ckpt"), inside
    )


def torch_inf():
    import torch

    return torch.tensor(float("inf"))


def _tamper(ckpt: dict, case: str) -> None:
    import torch

    if case == "optimizer-shape":
        state = ckpt["optimizer_states"][0]["state"]
        state[next(iter(state))]["exp_avg"] = torch.zeros(2, 2)
    elif case == "optimizer-groups":
        groups = ckpt["optimizer_states"][0]["param_groups"]
        groups.append(dict(groups[0], params=[999]))
    elif case == "scheduler-mode":
        ckpt["dwcp_lr_scheduler"]["mode"] = "foo"
    elif case == "early-stopping-score":
        next(v for k, v in ckpt["callbacks"].items() if k.startswith("EarlyStopping"))["best_score"] = "abc"
    elif case == "loop-counter":
        ckpt["loops"]["fit_loop"]["epoch_progress"]["total"]["completed"] = -3


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("optimizer-shape", "the optimizer's exp_avg has shape (2, 2)"),
        ("optimizer-groups", "different number of parameter groups"),
        ("scheduler-mode", "mode foo is unknown"),
        ("early-stopping-score", "early stopping's best_score is str, not a number"),
        ("loop-counter", "loop counter fit_loop.epoch_progress.total.completed is -3"),
    ],
)
def test_a_tampered_training_state_is_refused_before_resuming(tmp_path, smoke_run, capsys, case, expected):
    """Each raised a traceback at the first training step, or after an epoch (early stopping's score; found by
    fuzzing): the restore is tried first on copies of the optimizer, scheduler and callbacks."""
    import torch

    ckpt = torch.load(smoke_run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    _tamper(ckpt, case)
    path = tmp_path / "tampered.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(SystemExit) as exc:
        cli_main(fit_args(tmp_path, f"--ckpt_path={path}"))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exc.value.code == 2 and len(err) == 1, err
    assert f"{path}: cannot resume from it" in err[0] and expected in err[0], err

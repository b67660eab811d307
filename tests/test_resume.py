"""A run SIGKILLed mid-epoch and resumed with ``--ckpt_path last`` ends exactly like an uninterrupted one."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, fit_args, run_dir_of

from dwcp_lstm.cli import cli_main
from dwcp_lstm.plots import read_scalars

EPOCHS = "--trainer.max_epochs=3"


@pytest.mark.parametrize("extra", [[], ["--model.linear_skip=true"]], ids=["lstm", "linear_skip"])
def test_killed_and_resumed_run_matches_an_uninterrupted_one(tmp_path, extra):
    """With the linear skip, setup() starts it at ridge before Lightning restores the checkpoint: the resumed run
    must go on from the restored weights."""
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    cli_main(fit_args(straight, EPOCHS, *extra))

    kill_cfg = tmp_path / "kill.yaml"
    kill_cfg.write_text(
        "trainer:\n  callbacks:\n    - class_path: killer.KillAt\n      init_args: {epoch: 1, batch: 3}\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
           "DWCP_LSTM_ALLOW_IMPORTS": "killer"}  # a config may name only allowed code (dwcp_lstm/imports.py)
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


def test_resume_last_without_a_run_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(fit_args(tmp_path, "--ckpt_path=last"))
    assert exc.value.code == 2
    assert "checkpoints/last.ckpt to resume from" in capsys.readouterr().err


def test_resume_refuses_a_data_file_changed_in_place(tmp_path, small_csv, capsys):
    """The config still names the same file, but its rows changed: resuming would train on other splits than the
    checkpoint's, silently. The checkpoint records the file's sha256."""
    import shutil

    import pandas as pd

    data = tmp_path / "d.csv"
    shutil.copy(small_csv, data)
    cli_main(fit_args(tmp_path, f"--data.data_path={data}", "--trainer.max_epochs=1"))
    df = pd.read_csv(data)
    df.groupby(["node_id", "peer_id"]).head(len(df) // 8).to_csv(data, index=False)  # rows cut: other splits
    with pytest.raises(SystemExit) as exc:
        cli_main(fit_args(tmp_path, f"--data.data_path={data}", "--trainer.max_epochs=2", "--ckpt_path=last"))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exc.value.code == 2 and len(err) == 1 and "d.csv: the file changed since the checkpoint" in err[0], err

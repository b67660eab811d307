"""Fault injection: a full disk while checkpointing, exporting or reporting ends in one line (exit 1), damages nothing
that was complete, and ``--ckpt_path last`` then resumes."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest
import torch
from conftest import fit_args, run_dir_of

from dwcp_lstm.cli import cli_main


def enospc(filename: str = "") -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", filename or None)


def exit_code_and_error(capsys, args) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        cli_main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-2000:]
    return exc.value.code, lines[0]


def snapshot(run) -> dict:
    return {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file() and "events" not in p.name}


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        name = Path(str(getattr(f, "name", ""))).name
        if name.startswith(".last.ckpt.") and name.endswith(".tmp") and obj.get("epoch") == 1:
            f.write(b"\0" * 4096)  # half a file, then the disk is full
            raise enospc()
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    code, err = exit_code_and_error(capsys, fit_args(tmp_path, "--trainer.max_epochs=3"))
    assert code == 1
    assert "last.ckpt: cannot write checkpoint (No space left on device); the previous one is intact" in err
    run = run_dir_of(tmp_path)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0, "epoch 0's checkpoint"
    assert not list(run.rglob("*.tmp"))

    monkeypatch.undo()  # space again: the run resumes from epoch 0's checkpoint and finishes
    cli_main(fit_args(tmp_path, "--trainer.max_epochs=3", "--ckpt_path=last"))
    assert run_dir_of(tmp_path) == run
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 2
    assert (run / "report.json").exists() and (run / "model.onnx").exists()


def test_full_disk_while_exporting_keeps_the_previous_model(tmp_path, smoke_run, monkeypatch, capsys):
    shutil.copytree(smoke_run.parent.parent, tmp_path / "copy")
    root = tmp_path / "copy"
    run = root / "lightning_logs" / smoke_run.name
    before = snapshot(run)

    def full_disk(model, args, f, *a, **k):
        with open(f, "wb") as out:
            out.write(b"\0" * 1000)
        raise enospc(str(f))

    monkeypatch.setattr(torch.onnx, "export", full_disk)
    code, err = exit_code_and_error(capsys, fit_args(root, "--ckpt_path=last"))  # a finished run: straight to export
    assert code == 1 and "No space left on device" in err
    after = snapshot(run)
    for name in ("model.onnx", "model_metadata.json", "report.json", "checkpoints/best.ckpt", "checkpoints/last.ckpt"):
        assert after[name] == before[name], name
    assert not list(run.rglob("*.tmp"))

    monkeypatch.undo()
    cli_main(fit_args(root, "--ckpt_path=last"))
    assert (run / "model.onnx").read_bytes() != b"" and (run / "report.json").exists()


def test_full_disk_while_reporting_keeps_the_previous_report(tmp_path, smoke_run, monkeypatch, capsys):
    from dwcp_lstm import evaluate

    shutil.copytree(smoke_run, tmp_path / "run")
    run = tmp_path / "run"
    before = snapshot(run)
    real_write = evaluate.atomic_write

    def full_disk(path, data):
        if path.name == "report.json":
            raise enospc(str(path))
        real_write(path, data)

    monkeypatch.setattr(evaluate, "atomic_write", full_disk)
    code, err = exit_code_and_error(capsys, ["report", "--run", str(run)])
    assert code == 1 and err == f"error: {run / 'report.json'}: No space left on device"
    after = snapshot(run)
    assert after["report.json"] == before["report.json"]
    assert not list(run.rglob("*.tmp"))


def test_two_writers_of_one_file_at_once_both_finish(tmp_path):
    """Two processes generating the built-in data at once used to share one temporary name: the first rename took
    the other's file away and the second failed with 'cannot write'. Each writer now has its own name."""
    from dwcp_lstm.tables import atomic_path

    target = tmp_path / "data.csv"
    with atomic_path(target) as first:
        first.write_text("first")
        with atomic_path(target) as second:  # a second writer starts before the first renames
            assert second != first
            second.write_text("second")
        assert target.read_text() == "second" and first.read_text() == "first"
    assert target.read_text() == "first" and not list(tmp_path.glob(".*.tmp"))

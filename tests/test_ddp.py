"""The smoke config under Lightning DDP on CPU (2 gloo processes): it finishes and writes the artifacts once."""

import json
import os
import subprocess
import sys

from conftest import ROOT, fit_args, run_dir_of


def test_smoke_fit_under_ddp_on_two_cpu_processes(tmp_path):
    args = fit_args(
        tmp_path,
        "--config",
        str(ROOT / "configs" / "ddp.yaml"),
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.max_epochs=1",
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "dwcp_lstm", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "lightning_logs").glob("version_*"))
    assert len(runs) == 1, "both ranks share one run directory"
    run = run_dir_of(tmp_path)
    for name in ("model.onnx", "model_metadata.json", "report.json", "checkpoints/best.ckpt"):
        assert (run / name).is_file(), name
    assert len(list(run.glob("model*.onnx"))) == 1 and not list(run.glob(".*.tmp"))
    assert proc.stdout.count("Run directory:") == 1, "the report is written by rank zero only"
    report = json.loads((run / "report.json").read_text())
    assert report["windows"] > 0

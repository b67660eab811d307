import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml
from conftest import ROOT, fit_args, run_dir_of

from dwcp_lstm.cli import cli_main
from dwcp_lstm.module import DwcpForecaster
from dwcp_lstm.tables import sha256_of

ARTIFACTS = (
    "config.yaml",
    "checkpoints/best.ckpt",
    "checkpoints/last.ckpt",
    "model.onnx",
    "model_metadata.json",
    "report.json",
    "report.md",
    "training_history.png",
    "predictions_scatter.png",
)


def test_smoke_fit_produces_every_artifact(smoke_run):
    for name in ARTIFACTS:
        assert (smoke_run / name).is_file(), name
    assert list(smoke_run.glob("events.out.tfevents.*")), "TensorBoard events"


def test_report_json_has_the_specified_keys(smoke_run):
    report = json.loads((smoke_run / "report.json").read_text())
    for target in ("throughput_mbps", "rtt_ms", "packet_loss", "jitter_ms"):
        assert set(report["per_target"][target]) >= {"mae", "rmse", "mape", "wape", "r2", "correlation"}
    ov = report["overall"]
    assert ov["accuracy_percent"] == pytest.approx(100 * ov["average_correlation"])
    assert ov["target_met"] == (ov["average_correlation"] >= 0.98 and ov["average_mape"] < 5)
    # head to head: the model's RMSE/MAE on all windows equal its per-target figures; baselines' likewise
    for target, rows in report["head_to_head"].items():
        for name in ("persistence", "harmonic_mean_5", "window_mean", "ridge"):
            h, b = rows[name], report["baselines"][name]["per_target"][target]
            assert h["model_rmse"] == pytest.approx(report["per_target"][target]["rmse"], rel=1e-6)
            assert (h["rmse"], h["mae"]) == pytest.approx((b["rmse"], b["mae"]), rel=1e-6)
            assert h["beats"] == (h["model_rmse"] < h["rmse"] and h["model_mae"] < h["mae"])
        goal = all(rows[n]["beats"] for n in ("persistence", "harmonic_mean_5", "window_mean", "ridge"))
        assert report["checks"]["beats_goal_baselines_on_rmse_and_mae"][target] == goal
    assert "## Head to head" in (smoke_run / "report.md").read_text()
    val = report["validation"]  # the same comparison on the validation split, for choosing settings
    assert val["windows"] > 0 and set(val["head_to_head"]) == set(report["head_to_head"])
    assert val["per_target"]["rtt_ms"]["rmse"] != report["per_target"]["rtt_ms"]["rmse"]


def test_metadata_describes_the_model(smoke_run):
    meta = json.loads((smoke_run / "model_metadata.json").read_text())
    assert meta["model_sha256"] == sha256_of(smoke_run / "model.onnx")
    assert meta["total_parameters"] == 540_516 and meta["opset"] >= 17 and meta["window_size"] == 20
    assert [f["name"] for f in meta["features"]][:4] == ["throughput_mbps", "rtt_ms", "packet_loss", "jitter_ms"]
    assert all(f["unit"] for f in meta["features"] + meta["targets"])
    assert meta["parity"]["max_rel_diff"] <= 1e-4
    assert len(meta["data"]["sha256"]) == 64 and "model:" in meta["config"]


@pytest.mark.parametrize("batch", [1, 37])
def test_onnx_matches_pytorch_in_raw_units(smoke_run, batch):
    module = DwcpForecaster.load_from_checkpoint(smoke_run / "checkpoints/best.ckpt", weights_only=True).eval()
    raw = module.raw_forecaster().eval()
    rng = np.random.default_rng(batch)
    mean, scale = module.fmean.numpy(), module.fscale.numpy()
    x = (mean + scale * rng.standard_normal((batch, 20, 9))).astype(np.float32)  # raw-unit inputs
    sess = ort.InferenceSession(str(smoke_run / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"metrics": x})[0]
    with torch.no_grad():
        ref = raw(torch.from_numpy(x)).numpy()
    assert got.shape == (batch, 4)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "--config", str(config), "--print_config"])
    assert exc.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert len(printed["data"]["features"]) >= 1
    assert "feature_names" not in printed["model"]  # linked from data.features, not repeated


def test_resume_from_last_checkpoint(tmp_path):
    cli_main(fit_args(tmp_path, "--trainer.max_epochs=1"))
    first = run_dir_of(tmp_path)
    last = first / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 0
    cli_main(fit_args(tmp_path, "--trainer.max_epochs=2", f"--ckpt_path={last}"))
    resumed = run_dir_of(tmp_path)
    assert resumed != first
    assert torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1


def test_report_command_rebuilds_without_retraining(smoke_run, capsys, tmp_path):
    before = json.loads((smoke_run / "report.json").read_text())
    (smoke_run / "report.md").unlink()
    cli_main(["report", "--run", str(smoke_run)])
    after = json.loads((smoke_run / "report.json").read_text())
    assert (smoke_run / "report.md").exists()
    assert after["per_target"] == before["per_target"]
    assert "mean correlation" in capsys.readouterr().out


def test_help_lists_every_subcommand(capsys):
    cli_main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("fit", "validate", "test", "predict", "generate", "report"):
        assert cmd in out


def test_same_config_gives_the_same_metrics(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        cli_main(fit_args(d, "--trainer.max_epochs=1", "--trainer.limit_train_batches=3"))
    ra, rb = (json.loads((run_dir_of(d) / "report.json").read_text()) for d in (a, b))
    assert ra["per_target"] == rb["per_target"]


def test_tensorboard_has_per_target_metrics_lr_hparams_and_figures(smoke_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars, images = set(), set()
    for f in smoke_run.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(f))
        acc.Reload()
        scalars |= set(acc.Tags()["scalars"])
        images |= set(acc.Tags()["images"])
    for stage in ("train", "val", "test"):
        assert {f"{stage}/throughput_mbps/mae", f"{stage}/jitter_ms/correlation", f"{stage}/mean/mape"} <= scalars
    assert "lr-Adam" in scalars and "hp/test_average_correlation" in scalars
    assert {"test/predictions_scatter", "test/timeseries", "test/baselines"} <= images


def test_last_checkpoint_follows_every_epoch_even_without_improvement(tmp_path):
    # "best" = highest val_loss: training lowers it, so best.ckpt stays at epoch 0 while last.ckpt must move on
    cli_main(fit_args(tmp_path, "--trainer.max_epochs=2", "--checkpoint.mode=max"))
    from dwcp_lstm.plots import read_scalars

    val = [v for _, v in read_scalars(run_dir_of(tmp_path))["val_loss"]]
    assert val[1] < val[0]
    ckpts = run_dir_of(tmp_path) / "checkpoints"
    assert torch.load(ckpts / "best.ckpt", weights_only=True)["epoch"] == 0
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.ckpt", "last.ckpt"]


@pytest.mark.parametrize("filename", ["best_model", "{epoch}-best"])
def test_export_and_report_find_the_best_checkpoint_under_its_configured_name(tmp_path, capsys, filename):
    """Only checkpoints/best.ckpt was looked for: with another --checkpoint.filename, ``export --run`` and
    ``report --run`` took last.ckpt, the last epoch's weights, silently (found by fuzzing)."""
    cli_main(fit_args(tmp_path, "--trainer.max_epochs=2", "--checkpoint.mode=max", f"--checkpoint.filename={filename}"))
    run = run_dir_of(tmp_path)
    best = [p for p in (run / "checkpoints").iterdir() if p.name != "last.ckpt"]
    assert len(best) == 1 and torch.load(best[0], weights_only=True)["epoch"] == 0  # best: epoch 0, last: epoch 1
    capsys.readouterr()
    cli_main(["export", "--run", str(run)])
    assert f"exported {best[0]} ->" in capsys.readouterr().out
    cli_main(["report", "--run", str(run)])
    assert json.loads((run / "report.json").read_text())["checkpoint"] == str(best[0])
    if "{" not in filename:  # the best file removed: refused, not the last epoch reported over the best's figures
        before = (run / "report.json").read_bytes()
        best[0].unlink()
        for cmd in ("report", "export"):
            with pytest.raises(SystemExit) as exc:
                cli_main([cmd, "--run", str(run)])
            assert exc.value.code == 2
            assert f"{best[0]}: the run's best checkpoint is missing (last.ckpt holds" in capsys.readouterr().err
        assert (run / "report.json").read_bytes() == before


def test_a_checkpoint_scales_other_data_with_its_own_training_scalers(smoke_run, small_csv, tmp_path):
    from dwcp_lstm.callbacks import raw_windows
    from dwcp_lstm.data import DwcpDataModule
    from dwcp_lstm.metrics import compute_metrics
    from dwcp_lstm.plots import read_scalars

    ckpt = smoke_run / "checkpoints" / "best.ckpt"
    args = fit_args(tmp_path, f"--data.data_path={small_csv}", f"--ckpt_path={ckpt}")
    cli_main(["test", *args[1:]])
    logged = read_scalars(run_dir_of(tmp_path))["test/rtt_ms/mae"][-1][1]
    # reference: the raw-in/raw-out forecaster (scalers baked in) on the same test windows
    dm = DwcpDataModule(data_path=str(small_csv))
    dm.setup("test")
    raw = DwcpForecaster.load_from_checkpoint(ckpt, weights_only=True).raw_forecaster().eval()
    with torch.no_grad():
        pred = raw(torch.from_numpy(raw_windows(dm, "test").astype(np.float32))).double().numpy()
    ref = compute_metrics(pred, dm.raw_targets[dm.target_rows("test")], dm.targets)["rtt_ms"]["mae"]
    assert logged == pytest.approx(ref, rel=1e-4)


def test_a_failed_export_leaves_the_previous_model_intact(smoke_run, tmp_path, monkeypatch):
    from dwcp_lstm.callbacks import export_onnx

    target = tmp_path / "model.onnx"
    target.write_bytes((smoke_run / "model.onnx").read_bytes())
    before = sha256_of(target)

    def dying_export(model, args, f, **kwargs):  # writes half a file, then the process "dies"
        Path(f).write_bytes(b"\x08\x07partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.onnx, "export", dying_export)
    module = DwcpForecaster.load_from_checkpoint(smoke_run / "checkpoints" / "best.ckpt", weights_only=True)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(module, target, window=20)
    assert sha256_of(target) == before and not list(tmp_path.glob(".*.tmp"))
    ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])  # still loadable


def test_ema_averages_weights_and_keeps_the_scalers_exact(tmp_path):
    # the real-trace configs' weight averaging: checkpoints, test and export carry the average, scalers untouched
    cfg = tmp_path / "ema.yaml"
    cfg.write_text("trainer:\n  callbacks:\n    - class_path: dwcp_lstm.callbacks.EMA\n      init_args:\n"
                   "        decay: 0.9\n")  # fmt: skip
    cli_main(fit_args(tmp_path, "--config", str(cfg), "--trainer.max_epochs=1"))
    run = run_dir_of(tmp_path)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    avg, cur = ckpt["state_dict"], ckpt["current_model_state"]
    w = "net.lstms.0.weight_ih_l0"
    assert not torch.equal(avg[w], cur[w])  # the average lags the current weights
    for name in ("fmean", "fscale", "tmean", "tscale"):
        assert torch.equal(avg[name], cur[name]) and not torch.equal(cur[name], torch.zeros_like(cur[name]))
    meta = json.loads((run / "model_metadata.json").read_text())
    assert meta["scaler"]["feature_mean"] == avg["fmean"].tolist()
    assert meta["parity"]["max_rel_diff"] < 1e-4
    # the logged test figures and the report come from the same (averaged) weights
    from dwcp_lstm.plots import read_scalars

    report = json.loads((run / "report.json").read_text())
    logged = read_scalars(run)["test/rtt_ms/rmse"][-1][1]
    assert logged == pytest.approx(report["per_target"]["rtt_ms"]["rmse"], rel=1e-4)


def test_fast_dev_run_writes_no_model(tmp_path):
    """fast_dev_run has no run folder: its one-batch model was exported over model.onnx / model_metadata.json in
    the working directory (or --trainer.default_root_dir), replacing a deployed pair (found by fuzzing)."""
    deployed = {name: b"deployed" for name in ("model.onnx", "model_metadata.json")}
    for name, data in deployed.items():
        (tmp_path / name).write_bytes(data)
    cli_main(fit_args(tmp_path, "--trainer.fast_dev_run=true"))
    assert {name: (tmp_path / name).read_bytes() for name in deployed} == deployed

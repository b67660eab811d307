"""The real public traces train and evaluate through config alone (data in ../shared/data/real, never copied)."""

import json

import pytest
from conftest import REAL_DATA, ROOT, fit_args, run_dir_of

from dwcp_lstm.cli import cli_main

CONFIGS = {
    "real_norway_hsdpa.yaml": (REAL_DATA / "norway_hsdpa" / "traces.csv", ["throughput_mbps"], 1),
    "real_irish_5g.yaml": (REAL_DATA / "irish_5g" / "traces.csv", ["dl_mbps"], 7),
    "real_starlink_fjord.yaml": (REAL_DATA / "starlink_fjord" / "traces.parquet", ["rtt_ms", "loss_rate"], 7),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_real_trace_config_trains_and_reports(tmp_path, name):
    data, targets, n_features = CONFIGS[name]
    if not data.exists():
        pytest.skip(f"{data} not present")
    cli_main(
        fit_args(
            tmp_path,
            "--config",
            str(ROOT / "configs" / name),
            f"--data.data_path={data}",  # absolute: the test does not run from the project root
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=3",
            "--trainer.limit_val_batches=2",
            "--model.blend_ridge=true",  # the shipped recipe: the mix with ridge on every source's quirks
        )
    )
    run = run_dir_of(tmp_path)
    report = json.loads((run / "report.json").read_text())
    assert list(report["per_target"]) == targets
    assert {"persistence", "harmonic_mean_5", "window_mean", "ridge"} <= set(report["baselines"])
    assert report["oracle"] is None and report["gap_closed"] is None  # no ceiling for real data
    assert all(0 <= w <= 1 for ws in report["blend"]["weights"].values() for w in ws)  # fitted, and in the graph:
    assert report["onnx"]["parity_max_rel"] < 1e-4  # the report measured the export against the blended module
    # relative errors for the model and every baseline; those judged on every test window share one denominator
    full = [report] + [b for b in report["baselines"].values() if b["windows"] == report["windows"]]
    for t in targets:
        means = [f["per_target"][t]["rmse"] / f["per_target"][t]["rmse_over_mean"] for f in full]
        assert means == pytest.approx([means[0]] * len(means), rel=1e-9), t
    meta = json.loads((run / "model_metadata.json").read_text())
    assert meta["input"]["shape"][2] == n_features and meta["series"]["columns"] == ["series_id"]
    if name == "real_starlink_fjord.yaml":  # beat_s is derived (docs/real_traces.md "The beat is on the wall clock")
        assert meta["series"]["clock"] == {"beat_s": 15.0} and meta["series"]["start_format"] == "%Y-%m-%d-%H-%M-%S"


def test_a_real_config_pointed_at_another_sources_file_is_refused(tmp_path, capsys):
    """The Starlink config on the Norway file (no rtt_ms, loss_rate, ...): one line naming the file and a missing
    column, exit 2, before any training."""
    data = CONFIGS["real_norway_hsdpa.yaml"][0]
    if not data.exists():
        pytest.skip(f"{data} not present")
    with pytest.raises(SystemExit) as exc:
        cli_main(fit_args(tmp_path, "--config", str(ROOT / "configs" / "real_starlink_fjord.yaml"),
                          f"--data.data_path={data}"))  # fmt: skip
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and str(data) in err[0] and "missing required column 'rtt_ms'" in err[0], err
    assert not list(tmp_path.glob("lightning_logs/version_*/checkpoints/*.ckpt"))


# What may differ between real-trace configs: what describes the data, and the epoch budget (issue 15: one recipe).
DESCRIBES_DATA = {
    "data.data_path", "data.features", "data.targets", "data.series_columns", "data.time_column", "data.max_gap",
    "data.duplicates", "data.fill_missing", "data.clock", "data.series_start", "data.cyclic", "model.mape_floor",
    "trainer.max_epochs",
}  # fmt: skip


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def test_every_real_config_shares_one_recipe():
    """Model, loss, optimiser, window, normalisation and callbacks are the same for every source; a key set in one
    config and absent in another counts as a difference."""
    import yaml

    flat = {n: _flat(yaml.safe_load((ROOT / "configs" / n).read_text())) for n in CONFIGS}
    keys = {k for k in set().union(*flat.values()) if not any(k == d or k.startswith(d + ".") for d in DESCRIBES_DATA)}
    for k in sorted(keys):
        values = {n: flat[n].get(k, "<absent>") for n in flat}
        assert len({repr(v) for v in values.values()}) == 1, f"{k} differs between real configs: {values}"
    assert all(flat[n]["model.linear_skip"] is True for n in flat)

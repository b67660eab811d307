"""Multi-step forecasts (``data.horizon`` H > 1): leak-free windows whose every target lies in the window's split,
a direct head of H x T outputs, the ONNX graph, the predictor and the report per step. H = 1 keeps the one-step
contract exactly (tested everywhere else)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import fit_args, run_dir_of, scale_by_hand

from dwcp_lstm.cli import cli_main
from dwcp_lstm.data import DwcpDataModule, LeakageError
from dwcp_lstm.errors import ConfigError
from dwcp_lstm.module import DwcpForecaster
from dwcp_lstm.runs import load_run
from dwcp_lstm.serve import Predictor

H = 3


@pytest.fixture(scope="module")
def dm(small_csv) -> DwcpDataModule:
    dm = DwcpDataModule(data_path=str(small_csv), horizon=H, batch_size=16)
    dm.setup("fit")
    return dm


def test_every_target_of_a_window_lies_in_its_split_and_segment(dm):
    w = dm.window_size
    split_of = np.full(len(dm.raw_targets), -1)
    assert len(set(dm.link_of_segment)) == len(dm.bounds)
    for a, b in dm.bounds:  # the split of each row, per link, by the same cut as the DataModule (one segment a link)
        n = b - a
        n_train, n_val = int(n * dm.split[0]), int(n * dm.split[1])
        split_of[a : a + n_train] = 0
        split_of[a + n_train : a + n_train + n_val] = 1
        split_of[a + n_train + n_val : b] = 2
    for k, stage in enumerate(("train", "val", "test")):
        first = dm.starts[stage] + w
        rows = first[:, None] + np.arange(H)  # [N, H]
        assert (split_of[rows] == k).all(), f"a {stage} window has a target outside its split"
        seg = dm.segment_of_row
        assert (seg[rows] == seg[dm.starts[stage]][:, None]).all(), f"a {stage} window crosses a series"
    dm.audit()


def test_step_targets_are_the_changes_from_the_last_window_row(dm):
    x, y = next(iter(dm.loader("val")))  # y [B, H * T], scaled, step-major
    ts = dm.target_scaler
    raw = y.double().numpy() * ts.scale_ + ts.mean_  # [B, H * T]
    first = dm.target_rows("val")[: len(y)]
    last = dm.raw_targets[first - 1]  # the window's last row
    for h in range(H):
        expected = dm.raw_targets[first + h] - last
        np.testing.assert_allclose(raw[:, h * dm.n_targets : (h + 1) * dm.n_targets], expected, rtol=1e-4, atol=1e-4)


def test_per_step_scaler_sees_training_rows_only(dm):
    assert dm.target_scaler.mean_.shape == (H * dm.n_targets,)
    n = sum(b - a - 1 - (H - 1) for a, b in dm.train_ranges)  # delta: rows a+1 .. b-H of each training range
    assert dm.target_scaler.n_samples_seen_ == n
    # a spread that grows with the step: a change over 4 rows moves more than over 1
    scale = dm.target_scaler.scale_.reshape(H, dm.n_targets)
    assert (scale[-1] > scale[0]).all()


def test_the_audit_catches_a_target_in_the_next_split(dm, small_csv):
    bad = DwcpDataModule(data_path=str(small_csv), horizon=H, batch_size=16)
    bad.setup("fit")
    bad.starts["train"] = np.r_[bad.starts["train"], bad.starts["val"][:1] - 1]  # its last target is in val
    with pytest.raises(LeakageError, match="val target is not later"):
        bad.audit()


def test_module_outputs_every_step(dm):
    module = DwcpForecaster(horizon=H, lstm_sizes=(16,), head_sizes=(8,), head_dropouts=())
    module.set_scalers(dm.scalers)
    x, y = next(iter(dm.loader("val")))
    assert module(x).shape == (len(x), H * dm.n_targets)
    raw = module.unscale(y, x)  # [B, H, T]
    first = dm.target_rows("val")[: len(y)]
    np.testing.assert_allclose(raw.numpy(), dm.raw_targets[first[:, None] + np.arange(H)], rtol=1e-4, atol=1e-3)
    out = module.raw_forecaster()(torch.from_numpy(dm.windows(dm.raw_features, dm.starts["val"][:3])))
    assert out.shape == (3, H, dm.n_targets)


@pytest.mark.parametrize("horizon", [0, -2, 1.5])
def test_a_bad_horizon_is_refused(horizon, small_csv):
    with pytest.raises(ConfigError, match="--data.horizon must be an integer >= 1"):
        DwcpDataModule(data_path=str(small_csv), horizon=horizon)


def test_a_horizon_longer_than_the_splits_allow_is_refused_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(fit_args(tmp_path, "--data.horizon=200"))
    err = capsys.readouterr().err
    expected = "no validation windows: the built-in dataset's longest link has 500 rows, split 350 / 75 / 75, and a"
    assert exc.value.code == 2 and expected in err, err
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())  # nothing generated first
    with pytest.raises(SystemExit) as exc:  # the training split too short for window + horizon
        cli_main(fit_args(tmp_path, "--data.horizon=70", "--data.window_size=300"))
    assert exc.value.code == 2 and "no training windows" in capsys.readouterr().err


@pytest.fixture(scope="module")
def horizon_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("horizon")
    # a non-default model file name too: one fit serves both checks
    small = ["--model.lstm_sizes=[32,16]", "--model.head_sizes=[16]", "--model.head_dropouts=[]"]  # fast, same code
    small.append("--model.linear_skip=true")  # the real-trace recipe's skip through export, predictor and planner
    small.append("--data.cyclic={time_of_day: 24, day_of_week: 7}")  # and the calendar's sine and cosine in the graph
    small.append("--model.skip_cross=true")  # and the skip's products of levels and phase
    small.append("--model.blend_ridge=true")  # and the mix with ridge, fitted at fit end, in the graph
    cli_main(fit_args(tmp, f"--data.horizon={H}", "--trainer.max_epochs=1", "--onnx.filename=net.onnx", *small))
    return run_dir_of(tmp)


def test_fit_exports_a_multi_step_graph_the_predictor_reads(horizon_run, small_csv):
    meta = json.loads((horizon_run / "model_metadata.json").read_text())
    assert meta["output"]["shape"] == ["batch", H, 4] and meta["parity"]["max_rel_diff"] < 1e-4
    p = Predictor.from_run(horizon_run)
    assert p.horizon == H and p.columns[:5] == ["throughput_mbps_h1", "rtt_ms_h1", "packet_loss_h1", "jitter_ms_h1",
                                                "throughput_mbps_h2"]  # fmt: skip
    link = pd.read_csv(small_csv).query("node_id == 'node-0'").sort_values("timestamp")
    one = p.predict(link)
    assert list(one) == p.all_columns and all(np.isfinite(list(one.values())))
    assert f"throughput_mbps_h{H}_hi95" in one and f"jitter_ms_mean{H}_lo80" in one  # per step, and the mean over k
    module, _, _ = load_run(horizon_run)  # the checkpoint with its blend fitted again: the exported forecast
    assert module.blend is not None and json.loads(json.dumps(module.blend_summary)) == meta["blend"]
    report = json.loads((horizon_run / "report.json").read_text())  # the report says what the mix chose and did
    assert report["blend"]["weights"] == meta["blend"]["weights"]
    assert set(report["blend"]["test_rmse"]) == set(p.targets)
    assert "## Mix with ridge" in (horizon_run / "report.md").read_text()
    assert module.net.encode.index == [4, 5] and p.features == module.hparams.feature_names  # raw columns in
    x = link[p.features].to_numpy(np.float32)[-20:][None]
    with torch.no_grad():
        expected = module.raw_forecaster()(torch.from_numpy(x)).numpy().reshape(-1)
    np.testing.assert_allclose([one[c] for c in p.columns], expected, rtol=1e-4, atol=1e-4)


def test_forecast_command_writes_one_column_per_step_and_target(horizon_run, small_csv, tmp_path, capsys):
    out = tmp_path / "f.csv"
    cli_main(["forecast", "--model", str(horizon_run), "--input", str(small_csv), "--output", str(out)])
    df = pd.read_csv(out)
    assert list(df.columns[3:]) == Predictor.from_run(horizon_run).all_columns and len(df) == 4
    assert f"4 forecasts (next {H} steps) for 4 links" in capsys.readouterr().out  # was "(next step)"


def test_plan_reads_every_step_and_the_mean_bounds(horizon_run, small_csv, capsys):
    """A multi-step plan by hand: the median transfer walks the per-step forecasts, the confident one the guaranteed
    volume k x step x bound_k, with bound_k the mean bound of the graph for k <= H and, beyond, the contract's
    line in the held forecast mean plus the window's scale times its tail quantile (never above the held mean); a
    VM that needs 2.5 steps' worth of the forecast ends halfway into step 3."""
    from dwcp_lstm.planner import MBIT_PER_GIB

    p = Predictor.from_run(horizon_run)
    df = pd.read_csv(small_csv)
    link = df[(df["node_id"] == "node-0") & (df["peer_id"] == "node-1")]
    f = p.predict(link)  # the latest window of that link
    step = 300.0
    rates = [f[f"throughput_mbps_h{k}"] for k in (1, 2, 3)]
    beyond = p.metadata["intervals"]["beyond_horizon"]
    assert beyond["steps"] > H  # the validation split calibrated the mean beyond the horizon
    scale = scale_by_hand(link[p.targets].to_numpy()[None, -p.window :], beyond, 0)[0]
    held, centre = np.mean(rates), beyond["centre"]  # the tail's centre: a line in the held mean per span
    tail = [
        min(centre[i][0][0] + centre[i][1][0] * held + scale * beyond["lo"][0][i][0], held)  # never above it
        for i in range(beyond["steps"] - H)
    ]  # fmt: skip
    bound = [f[f"throughput_mbps_mean{k}_lo80"] for k in (1, 2, 3)] + tail  # k = 1 .. K
    volume = np.maximum.accumulate([0.0] + [(k + 1) * step * b for k, b in enumerate(bound)])  # never decreasing

    def planned(memory_mbit: float) -> dict:
        cli_main(["plan", "--model", str(horizon_run), "--input", str(small_csv), "--json",
                  "--memory-gib", repr(float(memory_mbit) / MBIT_PER_GIB)])  # fmt: skip
        return next(r for r in json.loads(capsys.readouterr().out)["links"] if r["node_id"] == "node-0")

    row = planned(step * (rates[0] + rates[1] + 0.5 * rates[2]))
    assert row["time_median_s"] == pytest.approx(2.5 * step, rel=1e-5)
    for memory_mbit in (0.5 * (volume[1] + volume[2]), 0.5 * (volume[H + 1] + volume[H + 2])):  # steps 2 and H + 2
        row = planned(memory_mbit)
        k = int(np.searchsorted(volume, memory_mbit))  # the step in which the guaranteed volume reaches it
        expected = (k - 1) * step + (memory_mbit - volume[k - 1]) / (volume[k] - volume[k - 1]) * step
        assert row["time_p90_s"] == pytest.approx(expected, rel=1e-5)
        assert row["beyond_horizon"] == (k > H)
        assert row["guaranteed_mbps_p90"] == pytest.approx(memory_mbit / expected, rel=1e-5)  # no dirtying: M / t
    assert "its bound calibrated" in row["note"]


def test_report_has_every_step_for_model_and_baselines(horizon_run):
    report = json.loads((horizon_run / "report.json").read_text())
    steps = report["horizon"]
    assert steps["steps"] == H
    for name in ("persistence", "ewma", "ridge", "gbt", "window_mean", "harmonic_mean_5"):
        assert len(steps["baselines"][name]["rtt_ms"]["rmse"]) == H
    assert len(steps["model"]["throughput_mbps"]["rmse"]) == H
    # step 1 of the per-step table is the one-step figure of the report
    assert steps["model"]["rtt_ms"]["rmse"][0] == pytest.approx(report["per_target"]["rtt_ms"]["rmse"], rel=1e-6)
    assert steps["baselines"]["persistence"]["rtt_ms"]["rmse"][0] == pytest.approx(
        report["baselines"]["persistence"]["per_target"]["rtt_ms"]["rmse"], rel=1e-6
    )
    assert (horizon_run / "horizon.png").exists()
    assert "## Per horizon step" in (horizon_run / "report.md").read_text()


def test_another_model_file_name_is_found_by_every_reader(horizon_run, tmp_path):
    """``--onnx.filename`` other than model.onnx: the metadata names the file, and the predictor, the report and the
    bench all find it (they ask dwcp_lstm.contract.model_path_of)."""
    from dwcp_lstm.bench import build_model

    assert (horizon_run / "net.onnx").is_file() and not (horizon_run / "model.onnx").exists()
    assert json.loads((horizon_run / "model_metadata.json").read_text())["model_file"] == "net.onnx"
    assert Predictor.from_run(horizon_run).model_path == horizon_run / "net.onnx"
    report = json.loads((horizon_run / "report.json").read_text())
    assert report["onnx"] is not None and report["onnx"]["sha256_matches_metadata"] is True
    _, _, path, _ = build_model(str(horizon_run), tmp_path, None, 16)
    assert path == horizon_run / "net.onnx"


def test_report_has_the_oracle_and_gap_closed_per_step(horizon_run):
    report = json.loads((horizon_run / "report.json").read_text())
    steps, targets = report["horizon"], list(report["per_target"])
    assert steps["oracle"] is not None and len(steps["oracle"]["rtt_ms"]["rmse"]) == H
    # step 1 of the per-step oracle is the report's one-step oracle
    assert steps["oracle"]["rtt_ms"]["rmse"][0] == pytest.approx(report["oracle"]["per_target"]["rtt_ms"]["rmse"])
    for t in targets:
        gap = steps["gap_closed"][t]
        assert len(gap) == H and gap[0] == pytest.approx(report["gap_closed"][t], rel=1e-9)
        assert steps["gap_closed_ge_0.8"][t] == [g is not None and g >= 0.8 for g in gap]
        # from the per-step RMSEs: (MSE_persistence - MSE_model) / (MSE_persistence - MSE_oracle)
        m, p, o = (
            np.square(e[t]["rmse"]) for e in (steps["model"], steps["baselines"]["persistence"], steps["oracle"])
        )
        np.testing.assert_allclose(gap, (p - m) / (p - o), rtol=1e-9)
        assert (np.array(steps["oracle"][t]["rmse"]) < steps["baselines"]["persistence"][t]["rmse"]).all()
    assert report["checks"]["horizon_gap_closed_ge_0.8_every_step"] == {
        t: all(steps["gap_closed_ge_0.8"][t]) for t in targets
    }
    md = (horizon_run / "report.md").read_text()
    assert "gap closed >= 0.8 at every horizon step" in md and "| oracle | gap closed |" in md


def test_oracle_join_gives_each_step_from_the_sidecar_at_the_windows_last_row(horizon_run):
    from dwcp_lstm import synthetic
    from dwcp_lstm.evaluate import oracle_forecasts
    from dwcp_lstm.runs import datamodule_from_config

    dm = datamodule_from_config(horizon_run / "config.yaml")
    dm.setup("test")
    rows = dm.target_rows("test")
    got = oracle_forecasts(dm, rows)  # [N, H, T]
    assert got.shape == (len(rows), H, dm.n_targets)
    sidecar = pd.read_csv(synthetic.oracle_path(dm.path))
    keys = ["node_id", "peer_id", "timestamp"]
    at = sidecar.set_index(keys)
    last = dm.frame_keys.iloc[rows - 1]  # each window's last input row
    for i in (0, len(rows) // 2, len(rows) - 1):
        row = at.loc[tuple(last.iloc[i][keys])]
        for h in range(1, H + 1):
            cols = [f"oracle_{t}" if h == 1 else f"oracle_{t}_h{h}" for t in dm.targets]
            np.testing.assert_array_equal(got[i, h - 1], row[cols].to_numpy(np.float64))


def test_a_sidecar_without_the_h_step_columns_gives_step_one_only(dm):
    from dwcp_lstm.evaluate import oracle_forecasts, per_step

    rows = dm.target_rows("test")
    assert oracle_forecasts(dm, rows) is None  # the small file's sidecar has step 1 only
    assert oracle_forecasts(dm, rows, steps=1).shape == (len(rows), 1, dm.n_targets)
    y = np.zeros((4, H, 2))
    out = per_step(y + 1, y, {"persistence": (y + 2, np.ones(4, dtype=bool))}, ["a", "b"], None)
    assert out["oracle"] is None and out["gap_closed"] is None and "not available" in out["oracle_note"]


def test_prepare_data_adds_the_h_step_oracle_to_an_old_sidecar_and_leaves_the_data_alone(tmp_path):
    from dwcp_lstm import synthetic
    from dwcp_lstm.data import SyntheticSpec

    spec = SyntheticSpec(samples=1200, links=2)
    old = DwcpDataModule(horizon=1, data_dir=str(tmp_path), synthetic=spec)
    old.prepare_data()  # the built-in dataset: the oracle for 12 steps whatever the horizon
    sidecar = synthetic.oracle_path(old.path)
    assert set(synthetic.oracle_columns(synthetic.TARGETS, 12)) <= set(pd.read_csv(sidecar, nrows=0).columns)
    data = old.path.read_bytes()
    full = pd.read_csv(sidecar)
    synthetic.write_frame(full[["node_id", "peer_id", "timestamp", *(f"oracle_{t}" for t in synthetic.TARGETS)]],
                          sidecar)  # fmt: skip  # as written before the h-step oracle
    DwcpDataModule(horizon=1, data_dir=str(tmp_path), synthetic=spec).prepare_data()
    assert "oracle_rtt_ms_h2" not in pd.read_csv(sidecar, nrows=0).columns  # step 1 is all H = 1 needs
    DwcpDataModule(horizon=H, data_dir=str(tmp_path), synthetic=spec).prepare_data()
    assert old.path.read_bytes() == data
    pd.testing.assert_frame_equal(pd.read_csv(sidecar), full)


@pytest.mark.parametrize(("samples", "horizon", "steps"), [(15_000, 3, 12), (15_000, 20, 20), (500_000, 3, 3),
                                                           (10_000_000, 3, 1), (10_000_000, 1, 1)])  # fmt: skip
def test_the_built_in_oracle_steps_are_capped_on_huge_data(samples, horizon, steps):
    from dwcp_lstm.data import SyntheticSpec

    assert DwcpDataModule(horizon=horizon, synthetic=SyntheticSpec(samples=samples)).oracle_steps == steps


def test_forecast_online_recalibrates_each_bound_from_realised_values(horizon_run, small_csv, tmp_path):
    """``forecast --rolling --online``: the forecasts are the rolling ones, every interval is scaled about its
    forecast (which stays inside it) and holds the lower level's, the first
    window of each link has the static bounds, and from one window to the next the step-1 multiplier moves by
    rate x (miss - alpha), the miss judged on the row that window forecast (checked here by hand, from the CSV)."""
    from dwcp_lstm.online import RATE

    static, online = tmp_path / "static.csv", tmp_path / "online.csv"
    base = ["forecast", "--model", str(horizon_run), "--input", str(small_csv), "--rolling", "--output"]
    cli_main([*base, str(static)])
    cli_main([*base, str(online), "--online"])
    a, b = pd.read_csv(static), pd.read_csv(online)
    p = Predictor.from_run(horizon_run)
    np.testing.assert_array_equal(a[p.columns].to_numpy(), b[p.columns].to_numpy())
    lo, hi = "rtt_ms_h1_lo80", "rtt_ms_h1_hi80"
    f = a["rtt_ms_h1"]  # scaled about the forecast: it splits the static and the online interval alike
    np.testing.assert_allclose((f - b[lo]) * (a[hi] - f), (b[hi] - f) * (f - a[lo]), rtol=1e-4, atol=1e-9)
    for c in p.columns:  # every column, every row: the forecast inside both intervals, the 95 % one around the 80 %
        assert (b[f"{c}_lo80"] <= b[c] + 1e-6).all() and (b[c] <= b[f"{c}_hi80"] + 1e-6).all(), c
        assert (b[f"{c}_lo95"] <= b[f"{c}_lo80"]).all() and (b[f"{c}_hi95"] >= b[f"{c}_hi80"]).all(), c
    data = pd.read_csv(small_csv)
    for _, link in b.groupby(["node_id", "peer_id"]):
        ref = a.loc[link.index]
        np.testing.assert_allclose(link[[lo, hi]].iloc[0], ref[[lo, hi]].iloc[0], rtol=1e-6)
        rows = data[(data["node_id"] == link["node_id"].iloc[0]) & (data["peer_id"] == link["peer_id"].iloc[0])]
        realised = rows.set_index("timestamp")["rtt_ms"].shift(-1).loc[link["timestamp"]].to_numpy()  # next row
        s = ((link[hi] - link[lo]) / (ref[hi] - ref[lo])).to_numpy()
        miss = (realised < link[lo].to_numpy()) | (realised > link[hi].to_numpy())
        np.testing.assert_allclose(np.diff(np.log(s)), RATE * (miss[:-1] - 0.2), atol=1e-4)
    assert (b[lo] != a[lo]).any()


def test_forecast_online_per_link_is_the_last_window_of_the_rolling_one(horizon_run, small_csv, tmp_path):
    latest, rolling = tmp_path / "latest.csv", tmp_path / "rolling.csv"
    base = ["forecast", "--model", str(horizon_run), "--input", str(small_csv), "--online", "--output"]
    cli_main([*base, str(latest)])
    cli_main([*base, str(rolling), "--rolling"])
    a, b = pd.read_csv(latest), pd.read_csv(rolling).groupby(["node_id", "peer_id"]).tail(1)
    assert len(a) == 4
    np.testing.assert_allclose(a.iloc[:, 3:].to_numpy(), b.iloc[:, 3:].to_numpy(), rtol=1e-6)


def test_plan_online_learns_each_links_margin_from_its_own_history(horizon_run, small_csv, capsys):
    """``plan --online``: with one window per link there is nothing to learn (the calibrated plan); with the whole
    history each link's multiplier comes from its own past migrations, and its confident time is the plan with the
    bounds' distance below the forecast scaled by it."""
    from dwcp_lstm import planner as P

    def plan(path, *extra) -> dict:
        cli_main(["plan", "--model", str(horizon_run), "--input", str(path), "--json", "--memory-gib", "2", *extra])
        return json.loads(capsys.readouterr().out)

    data = pd.read_csv(small_csv)
    short = horizon_run / "latest.csv"
    data.groupby(["node_id", "peer_id"]).tail(20).to_csv(short, index=False)  # one window per link
    static, learnt = plan(short), plan(short, "--online")
    assert [r["online_outcomes"] for r in learnt["links"]] == [0] * len(learnt["links"])
    assert [r["time_p90_s"] for r in learnt["links"]] == pytest.approx([r["time_p90_s"] for r in static["links"]])
    full = plan(small_csv, "--online")
    assert full["online"]["rate"] > 0 and all(r["online_outcomes"] > 50 for r in full["links"])
    assert any(abs(r["online_scale"] - 1) > 0.01 for r in full["links"])
    p = Predictor.from_run(horizon_run)
    for row in full["links"]:
        link = data[(data["node_id"] == row["node_id"]) & (data["peer_id"] == row["peer_id"])]
        window = link[p.features].to_numpy(np.float32)[-p.window :][None]
        f, lo, tail = P._curves(p, window, "throughput_mbps", 0.8, "t")
        expected = P.confident_time(
            f, lo, np.array([row["step_s"]]), P.Migration(2.0), tail, np.array([row["online_scale"]])
        )
        assert row["time_p90_s"] == pytest.approx(expected[0], rel=1e-6)


def test_plan_online_learns_from_migrations_still_running_past_their_confident_time(horizon_run, small_csv, tmp_path,
                                                                                    capsys):  # fmt: skip
    """A link that carried nothing for its whole history: none of its replayed migrations ended inside the data, so
    it learnt from none and kept its calibrated promise (a 2-hour migration at 90 % after 41 hours at 0 Mbit/s).
    Those still running past their confident time are certain misses, and now widen its margin."""
    data = pd.read_csv(small_csv)
    dead = (data["node_id"] == "node-0") & (data["peer_id"] == "node-1")
    data.loc[dead, "throughput_mbps"] = 0.0
    path = tmp_path / "dead.csv"
    data.to_csv(path, index=False)

    def plan(*extra) -> dict:
        cli_main(["plan", "--model", str(horizon_run), "--input", str(path), "--json", "--memory-gib", "64", *extra])
        return {(r["node_id"], r["peer_id"]): r for r in json.loads(capsys.readouterr().out)["links"]}

    static, learnt = plan(), plan("--online")
    row = learnt[("node-0", "node-1")]
    assert row["online_outcomes"] > 50 and row["online_scale"] > 2
    slower = row["time_p90_s"] is None or row["time_p90_s"] > 2 * static[("node-0", "node-1")]["time_p90_s"]
    assert slower, (row, static[("node-0", "node-1")])
    others = [r for k, r in learnt.items() if k != ("node-0", "node-1")]
    assert all(0.2 < r["online_scale"] < 5 for r in others)  # the live links' margins stay near their calibration


def test_predictor_rolling_online_matches_the_forecast_command(horizon_run, small_csv, tmp_path):
    out = tmp_path / "online.csv"
    cli_main(["forecast", "--model", str(horizon_run), "--input", str(small_csv), "--rolling", "--online",
              "--output", str(out)])  # fmt: skip
    got = pd.read_csv(out).query("node_id == 'node-0' and peer_id == 'node-1'")
    p = Predictor.from_run(horizon_run)
    link = pd.read_csv(small_csv).query("node_id == 'node-0' and peer_id == 'node-1'").sort_values("timestamp")
    mine = p.predict_rolling(link, online=True)
    np.testing.assert_allclose(mine.to_numpy(), got[p.all_columns].to_numpy(), rtol=1e-5, atol=1e-6)

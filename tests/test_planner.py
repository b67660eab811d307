"""The migration planner: the pre-copy model against a plain loop, plans that keep their confidence on data drawn
from a known distribution, the `plan` command and its refusals, and the report's backtest."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import fit_args, run_dir_of

from dwcp_lstm import planner as P
from dwcp_lstm.cli import cli_main
from dwcp_lstm.errors import ConfigError


def precopy_loop(rates, tail, step, memory, dirty, downtime, max_rounds=P.MAX_ROUNDS):
    """The pre-copy model written the slow way, one second-by-second volume at a time (independent reference)."""

    def rate(t):
        i = int(t // step)
        return rates[i] if i < len(rates) else tail

    def time_to(volume):  # walk the curve one step at a time, then the constant tail in one go
        t, sent = 0.0, 0.0
        while True:
            r, end = rate(t), (int(t // step) + 1) * step
            if int(t // step) >= len(rates):  # past the curve: the tail rate for ever
                return t + (volume - sent) / r if r > 0 else (t if volume <= sent else np.inf)
            if sent + r * (end - t) >= volume:
                return t + (volume - sent) / r if volume > sent else t
            sent, t = sent + r * (end - t), end

    sent, start = memory, 0.0
    end = time_to(sent)
    for r in range(1, max_rounds + 1):
        if not np.isfinite(end):
            return np.inf, r
        left = min(memory, dirty * (end - start))
        if left <= rate(end) * downtime:
            return end + (left / rate(end) if left > 0 else 0.0), r
        sent += left
        start, end = end, time_to(sent)
    return np.inf, max_rounds


def test_precopy_matches_the_loop_on_random_curves():
    rng = np.random.default_rng(0)
    n, k = 60, 12
    rates = rng.uniform(50, 1200, (n, k))
    tail = rng.uniform(50, 1200, n)
    step = rng.choice([1.0, 60.0, 300.0], n)
    for m in (P.Migration(0.5, 0.0), P.Migration(16, 150.0, 300.0), P.Migration(64, 400.0, 50.0)):
        got = P.precopy(rates, tail, step, m)
        for i in range(n):
            t, rounds = precopy_loop(rates[i], tail[i], step[i], m.memory_mbit, m.dirty_rate_mbps, m.downtime_ms / 1e3)
            assert got["time_s"][i] == pytest.approx(t, rel=1e-9), (m, i)
            if np.isfinite(t):
                assert got["rounds"][i] == rounds


def test_constant_bandwidth_gives_the_geometric_series():
    """Akoush et al.: at constant bandwidth B and dirty rate D, round i lasts (M / B) (D / B)^i."""
    b, d, m = 1000.0, 250.0, P.Migration(8, 250.0, 300.0)
    out = P.precopy(np.full((1, 4), b), np.array([b]), np.array([60.0]), m)
    t0, ratio = m.memory_mbit / b, d / b
    n = int(out["rounds"][0])
    expected = t0 * sum(ratio**i for i in range(n)) + t0 * ratio**n  # n pre-copy rounds, then the stop-and-copy
    assert out["time_s"][0] == pytest.approx(expected)
    assert out["downtime_s"][0] == pytest.approx(t0 * ratio**n) and out["downtime_s"][0] <= 0.3
    assert t0 * ratio ** (n - 1) > 0.3  # one round earlier the rest did not fit in the downtime


def test_no_convergence_when_the_vm_dirties_faster_than_the_link_and_censoring_past_the_data():
    never = P.precopy(np.full((1, 3), 100.0), np.array([100.0]), np.array([1.0]), P.Migration(1, 150.0))
    assert not never["converged"][0] and never["time_s"][0] == np.inf
    cut = P.precopy(np.full((1, 3), 100.0), np.array([np.nan]), np.array([1.0]), P.Migration(1))  # 86 s of data: 3
    assert np.isnan(cut["time_s"][0]) and not cut["converged"][0]


def test_a_link_that_outpaces_the_dirtying_too_narrowly_is_not_told_it_does_not():
    """1000 Mbit/s against a dirty rate of 999: each round shrinks the rest by 0.1 %, so 100 rounds do not reach the
    downtime limit; the note said the link "does not outpace the dirty rate" (found by fuzzing)."""
    m = P.Migration(1, 999.0, 300.0)
    p = P.plan_arrays(np.full((1, 3), 1000.0), np.full((1, 3), 1000.0), np.array([60.0]), m)
    assert not p["converges"][0]
    note = P._note(p, 0, m, 0.9, "tp")
    assert "outpaces the dirty rate (999 Mbit/s) too narrowly for the rest to fit in 300 ms" in note, note
    slow = P.plan_arrays(np.full((1, 3), 900.0), np.full((1, 3), 900.0), np.array([60.0]), m)
    assert "does not outpace the dirty rate (999 Mbit/s)" in P._note(slow, 0, m, 0.9, "tp")


def test_a_link_forecast_at_zero_gets_a_statement():
    p = P.plan_arrays(np.zeros((1, 3)), np.zeros((1, 3)), np.array([60.0]), P.Migration(1))
    assert not p["converges"][0] and P._note(p, 0, P.Migration(1), 0.9, "tp") == (
        "no plan: the forecast tp of this link is 0 Mbit/s (nothing would be sent)"
    )


@pytest.mark.parametrize("gib", [64, 10_000, 1e9])
def test_the_confident_time_is_never_before_the_median_even_where_the_tail_bound_exceeds_the_forecast(gib):
    # past the horizon the calibrated offset of the realised mean can be positive: a bound above the held mean
    forecast = np.array([[700.0, 720.0, 740.0]])
    mean_lower = np.cumsum(forecast, axis=1) / np.arange(1, 4) - 50.0
    tail_lower = np.array([[690.0, 760.0, 900.0, 1500.0]])  # from the 5th step on above the held mean 720
    p = P.plan_arrays(forecast, mean_lower, np.array([300.0]), P.Migration(gib), tail_lower)
    assert p["time_confident_s"][0] >= p["time_median_s"][0]
    assert p["guaranteed_mbps"][0] <= p["mean_mbps"][0]


def test_lower_rates_keep_the_guaranteed_volume_and_never_unsend():
    lower = np.array([[100.0, 40.0, 90.0, -5.0]])
    rates = P.lower_rates(lower)
    assert (rates >= 0).all()
    assert np.cumsum(rates)[2] == pytest.approx(270.0)  # k x bound_k at k = 3
    assert np.cumsum(rates)[1] == pytest.approx(100.0)  # 2 x 40 < 100 already sent


def test_confidence_maps_to_the_lower_tail_of_a_calibrated_level():
    assert P.level_for(0.9, [0.8, 0.95]) == 0.8 and P.level_for(0.975, [0.8, 0.95]) == 0.95
    with pytest.raises(ConfigError, match=r"calibrated for confidences 0.9, 0.975 .*2c - 1"):
        P.level_for(0.95, [0.8, 0.95])
    with pytest.raises(ConfigError, match=r"--confidence 0.9999999999: the model"):  # not rounded to "1"
        P.level_for(0.9999999999, [0.8, 0.95])
    for bad in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(ConfigError, match="--confidence must be a number in"):
            P.level_for(bad, [0.8])
    with pytest.raises(ConfigError, match="--confidence 0.5000000005 is the median"):  # columns p50 and p50
        P.level_for(0.5000000005, [1e-9])
    for kwargs in ({"memory_gib": 0}, {"memory_gib": 1, "dirty_rate_mbps": -1}, {"memory_gib": 1, "downtime_ms": 0}):
        with pytest.raises(ConfigError, match="must be a finite number"):
            P.Migration(**kwargs)


def test_plans_keep_their_confidence_when_the_bound_is_exact():
    """Each window's link runs at one rate drawn from a known lognormal: the exact 10 % quantile as the mean bound
    must finish 90 % of migrations in time, whatever the size and dirty rate, and the median plan half of them."""
    rng = np.random.default_rng(3)
    n, h = 40_000, 6
    level = rng.lognormal(np.log(500), 0.3, n)
    real = np.repeat(level[:, None], 400, axis=1)
    q10 = np.exp(np.log(500) - 1.2815515655446004 * 0.3)
    forecast, lower = np.full((n, h), 500.0 * np.exp(0.045)), np.full((n, h), q10)  # the lognormal's mean
    out = P.backtest(real, np.full(n, 60.0), forecast, lower, level, level, lower, [4, 64], [0.0, 100.0])
    for r in out["runs"]:
        assert r["model"]["coverage"] == pytest.approx(0.9, abs=0.01), r
        assert r["simple"]["current_rate_held"]["mdape"] == pytest.approx(0.0, abs=1e-9)  # it knows the rate
        assert r["censored"] == 0


def test_a_plan_without_a_time_is_not_counted_as_a_kept_promise():
    """Half the windows get a lower bound of 0 (an idle client: nothing guaranteed, the confident time is inf),
    the other half the exact 10 % quantile of their rate: coverage is judged on the plans that give a time, 90 %,
    and the others are counted apart. Counted as hits (until 2026-12-02) they made it read 95 %."""
    rng = np.random.default_rng(4)
    n, h = 20_000, 4
    rate = rng.lognormal(np.log(500), 0.3, n)
    real = np.repeat(rate[:, None], 300, axis=1)
    q10 = np.exp(np.log(500) - 1.2815515655446004 * 0.3)
    forecast, lower = np.full((n, h), 500.0), np.full((n, h), q10)
    lower[: n // 2] = 0.0
    out = P.backtest(real, np.full(n, 60.0), forecast, lower, rate, rate, lower, [64], [0.0])
    model = out["runs"][0]["model"]
    assert model["no_time_share"] == 0.5 and model["coverage"] == pytest.approx(0.9, abs=0.01)


def test_the_backtest_counts_a_migration_cut_off_after_its_confident_time_as_a_miss():
    n, h = 10, 5
    real = np.full((n, 50), 100.0)  # Mbit/s: 1,000 Mbit take 10 s
    real[7:] = 1.0  # three slow starts ...
    real[7:, 20:] = np.nan  # ... whose data ends after 20 s, when the 11.1 s promised at 90 Mbit/s had passed
    real[6, 5:] = np.nan  # one whose data ends after 5 s, before its confident time: unknown, left out
    forecast, lower, rate = np.full((n, h), 100.0), np.full((n, h), 90.0), np.full(n, 100.0)
    size = 1000.0 / P.MBIT_PER_GIB
    out = P.backtest(real, np.full(n, 1.0), forecast, lower, rate, rate, lower, [size], [0.0],
                     issued=np.arange(n) * 100, groups=np.zeros(n, int))  # fmt: skip
    run = out["runs"][0]
    assert (run["migrations"], run["censored"]) == (6, 4)
    assert run["model"]["coverage"] == pytest.approx(6 / 9)  # dropped, the misses made it 6 of 6
    assert run["persistence_conformal_coverage"] == pytest.approx(6 / 9)
    assert run["simple"]["current_rate_held"]["done_by_estimate"] == pytest.approx(6 / 9)
    assert run["model"]["online_coverage"] <= 6 / 9 + 1e-12
    assert run["model"]["coverage_blocks"] == 9  # the judged starts, 100 rows apart: each its own block


def test_the_backtest_judges_the_oracles_plan_as_it_judges_the_models():
    """``oracle_coverage`` is the coverage the same backtest gives a model whose forecast and bounds are the
    oracle's: equal to the model's when they are the model's, and to a rerun with them as the model otherwise."""
    rng = np.random.default_rng(5)
    n, h = 40, 4
    real = rng.uniform(50.0, 150.0, (n, 60))
    forecast, rate = np.full((n, h), 100.0), np.full(n, 100.0)
    lower, o_lower = np.full((n, h), 80.0), np.full((n, h), 95.0) + rng.normal(0, 5, (n, h))
    args = (real, np.full(n, 1.0), forecast)
    sizes = [300.0 / P.MBIT_PER_GIB, 1500.0 / P.MBIT_PER_GIB]
    same = P.backtest(*args, lower, rate, rate, lower, sizes, [0.0], oracle=(forecast, lower, None))
    other = P.backtest(*args, lower, rate, rate, lower, sizes, [0.0], oracle=(forecast, o_lower, None))
    as_model = P.backtest(*args, o_lower, rate, rate, lower, sizes, [0.0])
    for a, b, c in zip(same["runs"], other["runs"], as_model["runs"], strict=True):
        assert a["oracle_coverage"] == a["model"]["coverage"]
        assert b["oracle_coverage"] == c["model"]["coverage"] != a["model"]["coverage"]
    assert P.backtest(*args, lower, rate, rate, lower, sizes, [0.0])["runs"][0]["oracle_coverage"] is None


def test_coverage_interval_counts_blocks_not_migrations():
    """40 stretches of 50 identical outcomes (a migration started a row later is nearly the same migration), 36
    covered: the bootstrap over blocks is as wide as a binomial of 40 outcomes, the normal approximation's
    0.9 +- 1.96 sqrt(0.09 / 40); over single migrations it would claim 2,000 and be seven times narrower."""
    hit = np.repeat(np.arange(40) < 36, 50)
    issued, groups = np.arange(2000), np.zeros(2000, int)
    (lo, hi), blocks = P.coverage_interval(hit, issued, groups, 50)
    assert blocks == 40 and lo < 0.9 < hi
    assert hi - lo == pytest.approx(2 * 1.96 * np.sqrt(0.09 / 40), rel=0.2)
    (lo1, hi1), blocks1 = P.coverage_interval(hit, issued, groups, 1)
    assert blocks1 == 2000 and hi1 - lo1 == pytest.approx(2 * 1.96 * np.sqrt(0.09 / 2000), rel=0.2)
    assert P.coverage_interval(hit, issued, groups, 50) == ([lo, hi], 40)  # seeded: a report is reproducible


def test_coverage_interval_keeps_links_apart():
    """Two links with the same start rows are two blocks each, never one; one block gives no interval."""
    hit, issued = np.array([True, False, True, True]), np.array([0, 5, 0, 5])
    assert P.coverage_interval(hit, issued, np.array(["a", "a", "b", "b"]), 10)[1] == 2
    assert P.coverage_interval(hit, issued, np.array(["a", "a", "a", "a"]), 10) == (None, 1)
    assert P.coverage_interval(hit[:0], issued[:0], np.array([]), 10) == (None, 0)


def test_carried_volume_matches_a_direct_sum():
    rng = np.random.default_rng(3)
    stretches, steps = [rng.exponential(2.0, n) for n in (1, 7, 30)], [1.0, 0.5, 2.0]
    for k in (1, 2.5, 6):
        whole, part = int(k), k - int(k)
        ref = [
            c * (x[i : i + whole].sum() + part * (x[i + whole] if part else 0.0))
            for x, c in zip(stretches, steps, strict=True)
            for i in range(len(x) - whole - (part > 0) + 1)
        ]
        assert P.carried_mbit(stretches, steps, k) == pytest.approx(np.median(ref), rel=1e-12)
    assert P.carried_mbit([np.ones(3)], [1.0], 5) == 0.0  # no stretch that long


def test_the_ladder_fits_the_horizon_even_on_a_bursty_link():
    assert P.workload(540.0, 3600.0, [1.0, 2.0, 3.0]) == ([16.0, 64.0, 256.0, 1024.0], [0.0, 108.0])
    assert P.workload(0.5, 10.0, [0.0, 0.0, 0.0]) == ([], [0.0])  # idle in most stretches: the report says skipped
    # 1 Mbit/s with a 100 Mbit/s burst of 2 s every 30 s: mean 7.7 Mbit/s, but 10 s from a typical row carry 10 Mbit.
    rates = np.tile(np.r_[100.0, 100.0, np.ones(28)], 60)
    carried = [P.carried_mbit([rates], [1.0], f * 10) for f in P.LADDER_SHARES]
    sizes, dirty = P.workload(float(rates.mean()), 10.0, carried)
    assert len(sizes) == 3 and sizes[-1] * P.MBIT_PER_GIB == pytest.approx(10.0, rel=0.01) and dirty == [0.0, 0.2]
    starts = np.arange(len(rates) - 40)
    real = rates[starts[:, None] + np.arange(40)]  # [N, 40] what follows each start
    for size, share in zip(sizes, P.LADDER_SHARES, strict=True):
        t = P.precopy(real, np.full(len(starts), np.nan), 1.0, P.Migration(size, 0.0))["time_s"]
        assert np.median(t) <= share * 10 + 1e-9  # the median transfer fits its share of the horizon
    # Sized at the mean rate instead (the old ladder), the largest outlasted the horizon from most rows.
    at_mean = P.Migration(float(rates.mean()) * 10 / P.MBIT_PER_GIB, 0.0)
    assert np.mean(P.precopy(real, np.full(len(starts), np.nan), 1.0, at_mean)["time_s"] > 10) > 0.5


@pytest.mark.parametrize("stage", ["val", "test"])
def test_a_replay_reads_the_measured_rows_of_its_own_split_only(small_csv, stage):
    from dwcp_lstm.data import DwcpDataModule

    dm = DwcpDataModule(data_path=str(small_csv), batch_size=64, horizon=3)
    dm.setup("fit")
    j = dm.targets.index("throughput_mbps")
    rp = P.replay_windows(dm, j, stage, most=100)  # of 292 windows: an even subset
    assert len(rp.pick) == 100 and rp.sizes and np.array_equal(rp.first, dm.target_rows(stage)[rp.pick])
    seen = np.isfinite(rp.real).sum(axis=1)
    assert np.isfinite(rp.real).sum() == sum(seen)  # NaN only past the end, never a hole
    seg = dm.segment_of_row[rp.first]
    for i in range(len(rp.pick)):
        rows = rp.first[i] + np.arange(seen[i])
        np.testing.assert_array_equal(rp.real[i, : seen[i]], dm.raw_targets[rows, j])
        later = dm.target_rows("test")[dm.segment_of_row[dm.target_rows("test")] == seg[i]]
        if stage == "val":  # stops where the test split's targets begin: the replay never reads them
            assert rp.first[i] + seen[i] == later.min()
        else:  # the test split runs to its segment's end (or the replay's longest stretch)
            end = min(dm.bounds[seg[i], 1], rp.first[i] + rp.real.shape[1])
            assert rp.first[i] + seen[i] == end


# -- the command ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def telemetry(smoke_run, tmp_path_factory) -> str:
    df = pd.read_csv(next((smoke_run.parent.parent / "data").glob("dwcp_*[0-9].csv")))
    path = tmp_path_factory.mktemp("plan") / "telemetry.csv"
    df.groupby(["node_id", "peer_id"], observed=True).tail(25).to_csv(path, index=False)
    return str(path)


def plan(run, telemetry, *extra) -> list[str]:
    return ["plan", "--model", str(run), "--input", telemetry, *extra]


def test_plan_ranks_every_link(smoke_run, telemetry, capsys):
    cli_main(plan(smoke_run, telemetry, "--memory-gib", "16", "--dirty-rate-mbps", "100", "--json"))
    out = json.loads(capsys.readouterr().out)
    assert out["level"] == 0.8 and out["confidence"] == 0.9
    links = out["links"]
    assert [r["rank"] for r in links] == [1, 2, 3, 4]
    times = [r["time_p90_s"] for r in links]
    assert times == sorted(times)  # fastest at the confidence level first
    for r in links:
        assert r["time_p90_s"] >= r["time_median_s"] > 0
        assert r["guaranteed_mbps_p90"] <= r["mean_mbps"]
        assert r["step_s"] == 300.0
    cli_main(plan(smoke_run, telemetry, "--memory-gib", "16"))
    text = capsys.readouterr().out
    assert "time p90" in text and "pre-copy" in text and text.count("Mbit/s") >= 8


@pytest.mark.parametrize("command", ["plan", "forecast"])
def test_inputs_far_beyond_the_training_range_are_refused_unless_asked(smoke_run, telemetry, tmp_path, capsys,
                                                                      command):  # fmt: skip
    """A throughput in kbit/s where Mbit/s was trained (1e5) became a confident plan of seconds, exit 0."""
    df = pd.read_csv(telemetry, dtype={"node_id": str, "peer_id": str})
    last = df.index[(df.node_id == "node-1")][-1]
    df.loc[last, "throughput_mbps"] = 1e5
    bad = tmp_path / "kbit.csv"
    df.to_csv(bad, index=False)
    args = plan(smoke_run, str(bad), "--memory-gib", "16") if command == "plan" else [
        "forecast", "--model", str(smoke_run), "--input", str(bad)]  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        cli_main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {bad}: link node-1/node-2 step 20 column 'throughput_mbps': 100000 is far "
                             "outside the training rows' range"), err  # fmt: skip
    cli_main([*args, "--extrapolate"])  # asked for: forecast anyway
    assert "node-1" in capsys.readouterr().out
    meta = json.loads((smoke_run / "model_metadata.json").read_text())
    lo, hi = meta["features"][0]["train_range"]
    assert 0 <= lo < hi < 1e5
    df.loc[last, "throughput_mbps"] = hi * 1.5  # beyond the training maximum, but not far: a forecast
    df.to_csv(bad, index=False)
    cli_main(args)
    capsys.readouterr()
    # an old spike read by every window of an online / rolling run: its link and time named (was "window 1")
    old = df.index[(df.node_id == "node-1")][2]  # before the latest window (25 rows, window 20)
    df.loc[old, "throughput_mbps"] = 1e5
    df.to_csv(bad, index=False)
    with pytest.raises(SystemExit) as exc:
        cli_main([*args, "--online" if command == "plan" else "--rolling"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {bad}: link node-1/node-2 timestamp {df.timestamp[old]} column "
                             "'throughput_mbps': 100000 is far outside"), err  # fmt: skip


def constant_feature_run(smoke_run, dest, feature: str):
    """The smoke model with ``feature`` recorded as always 0 in training (train_range [0, 0]), contract re-signed."""
    from dwcp_lstm.contract import CONTRACT_KEYS, embed_contract
    from dwcp_lstm.tables import sha256_of

    dest.mkdir()
    for name in ("model.onnx", "model_metadata.json"):
        shutil.copy(smoke_run / name, dest / name)
    meta = json.loads((dest / "model_metadata.json").read_text())
    next(c for c in meta["features"] if c["name"] == feature)["train_range"] = [0.0, 0.0]
    embed_contract(dest / "model.onnx", {k: meta[k] for k in CONTRACT_KEYS if k in meta})
    meta["model_sha256"] = sha256_of(dest / "model.onnx")
    (dest / "model_metadata.json").write_text(json.dumps(meta))
    return dest


@pytest.mark.parametrize("command", ["plan", "forecast"])
def test_a_feature_constant_in_training_refuses_any_other_value(smoke_run, telemetry, tmp_path, capsys, command):
    """retransmits always 0 in training had no range check at all: 1e30 gave absurd forecasts and a "0.0 s" plan,
    exit 0. Any other value is refused now (--extrapolate forecasts it); the constant itself passes."""
    run = constant_feature_run(smoke_run, tmp_path / "run", "retransmits")
    df = pd.read_csv(telemetry, dtype={"node_id": str, "peer_id": str}).assign(retransmits=0.0)
    good = tmp_path / "zero.csv"
    df.to_csv(good, index=False)
    args = (lambda data: plan(run, data, "--memory-gib", "16")) if command == "plan" else (
        lambda data: ["forecast", "--model", str(run), "--input", data])  # fmt: skip
    cli_main(args(str(good)))
    assert "node-1" in capsys.readouterr().out
    df.loc[df.index[df.node_id == "node-1"][-1], "retransmits"] = 1e30
    bad = tmp_path / "huge.csv"
    df.to_csv(bad, index=False)
    with pytest.raises(SystemExit) as exc:
        cli_main(args(str(bad)))
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {bad}: link node-1/node-2 step 20 column 'retransmits': 1e+30 differs from 0, "
                             "its only value in the training rows"), err  # fmt: skip
    cli_main([*args(str(bad)), "--extrapolate"])  # asked for: forecast anyway
    assert "node-1" in capsys.readouterr().out


def test_plan_says_so_when_a_migration_cannot_converge(smoke_run, telemetry, capsys):
    cli_main(plan(smoke_run, telemetry, "--memory-gib", "4", "--dirty-rate-mbps", "5000", "--json"))
    links = json.loads(capsys.readouterr().out)["links"]
    assert all(r["time_median_s"] is None and not r["converges"] for r in links)
    assert all(r["note"].startswith("does not converge") for r in links)
    cli_main(plan(smoke_run, telemetry, "--memory-gib", "4096"))  # far beyond the one-step horizon
    assert "outlasts the 5-minute forecast" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--memory-gib", "0"], "--memory-gib must be a finite number from 9.31e-10 (a byte) to 1e+09, got 0.0"),
        (["--memory-gib", "8", "--dirty-rate-mbps", "-1"], "--dirty-rate-mbps must be a finite number from 0 to 1e+07"),
        (["--memory-gib", "8", "--confidence", "1.2"], "--confidence must be a number in (0, 1), got 1.2"),
        (["--memory-gib", "8", "--confidence", "0.8"], "calibrated for confidences 0.9, 0.975"),
        (["--memory-gib", "8", "--throughput", "rtt_ms"], "--throughput 'rtt_ms' is in ms, not Mbit/s"),
        (["--memory-gib", "nan"], "--memory-gib must be a finite number from 9.31e-10 (a byte) to 1e+09, got nan"),
        (["--memory-gib", "1e308"], "--memory-gib must be a finite number from 9.31e-10 (a byte) to 1e+09, got 1e+308"),
        (["--memory-gib", "8", "--step-seconds", "1e-17"], "--step-seconds must be a number of seconds from 0.001"),
        # beyond these the replay overflowed (numpy's multi-line overflow warnings) or planned "0.0 s"
        (["--memory-gib", "8", "--step-seconds", "1e308"], "--step-seconds must be a number of seconds from 0.001 to"),
        (["--memory-gib", "8", "--dirty-rate-mbps", "1e308"], "--dirty-rate-mbps must be a finite number from 0 to"),
        (["--memory-gib", "1e-320"], "--memory-gib must be a finite number from 9.31e-10 (a byte)"),
        (["--memory-gib", "8", "--downtime-ms", "1e308"], "--downtime-ms must be a finite number > 0 and <= 8.64e+07"),
    ],
)
def test_bad_plans_are_one_line_errors(smoke_run, telemetry, capsys, extra, message):
    with pytest.raises(SystemExit) as exc:
        cli_main(plan(smoke_run, telemetry, *extra))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert message in err


def test_plan_refuses_short_telemetry_and_a_model_without_intervals(smoke_run, telemetry, tmp_path, capsys):
    short = tmp_path / "short.csv"
    pd.read_csv(telemetry).groupby(["node_id", "peer_id"]).tail(5).to_csv(short, index=False)
    with pytest.raises(SystemExit):
        cli_main(plan(smoke_run, str(short), "--memory-gib", "8"))
    assert "no link has 20 rows since its last gap (the model's window); the most is 5" in capsys.readouterr().err


@pytest.mark.parametrize("online", [False, True])
def test_plan_refuses_a_cadence_below_a_millisecond(smoke_run, telemetry, tmp_path, capsys, online):
    """Times in other units than seconds (here 1e-20 apart) would overflow the step index: one line instead."""
    df = pd.read_csv(telemetry)
    df["timestamp"] = df.groupby(["node_id", "peer_id"]).cumcount() * 1e-20
    tiny = tmp_path / "tiny.csv"
    df.to_csv(tiny, index=False)
    with pytest.raises(SystemExit) as exc:
        cli_main(plan(smoke_run, str(tiny), "--memory-gib", "8", *(["--online"] if online else [])))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "cadence" in err and "from 0.001 to 1e+07 s" in err, err


def test_a_model_exported_without_intervals_loads_and_plan_names_the_gap(smoke_run, telemetry, tmp_path, monkeypatch,
                                                                         capsys):  # fmt: skip
    """A validation split too small to calibrate exports a forecast-only model: it must still load (the contract
    has no intervals on either side) and `plan` must say why it cannot plan."""
    from dwcp_lstm import evaluate
    from dwcp_lstm.callbacks import export_run
    from dwcp_lstm.runs import load_run
    from dwcp_lstm.serve import Predictor

    module, dm, _ = load_run(smoke_run)
    monkeypatch.setattr(evaluate, "validation_calibration", lambda module, dm: (None, (None, None)))
    meta = export_run(module, dm, tmp_path, parity_windows=64)
    assert meta["intervals"] is None and meta["calibration"] is None
    assert Predictor.from_run(tmp_path).levels == []
    with pytest.raises(SystemExit) as exc:
        cli_main(plan(tmp_path, telemetry, "--memory-gib", "8"))
    assert exc.value.code == 2
    assert "the model has no prediction intervals, so no time can be given at a confidence" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # online recalibration has nothing to rescale: refused before reading
        cli_main(["forecast", "--model", str(tmp_path), "--input", str(tmp_path / "absent.csv"), "--online"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--online needs a model with prediction intervals; it has none" in err


def test_a_link_without_a_fresh_window_gets_a_statement_not_a_stale_plan(smoke_run, telemetry, capsys):
    from dwcp_lstm.serve import Predictor

    df = pd.read_csv(telemetry)
    first = df["node_id"].iloc[0]
    gap = df["node_id"] == first
    df.loc[gap, "timestamp"] += np.where(np.arange(gap.sum()) >= gap.sum() - 3, 3600, 0)  # a gap 3 rows before its end
    out, _ = P.plan_table(Predictor.from_run(smoke_run), df, ["node_id", "peer_id"], "timestamp", "t",
                          P.Migration(8), 0.9)  # fmt: skip
    row = out[out["node_id"].astype(str) == str(first)].iloc[0]
    assert row["note"] == "no plan: 3 rows since the last gap, the model needs 20" and np.isnan(row["time_p90_s"])
    assert row["rank"] == len(out)
    rounds = json.loads(out.to_json(orient="records"))  # as plan --json writes them: counts, null without a plan
    assert rounds[-1]["rounds_median"] is None and all(isinstance(r["rounds_median"], int) for r in rounds[:-1])


def test_report_backtests_the_planner(smoke_run):
    report = json.loads((smoke_run / "report.json").read_text())
    plan = report["planner"]
    assert plan["confidence"] == 0.9 and plan["level"] == 0.8 and plan["step_s"] == 300.0
    assert len(plan["runs"]) == 2 * len(plan["sizes_gib"])
    for r in plan["runs"]:
        assert r["migrations"] + r["censored"] == plan["windows"]
        assert set(r["simple"]) == {"current_rate_held", "harmonic_mean_5", "persistence_conformal"}
        assert 0 <= r["model"]["coverage"] <= 1 and 0 <= r["model"]["online_coverage"] <= 1
        assert 0 <= r["oracle_coverage"] <= 1  # the smoke data has an oracle sidecar
        lo, hi = r["model"]["coverage_ci95"]
        assert lo <= r["model"]["coverage"] <= hi and 2 <= r["model"]["coverage_blocks"] <= r["migrations"]
    md = (smoke_run / "report.md").read_text()
    assert "The generator's oracle (a perfect forecast)" in md and "| 95 % CI (blocks) |" in md
    assert set(plan["checks"]) == {"coverage_within_3_points", "online_coverage_within_3_points",
                                   "mdape_below_every_simple_planner"}  # fmt: skip
    assert (smoke_run / "planner.png").exists()


@pytest.mark.parametrize("factor", [1e6, 1e-12])
def test_throughput_far_from_megabits_skips_the_backtest_instead_of_failing_the_run(small_csv, tmp_path, factor):
    """Found by a hostile-input hunt: throughput in bit/s (or a trillionth of a Mbit/s) trained, exported, and then
    the report died on ``--dirty-rate-mbps must be ...`` (a flag nobody gave): the backtest's workload, read off the
    training rows, was outside what the planner takes. The run now finishes and the report says why it has no
    backtest."""
    df = pd.read_csv(small_csv, dtype={"node_id": str, "peer_id": str})
    path = tmp_path / "scaled.csv"
    df.assign(throughput_mbps=df["throughput_mbps"] * factor).to_csv(path, index=False)
    cli_main(fit_args(tmp_path, f"--data.data_path={path}", "--trainer.max_epochs=1", "--model.lstm_sizes=[8]",
                      "--model.head_sizes=[8]", "--model.head_dropouts=[]"))  # fmt: skip
    run = run_dir_of(tmp_path)
    skipped = json.loads((run / "report.json").read_text())["planner"]["skipped"]
    assert "outside what the planner takes" in skipped and "is throughput_mbps in Mbit/s?" in skipped, skipped
    assert f"Not run: {skipped}" in (run / "report.md").read_text()


# -- generated cases: any numbers give a plan or one refusal, never a traceback or a wrong-signed time -------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ANY_FLOAT = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(10**12), 10**12))


@settings(max_examples=200, deadline=None, derandomize=True)
@given(memory=ANY_FLOAT, dirty=ANY_FLOAT, downtime=ANY_FLOAT, confidence=ANY_FLOAT,
       rates=st.lists(st.floats(-1e4, 1e5), min_size=3, max_size=3), shrink=st.floats(0.0, 1.0))  # fmt: skip
def test_any_migration_numbers_give_a_plan_or_one_refusal(memory, dirty, downtime, confidence, rates, shrink):
    try:
        m = P.Migration(memory, dirty, downtime)
    except ConfigError as exc:
        assert "\n" not in str(exc) and "must be a finite number" in str(exc)
        return
    try:
        level = P.level_for(confidence, [0.8, 0.95])
        assert level in (0.8, 0.95)
    except ConfigError as exc:
        assert "\n" not in str(exc) and "--confidence" in str(exc)
    forecast = np.array([rates])
    mean_lower = np.cumsum(forecast, axis=1) / np.arange(1, 4) * shrink  # bounds at or below the forecast mean
    with np.errstate(over="raise", invalid="raise"):  # no silent overflow, bad cast or 0/0 outside the guarded spots
        p = P.plan_arrays(forecast, mean_lower, np.array([60.0]), m)
    for key in ("time_median_s", "time_confident_s"):
        t = p[key][0]
        assert np.isinf(t) or (np.isfinite(t) and t >= 0), (key, t)
    if p["converges"][0] and p["converges_confident"][0] and (forecast > 0).all():
        assert p["time_confident_s"][0] >= p["time_median_s"][0] * (1 - 1e-9)

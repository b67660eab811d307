import hashlib
import math

import numpy as np
import pandas as pd
import pytest

from dwcp_lstm import synthetic
from dwcp_lstm.cli import cli_main
from dwcp_lstm.synthetic import COLUMNS, TARGETS


@pytest.fixture(scope="module")
def default_data():
    return synthetic.generate_with_oracle()  # 15,000 rows, seed 42, dynamic


def test_same_arguments_give_byte_identical_files(tmp_path):
    for name in ("a.csv", "b.csv"):
        synthetic.write_frame(synthetic.generate(samples=3000, seed=3), tmp_path / name)
    synthetic.write_frame(synthetic.generate(samples=3000, seed=4), tmp_path / "c.csv")
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert (tmp_path / "a.csv").read_bytes() != (tmp_path / "c.csv").read_bytes()


@pytest.mark.parametrize("profile", synthetic.PROFILES)
def test_schema_and_physical_values(profile):
    df = synthetic.generate(samples=6000, profile=profile)
    assert list(df.columns) == COLUMNS
    assert len(df) == 6000
    assert (df["packet_loss"] >= 0).all() and (df["packet_loss"] < 1).all()
    for col in ("throughput_mbps", "rtt_ms", "jitter_ms", "bytes_tx", "bytes_rx", "queue_depth", "retransmits"):
        assert (df[col] >= 0).all(), col
    for col in ("bytes_tx", "bytes_rx", "retransmits", "congestion_window", "queue_depth", "timestamp"):
        assert pd.api.types.is_integer_dtype(df[col]), col
    assert (df["bandwidth_mbps"] == df["throughput_mbps"]).all() and (df["latency_ms"] == df["rtt_ms"]).all()
    ts = pd.to_datetime(df["timestamp"], unit="s", utc=True)
    assert (df["time_of_day"] == ts.dt.hour).all() and (df["day_of_week"] == ts.dt.dayofweek).all()
    assert ts.min() == synthetic.DEFAULT_START  # fixed start, never the clock
    for _, g in df.groupby(["node_id", "peer_id"], observed=True):
        steps = np.diff(g["timestamp"].to_numpy())
        assert len(set(steps)) == 1, "each link is a regular series"
        for col in ("region", "az", "link_type", "network_tier", "transport_type"):
            if profile == "dynamic":
                assert g[col].nunique() == 1, f"{col} is fixed per link"


def test_dynamic_links_cover_the_date_range(default_data):
    df, _ = default_data
    links = df.groupby(["node_id", "peer_id"], observed=True)
    assert links.ngroups == 5 and (links.size() == 3000).all()
    end = pd.to_datetime(df["timestamp"].max(), unit="s", utc=True)
    assert pd.Timestamp("2025-11-12", tz="UTC") < end < pd.Timestamp("2025-11-15", tz="UTC")


@pytest.mark.parametrize(
    ("column", "mean", "mean_tol", "std", "std_tol"),
    [
        ("throughput_mbps", 553, 0.10, 186, 0.15),
        ("rtt_ms", 47.3, 0.10, 10.6, 0.15),
        ("packet_loss", 0.023, 0.15, None, None),
        ("jitter_ms", 5.74, 0.15, None, None),
    ],
)
def test_statistics_near_the_original(default_data, column, mean, mean_tol, std, std_tol):
    df, _ = default_data
    assert abs(df[column].mean() - mean) <= mean_tol * mean
    if std is not None:
        assert abs(df[column].std() - std) <= std_tol * std


def test_dynamic_oracle_clears_the_targets_and_persistence_does_not(default_data):
    c = synthetic.ceiling(*default_data)
    oracle, persist = c["oracle"], c["persistence"]
    assert oracle["mean_correlation"] >= 0.98 and oracle["mean_mape"] < 5
    assert not (persist["mean_correlation"] >= 0.98 and persist["mean_mape"] < 5)
    assert all(oracle["mse"][t] < persist["mse"][t] for t in TARGETS)


def test_ceiling_matches_a_direct_computation():
    df, oracle = synthetic.generate_with_oracle(samples=400, links=1, seed=5)
    c = synthetic.ceiling(df, oracle)
    y = df["rtt_ms"].to_numpy()[-60:]
    prev = df["rtt_ms"].to_numpy()[-61:-1]
    assert c["persistence"]["correlation"]["rtt_ms"] == pytest.approx(np.corrcoef(y, prev)[0, 1])
    assert c["persistence"]["mape"]["rtt_ms"] == pytest.approx(100 * np.mean(np.abs(y - prev) / y))
    o = oracle["oracle_rtt_ms"].to_numpy()[-61:-1]
    assert c["oracle"]["mse"]["rtt_ms"] == pytest.approx(np.mean((o - y) ** 2))


def test_seed_profile_ceiling_is_far_below_the_targets():
    df, oracle = synthetic.generate_with_oracle(profile="seed")
    assert df["node_id"].nunique() == 1 and (np.diff(df["timestamp"]) == 60).all()
    c = synthetic.ceiling(df, oracle)
    assert 0.7 < c["oracle"]["mean_correlation"] < 0.85  # the noise alone caps it (the issue quotes about 0.79)
    assert all(c["oracle"]["mse"][t] < c["persistence"]["mse"][t] for t in TARGETS)


def test_oracle_is_nan_only_on_each_links_last_row(default_data):
    df, oracle = default_data
    nan_rows = oracle["oracle_rtt_ms"].isna()
    assert nan_rows.sum() == 5
    last = df.groupby(["node_id", "peer_id"], observed=True)["timestamp"].transform("max") == df["timestamp"]
    assert (nan_rows == last).all()


def test_generate_command_writes_data_and_sidecar(tmp_path, capsys):
    out = tmp_path / "d.parquet"
    cli_main(["generate", "--output", str(out), "--samples", "1200", "--seed", "1", "--links", "2"])
    df = pd.read_parquet(out)
    assert len(df) == 1200 and list(df.columns) == COLUMNS
    assert synthetic.oracle_path(out).exists()
    assert "wrote 1200 rows, 2 links" in capsys.readouterr().out
    pq = tmp_path / "d.pq"  # the readers take .pq as Parquet; generate refused to write it (found by fuzzing)
    cli_main(["generate", "--output", str(pq), "--samples", "1200", "--seed", "1", "--links", "2"])
    pd.testing.assert_frame_equal(pd.read_parquet(pq), df)
    assert synthetic.oracle_path(pq).exists()


# -- the h-step oracle ------------------------------------------------------------------------------------------------


def _reference_link(samples: int, seed: int) -> tuple[dict, list[dict]]:
    """The dynamic profile of a one-link dataset re-derived in plain Python from the module docstring's dynamics and
    the generator's draw order: the link's constants and, per state index, the latent state and the four target
    means. Independent of the module's code (no lfilter, no shared helpers)."""
    rng = np.random.default_rng(seed)
    metro = synthetic.LINK_TYPES[0]  # link 0
    names = ("capacity_mbps", "base_rtt_ms", "utilisation", "loss_floor", "jitter_floor_ms", "max_queue_delay_ms")
    link = {name: getattr(metro, name) * float(rng.uniform(0.9, 1.1, 1)[0]) for name in names}
    burn = 200
    total = samples + burn + 1
    eps = 0.07 * rng.standard_normal((1, total))[0]
    kicks = (rng.random((1, total)) < 1 / 144)[0] * rng.uniform(0.15, 0.4, (1, total))[0]
    t0 = int(synthetic.DEFAULT_START.timestamp())
    link["calendar"] = []
    for i in range(total + 20):  # beyond the end too: the reference forecasts past the last row
        ts = t0 + 300 * (i - burn - 1)
        hour = (ts % 86_400) / 3600.0
        weekend = ((ts // 86_400) + 3) % 7 >= 5
        link["calendar"].append((1.0 + 0.28 * math.sin(2 * math.pi * (hour - 8.0) / 24.0)) * (0.78 if weekend else 1.0))
    states, z, build, episode, delay = [], 0.0, 0.0, 0.0, None
    for i in range(total):
        z, build = 0.9 * z + eps[i], 0.8 * build + kicks[i]
        episode = 0.85 * episode + 0.2 * build
        state = _reference_step(link, i, z, episode, delay)
        states.append({"z": z, "build": build, "episode": episode, **state})
        delay = state["delay"]
    return link, states


def _reference_step(link: dict, i: int, z: float, episode: float, prev_delay: float | None) -> dict:
    """rho, the queue and the targets' means at state index ``i`` (the docstring's formulas, scalar Python)."""
    rho = min(max(link["utilisation"] * link["calendar"][i] * math.exp(z) + episode, 0.05), 1.25)
    h = rho**4 / (rho**4 + 0.9**4)
    delay = link["max_queue_delay_ms"] * h
    loss = link["loss_floor"] + 0.09 * h**3
    jump = 0.0 if prev_delay is None else abs(delay - prev_delay)
    return {
        "rho": rho,
        "delay": delay,
        "throughput_mbps": min(rho, 1.0) * link["capacity_mbps"] * (1 - loss),
        "rtt_ms": link["base_rtt_ms"] + delay,
        "packet_loss": loss,
        "jitter_ms": link["jitter_floor_ms"] + 0.25 * delay + 0.6 * jump,
    }


def _reference_forecast(link: dict, s: int, start: dict, steps: int, draws: int, seed: int) -> np.ndarray:
    """[draws, steps, 4]: the targets' means at state indices s + 1 .. s + steps of ``draws`` simulated futures."""
    rng = np.random.default_rng(seed)
    out = np.empty((draws, steps, 4))
    for d in range(draws):
        z, build, episode, delay = start["z"], start["build"], start["episode"], start["delay"]
        for j in range(steps):
            z = 0.9 * z + 0.07 * rng.standard_normal()
            build = 0.8 * build + (rng.uniform(0.15, 0.4) if rng.random() < 1 / 144 else 0.0)
            episode = 0.85 * episode + 0.2 * build
            state = _reference_step(link, s + j + 1, z, episode, delay)
            delay = state["delay"]
            out[d, j] = [state[t] for t in TARGETS]
    return out


def test_h_step_oracle_matches_an_independent_plain_python_monte_carlo():
    samples, burn = 600, 200
    _, oracle = synthetic.generate_with_oracle(samples=samples, links=1, seed=21, oracle_steps=6)
    link, states = _reference_link(samples, 21)
    # the reference's latent path is the generator's: its step-1 oracle is the module's exact one
    ref = np.array([[states[burn + 1 + r][t] for t in TARGETS] for r in range(samples - 1)])
    np.testing.assert_allclose(oracle[[f"oracle_{t}" for t in TARGETS]].to_numpy()[:-1], ref, rtol=1e-9)
    # a row where an episode is building up on a loaded link: the mean moves fast and the queue is non-linear
    rows = np.arange(samples - 6)
    r = int(rows[np.argmax([states[burn + 1 + k]["build"] - states[burn + 1 + k]["episode"] for k in rows])])
    s = burn + 1 + r
    assert states[s]["build"] > 0.15 and states[s + 5]["rho"] > 0.8, "the chosen row has an episode under way"
    draws = 6000
    paths = _reference_forecast(link, s, states[s], 5, draws, seed=99)  # step h = state index s + h - 1
    for h in (2, 6):
        mean, sd = paths[:, h - 2].mean(axis=0), paths[:, h - 2].std(axis=0)
        got = oracle.loc[r, [f"oracle_{t}_h{h}" for t in TARGETS]].to_numpy(np.float64)
        # 4 sd of the difference of two Monte Carlos; the module's 1000 draws (antithetic: at most) sd / sqrt(1000)
        tol = 4 * sd * np.sqrt(1 / draws + 1 / synthetic.ORACLE_DRAWS)
        assert np.all(np.abs(got - mean) <= tol), (h, got, mean, tol)
    # and a forecast that the state drives: rtt's mean moves over the steps far more than the tolerance
    assert abs(paths[:, 4, 1].mean() - states[s]["rtt_ms"]) > 5 * tol[1]
    assert np.isnan(oracle.loc[samples - 6 :, "oracle_rtt_ms_h6"]).all()  # row + 6 beyond the link's end
    assert np.isfinite(oracle.loc[: samples - 7, "oracle_rtt_ms_h6"]).all()


def test_h_step_oracle_beats_persistence_at_every_step_and_worsens_with_the_step():
    df, oracle = synthetic.generate_with_oracle(samples=6000, links=2, seed=11, oracle_steps=6)
    y = df[TARGETS].to_numpy()
    link = df["node_id"].astype(str).to_numpy()
    mse_oracle, mse_persist = [], []
    for h in range(1, 7):
        ok = np.flatnonzero(link[h:] == link[:-h])  # rows whose row + h is in the same link
        f = oracle[synthetic.oracle_columns(TARGETS, h)[-len(TARGETS) :]].to_numpy()[ok]  # step h's columns
        mse_oracle.append(((f - y[ok + h]) ** 2).mean(axis=0))
        mse_persist.append(((y[ok] - y[ok + h]) ** 2).mean(axis=0))
    mse_oracle, mse_persist = np.array(mse_oracle), np.array(mse_persist)  # [6, 4]
    assert (mse_oracle < mse_persist).all()
    assert (np.diff(mse_oracle, axis=0) > 0).all(), mse_oracle  # every step is harder than the one before


def test_oracle_steps_leave_the_data_bytes_alone_and_the_sidecar_is_deterministic(tmp_path):
    def written(name: str, frame: pd.DataFrame) -> str:
        synthetic.write_frame(frame, tmp_path / name)
        return hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()

    df1, o1 = synthetic.generate_with_oracle(samples=1200, links=2, seed=2)
    df12, o12 = synthetic.generate_with_oracle(samples=1200, links=2, seed=2, oracle_steps=12)
    _, again = synthetic.generate_with_oracle(samples=1200, links=2, seed=2, oracle_steps=12)
    assert written("a.csv", df1) == written("b.csv", df12)
    assert written("a.oracle.csv", o12) == written("b.oracle.csv", again)
    assert list(o12.columns[: o1.shape[1]]) == list(o1.columns)
    pd.testing.assert_frame_equal(o12[o1.columns], o1)  # step 1 as before
    assert list(o12.columns[o1.shape[1] :]) == synthetic.oracle_columns(TARGETS, 12)[len(TARGETS) :]


def test_seed_profile_h_step_oracle_is_the_next_rows_exact_mean():
    _, oracle = synthetic.generate_with_oracle(samples=500, profile="seed", oracle_steps=4)
    step1 = oracle["oracle_rtt_ms"].to_numpy()
    for k in (2, 4):  # the calendar is the only state: step k at row r is step 1 at row r + k - 1
        got = oracle[f"oracle_rtt_ms_h{k}"].to_numpy()
        np.testing.assert_array_equal(got[:-k], step1[k - 1 : -1])
        assert np.isnan(got[-k:]).all()


@pytest.mark.parametrize("steps", [0, -1])
def test_a_bad_oracle_steps_is_refused(steps, tmp_path, capsys):
    with pytest.raises(ValueError, match="--oracle-steps must be an integer >= 1"):
        synthetic.generate_with_oracle(samples=400, oracle_steps=steps)
    with pytest.raises(SystemExit) as exc:
        cli_main(["generate", "--output", str(tmp_path / "d.csv"), "--samples", "400", "--oracle-steps", str(steps)])
    assert exc.value.code == 2 and "--oracle-steps must be from 1 to 288" in capsys.readouterr().err


def test_generate_command_writes_the_h_step_oracle(tmp_path):
    out = tmp_path / "d.csv"
    cli_main(["generate", "--output", str(out), "--samples", "800", "--links", "2", "--oracle-steps", "3"])
    sidecar = pd.read_csv(synthetic.oracle_path(out))
    assert set(synthetic.oracle_columns(TARGETS, 3)) <= set(sidecar.columns) and "oracle_rtt_ms_h4" not in sidecar

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

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dwcp_lstm import synthetic
from dwcp_lstm.data import FEATURES, TARGETS, DwcpDataModule, LeakageError
from dwcp_lstm.tables import DataError


def make_dm(path, **kw) -> DwcpDataModule:
    dm = DwcpDataModule(data_path=str(path), **kw)
    dm.setup("fit")
    return dm


def two_link_csv(tmp_path, rows=200):
    """Two links whose every value lives in a disjoint range: link a near 1, link b near 1000."""
    rng = np.random.default_rng(0)
    frames = []
    for node, level in (("a", 1.0), ("b", 1000.0)):
        df = pd.DataFrame({c: level + rng.random(rows) * 0.5 for c in FEATURES})
        df["packet_loss"] = (0.001 if node == "a" else 0.9) + rng.random(rows) * 0.01
        df["time_of_day"], df["day_of_week"] = (1.0, 1.0) if node == "a" else (20.0, 5.0)  # within their units
        df["node_id"], df["peer_id"] = node, "z"
        df["timestamp"] = 1_700_000_000 + 60 * np.arange(rows)
        frames.append(df)
    path = tmp_path / "two.csv"
    pd.concat(frames).to_csv(path, index=False)
    return path


def test_no_window_or_batch_mixes_two_links(tmp_path):
    dm = make_dm(two_link_csv(tmp_path), batch_size=16)
    fs = dm.feature_scaler
    for stage in ("train", "val", "test"):
        for x, _ in dm.loader(stage):
            raw = x.numpy() * fs.scale_ + fs.mean_  # [B, W, F]
            low = raw[..., 0] < 500
            assert (low.all(axis=1) | (~low).all(axis=1)).all(), f"a {stage} window mixes links"


def test_batches_are_scaled_float32_of_the_right_shape(small_csv):
    dm = make_dm(small_csv, batch_size=64)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 20, 9) and y.shape == (64, 4)
    assert x.dtype == torch.float32 and y.dtype == torch.float32
    assert abs(float(dm.datasets["train"].x[dm.train_rows].mean())) < 0.05  # scaled on training rows


def test_each_window_targets_the_row_after_it(small_csv):
    dm = make_dm(small_csv)
    ds = dm.datasets["val"]
    x, y = ds[5]
    s = int(ds.starts[5])
    assert torch.equal(x, ds.x[s : s + 20]) and torch.equal(y, ds.y[s + 20])
    xb, yb = ds.__getitems__([5, 7])
    assert torch.equal(xb[0], x) and torch.equal(yb[0], y)


def test_split_order_holds_per_link(small_csv):
    dm = make_dm(small_csv)
    names = {s: dm.series_names(dm.target_rows(s)) for s in ("train", "val", "test")}
    times = {s: dm.timestamps[dm.target_rows(s)] for s in names}
    for link in np.unique(names["train"]):
        tr, va, te = (times[s][names[s] == link] for s in ("train", "val", "test"))
        assert tr.max() < va.min() and va.max() < te.min()
        n = 500
        assert len(tr) == int(0.7 * n) - 20 and len(va) == int(0.15 * n) and len(te) == n - int(0.7 * n) - int(0.15 * n)


@pytest.mark.parametrize("horizon", [1, 3])
def test_reading_past_a_window_stops_where_the_next_split_begins(small_csv, horizon):
    dm = DwcpDataModule(data_path=str(small_csv), batch_size=64, horizon=horizon)
    dm.setup("fit")
    for stage, after in (("train", "val"), ("val", "test"), ("test", None)):
        first, stop = dm.target_rows(stage), dm.split_stop(stage)
        seg = dm.segment_of_row[first]
        assert (stop > first).all() and len(stop) == len(first)
        for s in np.unique(seg):
            here = stop[seg == s]
            if after is None:  # the last split runs to its segment's end
                assert (here == dm.bounds[s, 1]).all()
            else:  # one past the split's last target row: the next split's first target row
                nxt = dm.target_rows(after)[dm.segment_of_row[dm.target_rows(after)] == s]
                assert (here == (first[seg == s] + horizon).max()).all() and (here == nxt.min()).all()


def test_scalers_see_exactly_the_training_rows(small_csv):
    df = pd.read_csv(small_csv).sort_values(["node_id", "peer_id", "timestamp"])
    train = df.groupby(["node_id", "peer_id"]).head(int(0.7 * 500))  # first 70 % of each link
    level = make_dm(small_csv, target_mode="level")
    np.testing.assert_allclose(level.feature_scaler.mean_, train[FEATURES].mean().to_numpy(), rtol=1e-5)
    np.testing.assert_allclose(level.target_scaler.scale_, train[TARGETS].std(ddof=0).to_numpy(), rtol=1e-5)
    assert level.feature_scaler.n_samples_seen_ == len(train)
    # delta mode: the target scaler sees the one-step changes inside the training rows of each link
    delta = make_dm(small_csv)
    changes = train.groupby(["node_id", "peer_id"])[TARGETS].diff().dropna()
    np.testing.assert_allclose(delta.target_scaler.mean_, changes.mean().to_numpy(), rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(delta.target_scaler.scale_, changes.std(ddof=0).to_numpy(), rtol=1e-5)
    assert delta.target_scaler.n_samples_seen_ == len(changes)


@pytest.mark.parametrize("mode", ["delta", "level"])
def test_module_unscale_recovers_raw_targets(small_csv, mode):
    from dwcp_lstm.module import DwcpForecaster

    dm = make_dm(small_csv, target_mode=mode)
    module = DwcpForecaster(target_mode=mode)
    module.set_scalers(dm.scalers)
    x, y = next(iter(dm.val_dataloader()))
    rows = dm.target_rows("val")[: len(y)]
    np.testing.assert_allclose(module.unscale(y, x)[:, 0].numpy(), dm.raw_targets[rows], rtol=1e-5)  # step 1


def test_windows_are_index_arithmetic_not_copies(small_csv):
    dm = make_dm(small_csv)
    storages = {dm.datasets[s].x.untyped_storage().data_ptr() for s in ("train", "val", "test")}
    assert len(storages) == 1  # one contiguous array shared by every split
    x = dm.datasets["train"].x
    assert x.shape == (2000, 9) and x.untyped_storage().nbytes() == 2000 * 9 * 4  # O(rows), not O(rows x window)


def test_training_shuffle_is_seeded_per_epoch_and_eval_is_ordered(small_csv):
    dm = make_dm(small_csv, seed=3)
    loader = dm.train_dataloader()
    first = list(loader.sampler)
    loader.sampler.set_epoch(1)
    second = list(loader.sampler)
    loader.sampler.set_epoch(0)
    assert list(loader.sampler) == first and first != second and sorted(first) == list(range(len(first)))
    assert list(dm.val_dataloader().batch_sampler.sampler) == list(range(len(dm.datasets["val"])))


def test_audit_catches_a_window_that_crosses_links(small_csv):
    dm = make_dm(small_csv)
    dm.starts["test"] = np.r_[dm.starts["test"], dm.bounds[1, 0] - 5]  # starts 5 rows before link 2
    with pytest.raises(LeakageError, match="spans two series"):
        dm.audit()


def test_audit_catches_a_scaler_fitted_on_all_rows(small_csv):
    dm = make_dm(small_csv)
    dm.feature_scaler.fit(dm.raw_features)
    with pytest.raises(LeakageError, match="scaler"):
        dm.audit()


def test_audit_catches_a_validation_target_inside_training(small_csv):
    dm = make_dm(small_csv)
    dm.starts["val"] = np.r_[dm.starts["train"][-1], dm.starts["val"]]
    with pytest.raises(LeakageError, match="later"):
        dm.audit()


def test_a_link_cut_by_gaps_is_split_in_time_across_its_segments(tmp_path):
    """Found by fuzzing: each gap-separated segment was split 70/15/15 on its own, so the test rows of a link's first
    segment came before the training rows of its second (Starlink: 17,728 of 21,768 test windows). Now the link's
    rows are cut in time order across its segments; windows still stay within one segment."""
    df = synthetic.generate(samples=1200, links=2, seed=5)  # 2 links x 600 rows at 300 s
    links = df["node_id"].astype(str)
    first = links == links.unique()[0]
    k = df.groupby(links).cumcount()
    for cut in (200, 400):  # the first link in three segments of 200 rows, a day apart
        df.loc[first & (k >= cut), "timestamp"] += 86_400
    path = tmp_path / "gaps.csv"
    df.to_csv(path, index=False)
    dm = make_dm(path)
    assert len(dm.bounds) == 4
    a0 = dm.bounds[0, 0]
    rows = {s: dm.target_rows(s) for s in ("train", "val", "test")}
    one = {s: r[dm.link_of_segment[dm.segment_of_row[r]] == dm.link_of_segment[0]] for s, r in rows.items()}
    # 600 rows: training targets in rows 20..199 and 220..399 (a segment's first 20 rows have no full window; the
    # third segment's rows 400..419 are training rows but none is a target), val 420..509, test 510..599
    assert one["train"].max() == a0 + 399 and one["val"].min() == a0 + 420 and one["val"].max() == a0 + 509
    assert one["test"].min() == a0 + 510 and one["test"].max() == a0 + 599
    assert len(one["train"]) == 2 * (200 - 20)
    t = dm.timestamps
    assert t[one["train"]].max() < t[one["val"]].min() and t[one["val"]].max() < t[one["test"]].min()
    assert dm.train_ranges.tolist()[:3] == [[a0, a0 + 200], [a0 + 200, a0 + 400], [a0 + 400, a0 + 420]]
    assert (dm.train_ranges[:, 1] > dm.train_ranges[:, 0]).all()  # none empty: the export's input ranges failed on one
    seg = dm.segment_of_row
    for s in ("train", "val", "test"):  # no window crosses a gap
        assert (seg[dm.starts[s]] == seg[dm.starts[s] + dm.window_size]).all()
    dm.audit()
    # the old per-segment split: the first segment's test targets precede the third one's training targets
    dm.starts["test"] = np.r_[dm.starts["test"], a0 + 190 - dm.window_size]
    with pytest.raises(LeakageError, match="test target is not later"):
        dm.audit()


def test_a_segment_wholly_after_the_training_cut_has_no_training_range(tmp_path):
    """The export read each training range's smallest value and failed after training on an empty one (every real
    trace has segments that lie wholly in validation or test)."""
    df = synthetic.generate(samples=1200, links=2, seed=5)
    links = df["node_id"].astype(str)
    df.loc[(links == links.unique()[0]) & (df.groupby(links).cumcount() >= 450), "timestamp"] += 86_400
    path = tmp_path / "late.csv"
    df.to_csv(path, index=False)
    dm = make_dm(path)
    assert len(dm.bounds) == 3 and len(dm.train_ranges) == 2  # the late segment (rows 450..599) has none
    assert (dm.train_ranges[:, 1] > dm.train_ranges[:, 0]).all()
    np.testing.assert_array_equal(dm.feature_ranges()[:, 0], dm.raw_features[dm.train_rows].min(axis=0))


def test_reads_parquet_like_csv(small_csv, tmp_path):
    pq = tmp_path / "small.parquet"
    synthetic.write_frame(pd.read_csv(small_csv), pq)
    a, b = make_dm(small_csv), make_dm(pq)
    assert torch.equal(a.datasets["train"].x, b.datasets["train"].x)

    # a frame indexed by its time (or by link and time) before writing: pandas restores the columns as the index
    for index in (["timestamp"], ["node_id", "timestamp"]):
        pd.read_csv(small_csv, dtype={"node_id": str, "peer_id": str}).set_index(index).to_parquet(pq)
        assert torch.equal(a.datasets["train"].x, make_dm(pq).datasets["train"].x), index
    # link ids stored as bytes (a binary column): the same links, named as text
    df = pd.read_csv(small_csv, dtype={"node_id": str, "peer_id": str})
    df.assign(node_id=df.node_id.str.encode("utf-8")).to_parquet(pq)
    b = make_dm(pq)
    assert torch.equal(a.datasets["train"].x, b.datasets["train"].x)
    assert set(b.frame_keys["node_id"]) == set(df.node_id)


def test_builtin_dataset_is_generated_when_missing(tmp_path):
    dm = DwcpDataModule(data_dir=str(tmp_path), synthetic=synthetic_spec(samples=1500, links=3))
    dm.prepare_data()
    assert dm.path.exists() and synthetic.oracle_path(dm.path).exists()
    dm.setup("fit")
    assert len(dm.bounds) == 3


def test_builtin_dataset_with_zero_links_is_refused_not_read_from_the_default_file(tmp_path):
    """Found by fuzzing: ``--data.synthetic.links 0`` (refused by ``generate --links 0``) named the default's file
    (``if s.links``), so a cached default dataset was read silently while config.yaml recorded ``links: 0``."""
    from dwcp_lstm.errors import ConfigError

    DwcpDataModule(data_dir=str(tmp_path), synthetic=synthetic_spec(samples=1500)).prepare_data()  # the default
    dm = DwcpDataModule(data_dir=str(tmp_path), synthetic=synthetic_spec(samples=1500, links=0))
    with pytest.raises(ConfigError, match=r"--data.synthetic.links must be an integer >= 1 .* got 0"):
        dm.prepare_data()
    assert "_l0_" in dm.path.name


def test_a_huge_worker_count_is_refused(tmp_path):
    """Found by fuzzing: ``--data.num_workers 100000`` forked DataLoader workers (each a copy of the process) until
    the machine ran out of memory, leaving orphaned workers behind. Bounded like ``--threads``."""
    from dwcp_lstm.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--data.num_workers must be from 0 to 1024 \(worker processes\), got "):
        DwcpDataModule(data_dir=str(tmp_path), num_workers=100_000)
    with pytest.raises(ConfigError, match=r"--data.num_workers must be from 0 to 1024"):
        DwcpDataModule(data_dir=str(tmp_path), num_workers=-1)


def synthetic_spec(**kw):
    from dwcp_lstm.data import SyntheticSpec

    return SyntheticSpec(**kw)


def test_fill_missing_carries_values_forward_only(caplog):
    from dwcp_lstm.tables import DataError, fill_missing

    nan = np.nan
    df = pd.DataFrame({
        "link": ["a"] * 5 + ["b"] * 3 + ["c"] * 2,
        "x": [nan, nan, 3.0, nan, 5.0, 1.0, 2.0, 3.0, 7.0, nan],
        "y": [1.0, 2.0, nan, 4.0, 5.0, nan, nan, nan, 8.0, 9.0],
    })  # fmt: skip
    out = fill_missing(df.copy(), ["x", "y"], ["link"], "t.csv")
    # a: its first two rows precede x's first value and are dropped (a back-fill put row 2's 3.0 into rows 0-1);
    # b: y is empty throughout, skipped; c: its last x is the previous row's
    assert out["link"].tolist() == ["a", "a", "a", "c", "c"]
    assert out["x"].tolist() == [3.0, 3.0, 5.0, 7.0, 7.0] and out["y"].tolist() == [2.0, 4.0, 5.0, 8.0, 9.0]
    assert "dropped 2 rows at the start of their series" in caplog.text and "skipped 1 series" in caplog.text
    # the cells filled: a's x in row 3 and y in row 2, c's x; the 5 still empty are dropped, not filled (an audit
    # found "filled 1 empty cells" for a link whose only empty cell was in its first row, which was dropped)
    assert "filled 3 empty cells" in caplog.text
    caplog.clear()
    assert fill_missing(pd.DataFrame({"x": [nan, 1.0], "y": [1.0, 2.0]}), ["x", "y"], [], "t.csv").shape == (1, 2)
    assert "dropped 1 rows" in caplog.text and "filled" not in caplog.text
    one = pd.DataFrame({"x": [nan, 1.0, nan], "y": [1.0, 2.0, 3.0]})  # no series columns: one series
    assert fill_missing(one, ["x", "y"], [], "t.csv")["x"].tolist() == [1.0, 1.0]
    with pytest.raises(DataError, match="'y' is empty throughout every series"):
        fill_missing(df[df.link == "b"].copy(), ["x", "y"], ["link"], "t.csv")


def test_fit_warns_of_what_forecasting_or_calibration_will_not_survive(tmp_path, caplog):
    """Found by fuzzing, each trained silently: a link at another cadence (forecast then refused the model's own
    training file), a target constant on the validation split (intervals about zero wide: test coverage 0.7 %)."""
    df = synthetic.generate(samples=900, links=3, seed=4)  # 3 links x 300 rows at 300 s
    links = df["node_id"].astype(str)
    third = links == links.unique()[2]
    t0 = df.loc[third, "timestamp"].min()
    df.loc[third, "timestamp"] = t0 + (df.loc[third, "timestamp"] - t0) // 300 * 5  # a row every 5 s
    val = df.groupby(links).cumcount().between(100, 285)  # every validation target of every segment
    df.loc[val, "packet_loss"] = 0.02
    path = tmp_path / "d.csv"
    df.to_csv(path, index=False)
    DwcpDataModule(data_path=str(path), batch_size=32).setup("fit")
    assert "1 of 3 series segments (the first: node-2->node-0, a row every 5 s) are not at the data's cadence" in (
        caplog.text
    )
    assert "column 'packet_loss' is constant on the validation split" in caplog.text


# Generated gap layouts: whatever gaps cut a link, its split is one chronological 70/15/15 cut of its rows, windows
# stay inside a segment, and every window the cut allows is used.

BASE = synthetic.generate(samples=3 * 160, links=3, seed=6)  # 3 links x 160 rows at 300 s


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.lists(st.integers(1, 159), max_size=4, unique=True), min_size=3, max_size=3),
       horizon=st.integers(1, 3))  # fmt: skip
def test_any_gap_layout_splits_each_link_by_time(tmp_path, cuts, horizon):
    df = BASE.copy()
    links = df["node_id"].astype(str).to_numpy()
    k = df.groupby(links).cumcount().to_numpy()
    for link, at in zip(pd.unique(links), cuts, strict=True):
        for c in at:  # a day's gap before row c of the link
            df.loc[(links == link) & (k >= c), "timestamp"] += 86_400
    path = tmp_path / "g.csv"
    df.to_csv(path, index=False)
    try:
        dm = make_dm(path, window_size=5, horizon=horizon, batch_size=8)
    except DataError as exc:  # every segment too short, or no training window at all: refused, not mis-split
        assert "no training windows" in str(exc) or "has at least" in str(exc)
        return
    w, seg, link = dm.window_size, dm.segment_of_row, dm.link_of_segment[dm.segment_of_row]
    split_of = np.full(len(seg), -1)
    for code in np.unique(link):
        rows = np.flatnonzero(link == code)  # contiguous, in time order
        n = len(rows)
        n_train, n_val = int(n * 0.7), int(n * 0.15)
        split_of[rows[:n_train]], split_of[rows[n_train : n_train + n_val]], split_of[rows[n_train + n_val :]] = 0, 1, 2
    expected = {s: [] for s in ("train", "val", "test")}
    for t in range(w, len(seg) - horizon + 1):  # every target row whose window and steps fit in one segment and split
        steps = np.arange(t, t + horizon)
        if seg[t - w] == seg[steps[-1]] and (split_of[steps] == split_of[t]).all():
            expected[("train", "val", "test")[split_of[t]]].append(t)
    for s in expected:
        np.testing.assert_array_equal(np.sort(dm.target_rows(s)), expected[s], err_msg=s)
    train = np.zeros(len(seg), dtype=bool)
    for a, b in dm.train_ranges:
        train[a:b] = True
    np.testing.assert_array_equal(train, split_of == 0)  # the scalers' rows: exactly the training split
    dm.audit()

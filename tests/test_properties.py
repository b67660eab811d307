"""Property-based: randomly corrupted telemetry fed to the table reader and to fit's data checks (the DataModule's
setup and the pre-flight split check). The contract: either a usable dataset in which no window mixes two links
and every value is finite, or a :class:`DataError` with a one-line message; never any other exception."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dwcp_lstm import synthetic
from dwcp_lstm.data import DwcpDataModule
from dwcp_lstm.preflight import check_splits
from dwcp_lstm.tables import DataError, read_table

BASE = synthetic.generate(samples=240, links=2, seed=5)  # 2 links x 120 rows
COLUMNS = list(BASE.columns)
BAD_VALUES = [np.nan, np.inf, -np.inf, "", " ", "fast", 1e39, -1e39, -1.0, 1e300, 2.0, 0.0, True, "1e5", "nan"]

SETTINGS = settings(
    max_examples=100,  # x 2 formats
    deadline=None,
    derandomize=True,  # the same cases on every run: a failure is reproducible
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# One corruption: (kind, column index, row index, value index / amount).
corruption = st.tuples(
    st.sampled_from(
        ["cell", "blank_id", "drop_col", "dup_col", "rename_col", "shuffle", "dup_rows", "drop_rows", "const", "time"]
    ),
    st.integers(0, len(COLUMNS) - 1),
    st.integers(0, len(BASE) - 1),
    st.integers(0, len(BAD_VALUES) - 1),
)


def corrupt(df: pd.DataFrame, ops) -> pd.DataFrame:
    """Apply each corruption; columns are addressed by position (names may repeat after ``dup_col``)."""
    df = df.copy()
    for kind, c, r, v in ops:
        n_cols = df.shape[1]
        c = c % max(n_cols, 1)
        r = r % max(len(df), 1)
        if kind == "cell" and n_cols and len(df):
            values = df.iloc[:, c].astype(object).to_numpy().copy()
            values[r] = BAD_VALUES[v]
            df.isetitem(c, values)
        elif kind == "blank_id" and len(df):
            who = "node_id" if v % 2 else "peer_id"
            if list(df.columns).count(who) == 1:
                values = df[who].astype(object).to_numpy().copy()
                values[r] = np.nan if v % 3 else "  "
                df[who] = values
        elif kind == "drop_col" and n_cols:
            df = df.iloc[:, [i for i in range(n_cols) if i != c]]
        elif kind == "dup_col" and n_cols:
            df = pd.concat([df, df.iloc[:, [c]]], axis=1)
        elif kind == "rename_col" and n_cols:
            df.columns = [f"{name}_x" if i == c else name for i, name in enumerate(df.columns)]
        elif kind == "shuffle":
            df = df.sample(frac=1.0, random_state=v)
        elif kind == "dup_rows" and len(df):
            df = pd.concat([df, df.iloc[[r]]])
        elif kind == "drop_rows":
            df = df.iloc[: r + 1] if v % 2 else df.iloc[r:]
        elif kind == "const" and n_cols and len(df):
            df.isetitem(c, [df.iloc[0, c]] * len(df))
        elif kind == "time" and list(df.columns).count("timestamp") == 1 and len(df):
            values = df["timestamp"].to_numpy().copy()
            values[r] = values[(r + v) % len(df)]
            df["timestamp"] = values
    return df


def to_bytes(df: pd.DataFrame, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "csv":
        df.to_csv(buf, index=False)
        return buf.getvalue()
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = []
    for i in range(df.shape[1]):  # pyarrow directly: pandas refuses repeated names, Parquet does not
        col = df.iloc[:, i]
        try:
            arrays.append(pa.array(col, from_pandas=True))
        except (pa.ArrowException, TypeError, ValueError):  # mixed types in one column: stored as text
            arrays.append(pa.array(col.astype(str)))
    pq.write_table(pa.Table.from_arrays(arrays, names=[str(c) for c in df.columns]), buf)
    return buf.getvalue()


def assert_contract(action) -> object | None:
    """Run ``action``: a DataError must be one line; any other exception fails the test."""
    try:
        result = action()
    except DataError as exc:
        msg = str(exc)
        assert msg and "\n" not in msg, f"multi-line message: {msg!r}"
        event("refused: " + msg.split(": ", 1)[-1][:30])  # --hypothesis-show-statistics shows the mix
        return None
    event("accepted")
    return result


def assert_windows_sound(dm: DwcpDataModule) -> None:
    keys = dm.frame_keys[dm.series_columns].astype(str).agg("|".join, axis=1).to_numpy()
    w = dm.window_size
    for stage in ("train", "val", "test"):
        s = dm.starts[stage]
        rows = s[:, None] + np.arange(w + 1)  # the window and its target row
        assert (keys[rows] == keys[rows[:, :1]]).all(), f"a {stage} window mixes links"
        assert (np.diff(dm.timestamps[rows], axis=1) > 0).all(), f"a {stage} window is not in time order"
    assert np.isfinite(dm.raw_features).all() and np.isfinite(dm.raw_targets).all()


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
@SETTINGS
@given(ops=st.lists(corruption, min_size=1, max_size=4), tail=st.integers(0, 4000))
def test_fit_data_checks_on_corrupted_tables(tmp_path, fmt, ops, tail):
    data = to_bytes(corrupt(BASE, ops), fmt)
    if tail % 5 == 0:  # now and then a truncated file as well
        data = data[: tail % max(len(data), 1)]
    path = tmp_path / f"t.{fmt}"
    path.write_bytes(data)
    assert_contract(lambda: read_table(path))

    def setup():
        dm = DwcpDataModule(data_path=str(path), window_size=5, batch_size=8)
        dm.setup("fit")
        check_splits(dm)
        return dm

    dm = assert_contract(setup)
    if dm is not None:
        assert_windows_sound(dm)


@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(raw=st.binary(min_size=0, max_size=300), suffix=st.sampled_from([".csv", ".parquet"]))
def test_table_reader_on_random_bytes(tmp_path, raw, suffix):
    path = tmp_path / f"r{suffix}"
    path.write_bytes(raw)
    assert_contract(lambda: read_table(path, ["timestamp", "rtt_ms"]))

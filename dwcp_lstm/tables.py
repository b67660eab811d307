"""Reading and checking telemetry tables (pandas only: the torch-free predictor uses this too).

Every problem with a user's file becomes a :class:`DataError` whose message is one line naming the file, the column
or row, and what is wrong. Rows are counted from 1 in the order of the file (the header line is not a row).

Policies for messy data, all documented in the README:

* unsorted rows are sorted by series then time, with a warning;
* duplicated (series, time) rows are an error by default; ``duplicates="first"`` keeps the first, ``"mean"``
  averages the numeric columns (real traces often repeat a timestamp);
* a gap larger than ``max_gap`` times a series' median cadence splits it into segments: windows and splits never
  span a gap;
* a segment shorter than ``min_rows`` (window + 1) is skipped with a warning; none left is an error.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import mmap
import os
import re
import secrets
import unicodedata
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
from pandas._libs.parsers import STR_NA_VALUES  # pandas' own list of missing-value words

from dwcp_lstm.errors import ConfigError, DataError, not_a_regular_file  # noqa: F401 (DataError re-exported)

log = logging.getLogger("dwcp_lstm")
DUPLICATE_POLICIES = ("error", "first", "mean")
PARQUET_SUFFIXES = (".parquet", ".pq")  # read and written as Parquet; any other suffix but .csv is refused
# Physical ranges (low, high; both inclusive) checked wherever the column is read, in training and serving alike:
# the units the model's contract states for these names (callbacks.UNITS). Outside them a value is a unit mix-up
# (milliseconds for hours, percent for a fraction) that would otherwise turn silently into a confident forecast.
RANGES = {
    "throughput_mbps": (0.0, np.inf),
    "rtt_ms": (0.0, np.inf),
    "jitter_ms": (0.0, np.inf),
    "packet_loss": (0.0, 1.0),
    "time_of_day": (0.0, 24.0),
    "day_of_week": (0.0, 6.0),
    "congestion_window": (0.0, np.inf),
    "queue_depth": (0.0, np.inf),
    "retransmits": (0.0, np.inf),
    "loss_rate": (0.0, 1.0),
    "obstructed": (0.0, 1.0),
    "fraction_obstructed": (0.0, 1.0),
    "dl_mbps": (0.0, np.inf),
    "ul_mbps": (0.0, np.inf),
    "speed_kmh": (0.0, np.inf),
}


def target_ranges(names: Sequence[str]) -> np.ndarray:
    """[2, T]: the (low, high) of each target, its physical range from :data:`RANGES` (else unbounded). Forecasts
    and interval bounds are clipped into it, in the graph and in the report alike: a rate the data can never take
    (a throughput of -0.5 Mbit/s beside a link that idles at 0) is always a worse forecast than the range's edge."""
    return np.array([RANGES.get(n, (-np.inf, np.inf)) for n in names], dtype=np.float64).reshape(-1, 2).T


def outside_range(values: np.ndarray, names: Sequence[str]) -> tuple[tuple[int, ...], str] | None:
    """The first value of ``values`` [..., F] outside its column's physical range (``names``: the F columns), as
    (its index, ``"negative value -3"`` / ``"above 1 value 1.5"``); None when every value is inside. One rule for
    tables (:func:`check_numeric`) and raw windows (``serve.Predictor``). NaN is never out of range."""
    ranges = target_ranges(names)
    out = (values < ranges[0]) | (values > ranges[1])
    if not out.any():
        return None
    idx = tuple(int(i) for i in np.argwhere(out)[0])
    v, (low, high) = values[idx], ranges[:, idx[-1]]
    what = f"above {high:g}" if v > high else ("negative" if low == 0 else f"below {low:g}")
    return idx, f"{what} value {v:g}"


def clip_to(values: np.ndarray, ranges: np.ndarray | None) -> np.ndarray:
    """``values`` [..., T] clipped into ``ranges`` [2, T] (None: unchanged)."""
    return values if ranges is None else np.clip(values, ranges[0], ranges[1])


FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_clock(
    clock: dict[str, float] | None, series_start: str | None, features: Sequence[str], targets: Sequence[str],
    series: Sequence[str], where: str = "--data.",
) -> dict[str, float]:  # fmt: skip
    """``{column: period}`` of the wall-clock inputs (see :func:`add_clock`), refusing what cannot work."""
    if series_start is not None and (not isinstance(series_start, str) or "%" not in series_start):
        raise ConfigError(f"{where}series_start must be a strptime format such as '%Y-%m-%d-%H-%M-%S', got "
                          f"{series_start!r}")  # fmt: skip
    if series_start is not None and len(series) != 1:
        raise ConfigError(f"{where}series_start reads the start time from one series column, but there are "
                          f"{len(series)}: {list(series)}")  # fmt: skip
    if not clock:
        return {}
    if not isinstance(clock, dict):
        raise ConfigError(f"{where}clock must map new column names to periods in seconds, got {clock!r}")
    for name, period in clock.items():
        if name not in features:
            raise ConfigError(f"{where}clock: {name!r} is not among the features {list(features)}")
        if name in targets or name in series:
            raise ConfigError(f"{where}clock: {name!r} is a target or a series column; a clock column is an input")
        if isinstance(period, bool) or not isinstance(period, int | float) or not (0 < period < np.inf):
            raise ConfigError(f"{where}clock: the period of {name!r} must be a number of seconds > 0, got {period!r}")
    return {str(k): float(v) for k, v in clock.items()}


CLOCK_EPOCH_MIN = 946_684_800.0  # 2000-01-01 in Unix seconds: a wall-clock time column below it counts from a start


def add_clock(
    df: pd.DataFrame, clock: dict[str, float], series_start: str | None, series: Sequence[str], time: str,
    path: str | Path,
) -> pd.DataFrame:  # fmt: skip
    """Add the wall-clock inputs: column ``name`` = the row's wall-clock time in seconds modulo ``clock[name]``.
    The wall-clock time is the time column, or with ``series_start`` (a strptime format) the start time parsed
    from the row's series id plus the time column in seconds. Training and every forecasting path call this same
    function, so a model reads the same values wherever it runs. Periodic network events keyed to the clock (a
    Starlink dish is given a new satellite every 15 s at fixed seconds of the minute) then become visible even when
    the time column counts from each capture's start. The time column must be numeric seconds."""
    if not clock:
        return df
    if series_start is not None and pd.api.types.is_datetime64_any_dtype(df[time]):
        raise DataError(f"{path}: column {time!r} holds dates and times; with --data.series_start the time column "
                        "counts seconds from each series' start (parsed from its id), as in training")  # fmt: skip
    if series_start is None and pd.api.types.is_timedelta64_dtype(df[time]):  # was read as the clock, silently
        raise DataError(f"{path}: column {time!r} holds durations; the wall-clock inputs (--data.clock) need absolute "
                        "times (Unix seconds or dates), or --data.series_start to read each series' start")  # fmt: skip
    check_numeric(df, [time], path, is_time=True)
    t = df[time].to_numpy(np.float64)
    if series_start is None and len(t) and np.nanmax(t) < CLOCK_EPOCH_MIN:  # seconds since each capture began
        raise DataError(f"{path}: column {time!r} reaches only {np.nanmax(t):g} s (before 2000 as a Unix time): it "
                        "counts from each series' start, so the wall-clock inputs (--data.clock) need "
                        "--data.series_start to read that start from the series id")  # fmt: skip
    if series_start is not None:
        if len(series) != 1:  # a config is refused earlier (check_clock); this catches forecast's --series-columns
            raise ConfigError(f"{path}: each series' start time is read from one series column, got {list(series)}")
        ids = df[series[0]].astype(str)
        names = pd.unique(ids)
        # utc: a start with an offset (%z) is that instant; one without is read as UTC, as before (a naive minus an
        # aware time raised a TypeError traceback)
        starts = pd.to_datetime(pd.Series(names), format=series_start, errors="coerce", utc=True)
        if starts.isna().any():
            bad = names[int(np.flatnonzero(starts.isna().to_numpy())[0])]
            raise DataError(f"{path}: series id {short_repr(bad)} in column {series[0]!r} is not a start time in the "
                            f"format {series_start!r} (--data.series_start)")  # fmt: skip
        # Seconds since 1970 through microseconds: a nanosecond Timestamp (pd.Timestamp(0)) cannot hold a start
        # outside 1677-2262, which strptime parses (a traceback found by a hostile-input hunt: '9999-12-31-...')
        micros = starts.dt.tz_localize(None).to_numpy().astype("datetime64[us]").astype(np.int64)
        seconds = pd.Series(micros / 1e6, index=names)
        start = seconds.reindex(ids.to_numpy()).to_numpy()
        # Seconds since a series' start as large as the start's own seconds since 1970 are an absolute time: added to
        # the start, the clock inputs were those of another second (found by fuzzing: a 15 s beat off by 12 s)
        absolute = (t >= start) & (start > 0)
        if absolute.any():
            i = int(np.flatnonzero(absolute)[0])
            raise DataError(f"{path}: column {time!r} row {i + 1}: {t[i]:g} looks like an absolute time (seconds "
                            f"since 1970); with --data.series_start it counts seconds from the start of series "
                            f"{short_repr(ids.iloc[i])}")  # fmt: skip
        t = t + start
    df = df.copy()
    for name, period in clock.items():
        df[name] = np.mod(t, period)
    return df


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_table(
    path: str | Path, columns: Sequence[str] | None = None, text_columns: Sequence[str] = (),
    derived: Sequence[str] = (),
) -> pd.DataFrame:  # fmt: skip
    """Read a CSV or Parquet file, only ``columns`` if given (all must exist).

    ``text_columns`` (link ids) are read from a CSV as text: parsed as numbers, ids ``01`` and ``1`` would become
    the same link and their rows one series. ``derived`` names columns the caller computes (wall-clock inputs,
    :func:`add_clock`): a file column of the same name is refused, not silently replaced.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a .csv or .parquet file")
    problem = not_a_regular_file(path)
    if problem:
        raise DataError(f"{path}: {problem}")
    suffix = path.suffix.lower()
    if suffix not in (".csv", *PARQUET_SUFFIXES):
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'!r}, expected .csv or .parquet")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    try:
        if suffix == ".csv":
            header = pd.read_csv(path, nrows=0).columns
            _no_bare_cr(path)
            _unique_header(path, _raw_csv_header(path))
            _require(path, header, columns, derived)
            text = {c: str for c in text_columns if c in header}
            df = _read_csv_strict(path, list(header), text)
            if columns:
                df = df[list(columns)]
        else:
            pa, pq = _pyarrow(path)

            names = pq.read_schema(path).names
            _unique_header(path, names)
            _require(path, names, columns, derived)
            # The system allocator hands freed buffers back to the OS (Arrow's default pool keeps them), and
            # self_destruct frees each Arrow column as soon as pandas has it: ~1 GB less peak memory at 10M rows.
            pa.set_memory_pool(pa.system_memory_pool())
            table = pq.read_table(path, columns=list(columns) if columns else None)
            try:
                df = table.to_pandas(split_blocks=True, self_destruct=True)
            except (KeyError, TypeError, NotImplementedError, pa.ArrowException) as exc:  # found by fuzzing
                # pandas metadata that lies about the columns (an index column that is missing, a dtype that does
                # not exist or cannot hold them): a KeyError, TypeError or Arrow cast traceback
                what = f"{type(exc).__name__} {first_line(exc)[:200]}"
                raise DataError(f"{path}: not a readable parquet file (pandas cannot rebuild its columns, e.g. from "
                                f"stale pandas metadata: {what})") from None  # fmt: skip
            del table
            if any(n is not None for n in df.index.names):  # written from a frame indexed by the time (or link)
                df = df.reset_index()  # column: pandas restores it as the index, and the column was "missing"
            for c in text_columns:  # binary ids (Parquet bytes without a string type): text, not "b'node-0'"
                first = df[c].dropna().iloc[:1] if c in df and df[c].dtype == object else ()
                if len(first) and isinstance(first.iloc[0], bytes):
                    df[c] = df[c].map(lambda v: v.decode("utf-8") if isinstance(v, bytes) else v)
    except DataError:
        raise
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable {suffix[1:]} file ({first_line(exc)})") from None
    if df.empty:
        raise DataError(f"{path}: file has a header but no rows")
    return df


def _pyarrow(path: Path):
    """pyarrow and pyarrow.parquet; a serving install without the ``parquet`` extra gets one line instead."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: Parquet needs pyarrow: pip install 'dwcp_lstm[parquet]' (or use CSV)") from None
    return pa, pq


def _read_csv_strict(path: Path, header: list[str], text: dict) -> pd.DataFrame:
    """Every column (``header``: the file's, as read by the caller), refusing a row with more fields than it.

    pandas would hide it: ``usecols`` drops the extra fields, and an extra field on the first row makes the first
    column the index, shifting every value one column left. ``index_col=False`` turns the first case into a
    ParserWarning and any later row into a ParserError; a row with fewer fields reads as empty cells (checked as
    such).
    """
    # pandas' missing-value words (NA, None, null, n/a...) are missing numbers, but a link may be named NA: in the id
    # columns only an empty cell is missing
    na = {c: [""] if c in text else sorted(STR_NA_VALUES) for c in header}
    with warnings.catch_warnings():
        warnings.simplefilter("error", pd.errors.ParserWarning)
        try:
            return pd.read_csv(path, index_col=False, dtype=text or None, keep_default_na=False, na_values=na)
        except pd.errors.ParserWarning:
            raise DataError(f"{path}: row 1 has more fields than the header's {len(header)}") from None
        except pd.errors.ParserError as exc:
            found = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(exc))
            if found is None:
                raise
            expected, line, saw = found.groups()
            raise DataError(f"{path}: line {line} has {saw} fields, the header {expected}") from None


def _no_bare_cr(path: Path) -> None:
    """Refuse a carriage return alone (not before a newline) on an unquoted line of a file whose lines end in
    newlines: pandas ends the row there, so an id "node-0\\r" split one row into two half-empty ones and the error
    blamed an empty cell of another column. A file whose lines all end in a bare CR (classic Mac) is read as before;
    a CR inside quotes is data."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:  # no copy of a large file
        if mm.find(b"\n") < 0:
            return
        for hit in re.finditer(rb"\r(?=[^\n])", mm):  # a CR that ends the file ends its last line
            start, end = mm.rfind(b"\n", 0, hit.start()) + 1, mm.find(b"\n", hit.start())
            if b'"' not in mm[start : end if end >= 0 else len(mm)]:
                line = mm[: hit.start()].count(b"\n") + 1
                raise DataError(f"{path}: line {line} holds a carriage return (CR) inside a field, which splits the "
                                "row in two: remove it, or quote the field")  # fmt: skip


def _raw_csv_header(path: Path) -> list[str]:
    """The header as written: pandas renames a repeated name to ``name.1``, which would hide the repeat; read as a
    data row instead, it keeps every name as it is."""
    row = pd.read_csv(path, header=None, nrows=1, dtype=str, keep_default_na=False)
    return [str(v) for v in row.iloc[0].tolist()]


def _unique_header(path: Path, names: Sequence[str]) -> None:
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise DataError(f"{path}: column {short_repr(name)} appears twice (columns {seen[name] + 1} and {i + 1})")
        seen[name] = i


def _require(path: Path, present: Sequence[str], columns: Sequence[str] | None, derived: Sequence[str]) -> None:
    clash = [c for c in derived if c in set(present)]
    if clash:
        raise DataError(f"{path}: column {short_repr(clash[0])} is computed from the wall clock (data.clock); the file "
                        "has a column of that name too: rename it")  # fmt: skip
    missing = [c for c in (columns or []) if c not in set(present)]
    if missing:
        has = ", ".join(short_repr(c) for c in present)
        has = has if len(has) <= 300 else has[:300] + " ..."
        raise DataError(f"{path}: missing required column {short_repr(missing[0])} (has: {has})")


def short_repr(value, limit: int = 100) -> str:
    """repr of a name, id or value, cut to ``limit`` characters (repr escapes newlines): a message must stay one short
    line whatever the file holds."""
    if isinstance(value, np.generic):
        value = value.item()
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's digit limit
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


TICKS_PER_S = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}  # pandas' datetime / timedelta units


def as_seconds(df: pd.DataFrame, col: str) -> None:
    """A datetime (or timedelta) column becomes float seconds (since 1970-01-01 UTC), in place: every time here is
    in seconds, and ``pd.to_numeric`` would give the storage unit instead (microseconds for a Parquet timestamp, so
    a 5-minute cadence would read as 300,000,000 s)."""
    column = df[col]
    if pd.api.types.is_datetime64_any_dtype(column) or pd.api.types.is_timedelta64_dtype(column):
        # From the column's own ticks in its own unit (UTC for a zoned column): subtracting a Timestamp converted it
        # to nanoseconds first, and a Parquet time in microseconds past 2262 (or before 1677) raised a traceback
        ticks = column.array.asi8.astype(np.float64)  # NaT: the smallest int64, masked below
        df[col] = np.where(column.isna().to_numpy(), np.nan, ticks / TICKS_PER_S[column.dt.unit])


def first_boolean(column: pd.Series) -> int | None:
    """The position of the first True/False of ``column`` (a bool column: Parquet's, or a CSV column of True and
    False; or booleans among other objects), None when it holds none."""
    if pd.api.types.is_bool_dtype(column):
        flags = column.notna().to_numpy(bool)
    elif column.dtype == object:
        flags = column.map(lambda v: isinstance(v, bool | np.bool_)).to_numpy(bool)
    else:
        return None
    return int(np.argmax(flags)) if flags.any() else None


def check_numeric(
    df: pd.DataFrame, columns: Sequence[str], path: str | Path, allow_nan: bool = False, is_time: bool = False
) -> None:
    """Every column numeric, finite and within its physical range; the first offending row is named.

    ``allow_nan`` lets empty cells (NaN) through, for :func:`fill_missing` to fill; inf is still an error.
    ``is_time``: ``columns`` are time columns, whose dates and durations become seconds (:func:`as_seconds`); in any
    other column they are refused.
    """
    for col in columns:
        flag = first_boolean(df[col])
        if flag is not None:  # pandas reads True as 1.0: an RTT of 1 ms, silently
            raise DataError(f"{path}: column {col!r} row {flag + 1}: boolean value {df[col].iloc[flag]}, expected a "
                            "number (write 1 and 0 if that is what it means)")  # fmt: skip
        if is_time:
            as_seconds(df, col)
        else:
            _no_time_values(df[col], col, path)
        values = _to_numeric(df[col], col, path)
        bad = values.isna() & df[col].notna()
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(f"{path}: column {col!r} row {i + 1}: non-numeric value {short_repr(df[col].iloc[i])}")
        arr = values.to_numpy(dtype=np.float64)
        nonfinite = np.isinf(arr) if allow_nan else ~np.isfinite(arr)
        if nonfinite.any():
            i = int(np.flatnonzero(nonfinite)[0])
            raise DataError(f"{path}: column {col!r} row {i + 1}: {'NaN or empty' if np.isnan(arr[i]) else arr[i]}")
        huge = np.abs(arr) > FLOAT32_MAX  # the model works in float32: such a value would become inf
        if huge.any():
            i = int(np.flatnonzero(huge)[0])
            raise DataError(f"{path}: column {col!r} row {i + 1}: value {arr[i]:g} is beyond float32 range")
        hit = outside_range(arr[:, None], [col])
        if hit is not None:
            raise DataError(f"{path}: column {col!r} row {hit[0][0] + 1}: {hit[1]}")
        if values.dtype != df[col].dtype:
            df[col] = values


def _to_numeric(column: pd.Series, col: str, path: str | Path) -> pd.Series:
    """``pd.to_numeric``, non-numbers as NaN; a Python int beyond float range (10**400 in an object column) is
    named instead of raising an OverflowError traceback."""
    try:
        return pd.to_numeric(column, errors="coerce")
    except OverflowError:
        for i, v in enumerate(column):
            try:
                float(v)
            except OverflowError:
                what = f"value {short_repr(v)} is beyond float range"
                raise DataError(f"{path}: column {col!r} row {i + 1}: {what}") from None
            except (TypeError, ValueError):
                continue
        raise


def _no_time_values(column: pd.Series, col: str, path: str | Path) -> None:
    """Refuse a date, duration or complex number in a numeric feature or target: as seconds, an rtt_ms of 25 ms read
    0.025 "ms"; as a float, a complex value loses its imaginary part."""
    is_date, is_duration = pd.api.types.is_datetime64_any_dtype(column), pd.api.types.is_timedelta64_dtype(column)
    if is_date or is_duration:
        known = column.notna().to_numpy()
        row = int(np.argmax(known)) + 1 if known.any() else 1
        what = "a date and time (datetime)" if is_date else "a duration (timedelta)"
        raise DataError(f"{path}: column {col!r} row {row}: {what}, expected a number")
    if pd.api.types.is_complex_dtype(column):  # as float it would lose its imaginary part (a ComplexWarning only)
        imaginary = (np.imag(column.to_numpy()) != 0).nonzero()[0]
        row = int(imaginary[0]) if len(imaginary) else 0
        raise DataError(f"{path}: column {col!r} row {row + 1}: complex value {short_repr(column.iloc[row])}, expected "
                        "a real number")  # fmt: skip


def order_series(
    df: pd.DataFrame,
    series: Sequence[str],
    time: str,
    path: str | Path,
    duplicates: str = "error",
) -> pd.DataFrame:
    """Sort by (series, time) when needed and apply the duplicate policy. Returns a frame with a fresh index."""
    if duplicates not in DUPLICATE_POLICIES:
        raise ConfigError(f"duplicates policy must be one of {', '.join(DUPLICATE_POLICIES)}, got {duplicates!r}")
    keys = [*series, time]
    check_series_ids(df, series, path)
    codes = series_codes(df, series)
    t = df[time].to_numpy()
    # compared, not subtracted: a difference of unsigned (or extreme int64) times wraps around and reads as sorted
    same, later = codes[1:] == codes[:-1], t[1:] >= t[:-1]
    in_order = bool(np.all((codes[1:] > codes[:-1]) | (same & later)))
    row = np.arange(len(df))  # each row's position in the file, for messages: sorting moves them
    if not in_order:
        log.warning("%s: rows are not sorted by %s; sorted them", path, ", ".join(keys))
        order = np.lexsort((t, codes))  # stable: of two equal keys, the file's earlier row stays first
        df = df.iloc[order].reset_index(drop=True)
        codes, t, row = codes[order], t[order], row[order]
    dup = np.r_[False, (codes[1:] == codes[:-1]) & (t[1:] == t[:-1])]
    if dup.any():
        n_dup = int(dup.sum())
        if duplicates == "error":
            flagged = np.flatnonzero(dup)
            i = int(flagged[np.argmin(row[flagged])])  # the first repeat in the file's order (was: in sorted order)
            who = "".join(f"{c}={short_repr(df[c].iloc[i])}, " for c in series)
            raise DataError(
                f"{path}: row {row[i] + 1} repeats row {row[i - 1] + 1}: duplicated ({who}{time}={df[time].iloc[i]}) "
                f"({n_dup} duplicates; set duplicates: first or mean to accept them)"
            )
        log.warning("%s: %d rows repeat a (%s); policy %r", path, n_dup, ", ".join(keys), duplicates)
        if duplicates == "first":
            df = df.loc[~dup]
        else:
            df = df.groupby(keys, sort=False, observed=True).mean(numeric_only=True).reset_index()
    return df.reset_index(drop=True)


def check_series_ids(df: pd.DataFrame, series: Sequence[str], path: str | Path) -> None:
    """Every row names its series: an empty id cell would make pandas group it with other links' rows."""
    for col in series:
        ids = df[col]
        empty = ids.isna().to_numpy()
        if ids.dtype == object:  # a Parquet list or struct cell: a TypeError traceback in the grouping
            nested = ~ids.map(pd.api.types.is_scalar).to_numpy(bool)
            if nested.any():
                i = int(np.flatnonzero(nested)[0])
                raise DataError(f"{path}: column {col!r} row {i + 1}: series id {short_repr(ids.iloc[i])} is a "
                                f"{type(ids.iloc[i]).__name__}, expected text or a number")  # fmt: skip
        if not pd.api.types.is_numeric_dtype(ids):  # a blank or whitespace-only string is no id either
            empty = empty | (ids.astype("string").str.strip() == "").fillna(True).to_numpy(bool)
        if empty.any():
            i = int(np.flatnonzero(empty)[0])
            raise DataError(f"{path}: column {col!r} row {i + 1}: empty series id ({int(empty.sum())} rows)")
        if not pd.api.types.is_numeric_dtype(ids):  # "node-0 " and "node-0" would be two links, each half the rows
            spellings: dict[str, list[str]] = {}
            for u in pd.unique(ids.astype("string")):
                spellings.setdefault(canonical_id(str(u)), []).append(str(u))
            clash = next((v for v in spellings.values() if len(v) > 1), None)
            if clash is not None:
                i = int(np.flatnonzero((ids.astype("string") == clash[1]).fillna(False).to_numpy(bool))[0])
                raise DataError(f"{path}: column {col!r} row {i + 1}: series id {ascii(clash[1])} differs from "
                                f"{ascii(clash[0])} only by surrounding spaces, invisible or control characters or "
                                "Unicode form: one link or two? Rename the ids")  # fmt: skip
    if len(series) > 1:  # reports, intervals, online state and plans name a link by its joined ids
        pairs = df[list(series)].astype(str).drop_duplicates()
        names = pairs.agg(LINK_SEPARATOR.join, axis=1)
        twice = names.duplicated(keep=False).to_numpy()
        if twice.any():  # ("x->y", "z") and ("x", "y->z") were one link of the report, silently
            a, b = (tuple(r) for r in pairs[twice].head(2).itertuples(index=False))
            raise DataError(f"{path}: links {a} and {b} have the same name {names[twice].iloc[0]!r} (ids joined with "
                            f"{LINK_SEPARATOR!r}): rename the ids so that no id holds {LINK_SEPARATOR!r}")  # fmt: skip


def canonical_id(text: str) -> str:
    """What a reader sees of a series id: NFKC form (``"e" + U+0301`` is ``"é"``), without invisible format
    characters (zero-width space, BOM, joiners), control characters (NUL, ESC, DEL, a bare CR) and surrounding
    spaces. Two ids with the same one are refused."""
    text = unicodedata.normalize("NFKC", text)
    return "".join(c for c in text if unicodedata.category(c) not in ("Cf", "Cc")).strip()


def printable(text: str) -> str:
    """``text`` with every character a terminal would act on or hide (ESC, NUL, DEL, newline, zero-width space)
    escaped as ascii() does (``\\x1b``): an id put into a warning or table must show what it is, never colour or
    clear the terminal. Printable text, accented letters included, stays as it is."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def fill_missing(df: pd.DataFrame, columns: Sequence[str], series: Sequence[str], path: str | Path) -> pd.DataFrame:
    """Fill empty cells from the previous row of the same series (the last known value). A series' leading rows
    that come before a column's first known value are dropped, not back-filled: a back-fill reads a later row into
    an earlier window, ahead of time. A series with a column that is empty throughout is skipped with a warning
    (nothing to carry); none left is an error. ``df`` must be ordered by :func:`order_series`."""
    cols = list(columns)
    n_missing = int(df[cols].isna().to_numpy().sum())
    if n_missing == 0:
        return df
    keys = list(series)
    df[cols] = df.groupby(keys, sort=False, observed=True)[cols].ffill() if keys else df[cols].ffill()
    empty = df[cols].isna().any(axis=1)  # after a forward fill: only a series' leading rows
    n_filled = n_missing - int(df[cols].isna().to_numpy().sum())  # not those: their rows are dropped (below)
    if n_filled:
        log.warning("%s: filled %d empty cells with the last known value of their series", path, n_filled)
    if not empty.any():
        return df
    whole = empty.groupby([df[k] for k in keys], sort=False, observed=True).transform("all") if keys else empty.all()
    whole = np.broadcast_to(np.asarray(whole, dtype=bool), len(df))
    col = df.loc[empty, cols].isna().any().idxmax()
    if whole.any():
        n_series = df.loc[whole, keys].drop_duplicates().shape[0] if keys else 1
        log.warning("%s: skipped %d series with a column that is empty throughout (e.g. %r)", path, n_series, col)
    leading = empty.to_numpy() & ~whole
    if leading.any():
        log.warning("%s: dropped %d rows at the start of their series, before a column's first value (e.g. %r): "
                    "filling them would read a later row", path, int(leading.sum()), col)  # fmt: skip
    df = df.loc[~empty.to_numpy()].reset_index(drop=True)
    if df.empty:
        raise DataError(f"{path}: column {col!r} is empty throughout every series")
    return df


def series_codes(df: pd.DataFrame, series: Sequence[str]) -> np.ndarray:
    """One integer per row identifying its series, ordered like a sort by the series columns."""
    if not series:
        return np.zeros(len(df), dtype=np.int64)
    return df.groupby(list(series), sort=True, observed=True).ngroup().to_numpy(np.int64)


def time_steps(t: np.ndarray) -> np.ndarray:
    """[n] times -> [n - 1] steps as float64, exact for integer times: as float64 a time near 2**62 is 1024 s
    coarse, which turned a regular 300 s cadence into gaps. (A difference across two series may wrap around;
    callers mask those.)"""
    if np.issubdtype(t.dtype, np.integer):
        return np.diff(t).astype(np.float64)
    return np.diff(t.astype(np.float64))


LINK_SEPARATOR = "->"  # joins a link's series ids into the name reports, intervals, online state and plans use


def link_name(df: pd.DataFrame, series: Sequence[str], row: int) -> str:
    """The link of ``row`` as messages name it: its series ids joined by '/', control characters escaped
    (:func:`printable`), each cut to :data:`MAX_ID_SHOWN` characters (a 50 MB id was one 50 MB warning line)."""
    return "/".join(_cut(printable(str(df[c].iloc[row]))) for c in series) or "the series"


MAX_ID_SHOWN = 100  # characters of one series id a message shows


def _cut(text: str) -> str:
    return text if len(text) <= MAX_ID_SHOWN else f"{text[: MAX_ID_SHOWN - 3]}... ({len(text):,} characters)"


CADENCE_TOLERANCE = 2.0  # a link's cadence may differ from training's by up to this factor either way


def cadence_of(t: np.ndarray, bounds: np.ndarray, q: float = 0.5) -> np.ndarray:
    """[S] median (or ``q`` quantile) step of each segment ``bounds`` [S, 2] (NaN for a one-row segment)."""
    return np.array([np.quantile(time_steps(t[a:b]), q) if b - a > 1 else np.nan for a, b in bounds])


def check_cadence_matches(
    df: pd.DataFrame, series: Sequence[str], time: str, bounds: np.ndarray, trained: float | None, path: str | Path,
    window: int | None = None,
) -> None:  # fmt: skip
    """Each segment's cadence, and that of its latest ``window`` rows (what the model reads), is within
    :data:`CADENCE_TOLERANCE` of the one the model was trained on: a model forecasts the next *rows*, so rows every
    50 minutes fed to a model of rows every 5 would give confident forecasts of the wrong thing (and a long history
    at the right cadence would hide a latest stretch at another). The shorter steps are checked on their own (the
    lower quartile): rows 0.02 s and 2 s apart in turn have the median step of rows 1 s apart, and the model would read
    them as evenly spaced. (Long steps need no such check: a gap over ``max_gap`` x the cadence splits the series.)
    ``trained`` None (an export from before the contract recorded it): no check."""
    if not trained:
        return
    t = df[time].to_numpy()
    checks = [("", bounds)]
    if window:
        checks.append((" in its latest window", np.stack([np.maximum(bounds[:, 1] - window, bounds[:, 0]),
                                                          bounds[:, 1]], axis=1)))  # fmt: skip
    for what, spans in checks:
        steps, short = cadence_of(t, spans) / trained, cadence_of(t, spans, 0.25) / trained
        with np.errstate(invalid="ignore"):  # NaN: a one-row segment, nothing to check
            bad = (steps < 1 / CADENCE_TOLERANCE) | (steps > CADENCE_TOLERANCE) | (short < 1 / CADENCE_TOLERANCE)
        for i in np.flatnonzero(bad)[:1]:
            link = link_name(df, series, int(spans[i, 0]))
            found = (f"a row every {steps[i] * trained:g} s{what}" if abs(np.log(steps[i])) > np.log(CADENCE_TOLERANCE)
                     else f"a quarter of the steps{what} {short[i] * trained:g} s or shorter")  # fmt: skip
            raise DataError(
                f"{path}: link {link}: {found}, the model was trained on a row every {trained:g} s (it "
                "forecasts rows, not seconds: resample the input or train on its cadence)"
            )


def segment_bounds(
    df: pd.DataFrame, series: Sequence[str], time: str, min_rows: int, max_gap: float, path: str | Path
) -> np.ndarray:
    """Contiguous [start, stop) row ranges of gap-free segments with at least ``min_rows`` rows: int64 [S, 2].

    ``df`` must already be ordered by :func:`order_series`. A gap is a step larger than ``max_gap`` times the series'
    median step; ``max_gap <= 0`` turns gap splitting off.
    """
    codes = series_codes(df, series)
    new_series = np.r_[True, codes[1:] != codes[:-1]]
    step = np.r_[np.nan, time_steps(df[time].to_numpy())]
    step[new_series] = np.nan
    cut = new_series.copy()
    if max_gap > 0:
        cadence = pd.Series(step).groupby(codes).transform("median").to_numpy()
        cut |= is_gap(step, cadence, max_gap)
        n_gaps = int((cut & ~new_series).sum())
        if n_gaps:
            log.warning("%s: %d gaps longer than %g x the cadence; series split there", path, n_gaps, max_gap)
    starts = np.flatnonzero(cut)
    bounds = np.stack([starts, np.r_[starts[1:], len(df)]], axis=1).astype(np.int64)
    return long_segments(bounds, min_rows, path)


def is_gap(steps: np.ndarray, cadence: np.ndarray | float, max_gap: float) -> np.ndarray:
    """Which time steps are gaps: longer than ``max_gap`` x the cadence (the one rule for training data and for a
    link's rows at serving time); ``max_gap <= 0`` means none. NaN steps (a series' first row) are not gaps."""
    return steps > max_gap * cadence if max_gap > 0 else np.zeros(len(steps), bool)


def long_segments(bounds: np.ndarray, min_rows: int, path: str | Path) -> np.ndarray:
    """The segments of ``bounds`` [S, 2] with at least ``min_rows`` rows; the others skipped with a warning."""
    short = (bounds[:, 1] - bounds[:, 0]) < min_rows
    if short.any():
        log.warning("%s: skipped %d of %d series segments shorter than %d rows", path, int(short.sum()), len(bounds),
                    min_rows)  # fmt: skip
    bounds = bounds[~short]
    if len(bounds) == 0:
        raise DataError(f"{path}: no series has at least {min_rows} rows; nothing to use")
    return bounds


def latest_segments(df: pd.DataFrame, series: Sequence[str], bounds: np.ndarray) -> np.ndarray:
    """The last segment of each link among ``bounds`` (of :func:`segment_bounds` with ``min_rows`` 1): [links, 2].
    A link's present is its latest segment; an earlier one ends at a gap and is stale."""
    codes = series_codes(df, series)[bounds[:, 0]]
    return bounds[np.r_[codes[1:] != codes[:-1], True]]


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary name beside ``path`` for the block to write; when the block succeeds the file is fsynced and
    renamed over ``path``, so readers see the old file or the new one, never half of one. On any failure the
    temporary file is removed and ``path`` is untouched. The one implementation every writer of an artifact uses.
    The temporary name is the process's own (``.<name>.<pid>-<random>.tmp``): two processes writing the same file at
    once (two first runs generating the built-in data) each rename a whole file, and neither removes the other's."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as f:  # the writer may have been a library (torch.onnx, matplotlib, pandas)
            os.fsync(f.fileno())
        if path.is_dir():  # os.replace's error would name the temporary file
            raise IsADirectoryError(errno.EISDIR, "is a directory, expected a file", str(path))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write bytes or text to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def check_table_suffix(path: str | Path) -> Path:
    """A table to write ends in .csv or .parquet (.pq, as the reader takes): checked before the work that produces
    it (and by the writer)."""
    path = Path(path)
    if path.suffix.lower() not in (".csv", *PARQUET_SUFFIXES):
        raise DataError(f"{path}: output must end in .csv or .parquet (or .pq)")
    return path


def write_frame(df: pd.DataFrame, path: str | Path, float_format: str | None = None) -> None:
    """Write CSV or Parquet (by suffix) to a temporary name, then rename: a crash never leaves half a file."""
    path = check_table_suffix(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as tmp:
            if path.suffix.lower() == ".csv":
                df.to_csv(tmp, index=False, lineterminator="\n", float_format=float_format)
            else:
                _pyarrow(path)
                df.to_parquet(tmp, index=False)
    except OSError as exc:
        raise DataError(f"{path}: cannot write ({exc.strerror or exc})") from None


def probe_writable(folder: Path) -> None:
    """Create and remove an empty file in ``folder``: OSError where it cannot be written (permissions, a read-only
    or full disk), found before the work whose output would go there."""
    probe = folder / f".write-test-{os.getpid()}-{secrets.token_hex(4)}"
    probe.write_bytes(b"")
    probe.unlink()


def check_output_file(path: str | Path) -> Path:
    """An output file can be written: checked before the work that produces it, never after.

    Its folder must exist (a typo in a path is not silently created here) and accept a file; the path must not be a
    directory. Writing itself goes through :func:`atomic_path`.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, expected a file name to write")
    if not path.parent.is_dir():
        raise ConfigError(f"{path}: folder {path.parent} does not exist")
    try:
        probe_writable(path.parent)
    except OSError as exc:
        raise ConfigError(f"{path}: folder {path.parent} is not writable ({exc.strerror or exc})") from None
    return path


def finite_or_null(o):
    """NaN and inf as null: JSON has no NaN (``json.dumps`` would write a token other parsers reject). A metric that
    is undefined on the data (the correlation of a target that never changes) is reported as null."""
    if isinstance(o, dict):
        return {k: finite_or_null(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [finite_or_null(v) for v in o]
    if isinstance(o, float | np.floating) and not np.isfinite(o):
        return None
    return o

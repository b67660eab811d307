"""Property tests of the serving contract: whatever the metadata or the telemetry, `Predictor` and `forecast` give the
right forecasts or refuse with one `error:` line (exit 2); never another exception, never a window mixing two links.

Right means: every forecast equals the predictor's forecast of a window taken from one link's own rows of the file as
read, every link left intact by the corruption gets its uncorrupted forecast, and harmless changes (shuffled rows,
extra columns) are not refused. Examples are derandomized, so a failure reproduces.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from pandas._libs.parsers import STR_NA_VALUES

from dwcp_lstm.cli import cli_main
from dwcp_lstm.contract import CONTRACT_KEYS, canonical
from dwcp_lstm.errors import DwcpError
from dwcp_lstm.serve import Predictor

SETTINGS = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    "derandomize": True,
    "database": None,
}
SERIES, TIME, EXTRA = ["node_id", "peer_id"], "timestamp", "region"
ROWS_PER_LINK = 24  # window 20: the last-row forecast and a few rolling ones per link


# -- fixtures: built once per module -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(smoke_run: Path, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("prop_run")
    for name in ("model.onnx", "model_metadata.json"):
        shutil.copy(smoke_run / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def predictor(run: Path) -> Predictor:
    return Predictor.from_run(run)


@pytest.fixture(scope="module")
def clean_meta(run: Path) -> dict:
    return json.loads((run / "model_metadata.json").read_text())


@pytest.fixture(scope="module")
def base(clean_meta: dict, predictor: Predictor) -> pd.DataFrame:
    """Three links of the smoke run's data, the last ROWS_PER_LINK rows each, sorted, with one column no model uses."""
    df = pd.read_csv(clean_meta["data"]["path"])
    links = df[SERIES].drop_duplicates().iloc[:3]
    df = df.merge(links, on=SERIES).sort_values([*SERIES, TIME])
    df = df.groupby(SERIES, sort=False).tail(ROWS_PER_LINK)
    return df[[*SERIES, TIME, *predictor.features, EXTRA]].reset_index(drop=True)


@pytest.fixture(scope="module")
def clean(base: pd.DataFrame, predictor: Predictor) -> dict[tuple, tuple[float, np.ndarray]]:
    """Per link: (time of its last row, the forecast of the step after it)."""
    out = {}
    for key, link in base.groupby(SERIES, sort=False):
        y = predictor.predict(link)
        out[key] = (float(link[TIME].iloc[-1]), np.array([y[t] for t in predictor.targets]))
    return out


@pytest.fixture(scope="module")
def base_csv(base: pd.DataFrame, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prop_data") / "telemetry.csv"
    base.to_csv(path, index=False)
    return path


def run_forecast(args: list[str], capsys) -> tuple[int, list[str]]:
    """`forecast` in-process: (exit code, stderr lines). Any exception but SystemExit fails the test."""
    capsys.readouterr()
    try:
        cli_main(["forecast", *args])
        code = 0
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.rstrip("\r\n")
    return code, re.split(r"\r\n|[\r\n]", err) if err else []  # a terminal's line breaks (str.splitlines has more)


def outcome(code: int, err: list[str]) -> None:
    """Tally the outcomes (see them with --hypothesis-show-statistics): the draws should reach past the first check."""
    if currently_in_test_context():
        event(f"exit {code}: " + (err[-1].split(": ", 2)[-1][:40] if code else "ok"))


def assert_clean_exit(code: int, err: list[str]) -> None:
    """Success without an error line, or exit 2 with exactly one one-line error (the last line of stderr)."""
    assert all(line.startswith(("warning: ", "error: ")) for line in err), err  # no traceback, no wrapped message
    errors = [line for line in err if line.startswith("error: ")]
    if code == 0:
        assert not errors, err
    else:
        assert code == 2 and len(errors) == 1 and err[-1] == errors[0], (code, err)


# -- corrupted metadata ----------------------------------------------------------------------------------------------
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.sampled_from([1e308, 10**30, float("nan"), "", "ms", "node_id", "float32", "batch", "delta", "level"]),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
    max_leaves=6,
)


def nudged(draw, value):
    """A plausible edit of one value: numbers moved or blown up, strings changed, types swapped."""
    if isinstance(value, bool):
        return draw(st.sampled_from([not value, int(value), str(value).lower()]))
    if isinstance(value, int | float):
        return draw(
            st.sampled_from([value + 1, value - 1, value * 2, -value, float(value), str(value), [value], 0, 10**40])
            | st.sampled_from([float("nan"), float("inf"), 1e308, True])
        )
    if isinstance(value, str):
        return draw(
            st.sampled_from([value.upper(), value + " ", "", value[::-1], [value], None])
            | st.text(min_size=1, max_size=6).map(lambda t: value + t)
        )
    if isinstance(value, list):
        return draw(st.sampled_from([value[::-1], value[:-1], [*value, *value[:1]], {"0": value}, []]))
    if isinstance(value, dict):
        return draw(st.sampled_from([list(value.values()), {}, None, {k.upper(): v for k, v in value.items()}]))
    return draw(JSON_VALUES)


@st.composite
def corrupted_metadata(draw, clean: dict) -> bytes:
    meta = copy.deepcopy(clean)
    for _ in range(draw(st.integers(1, 3))):
        # walk down from the root: the contract keys first, as edits there are what must never pass
        node, key = meta, draw(st.sampled_from([*CONTRACT_KEYS, "model_sha256", *clean]))
        if key not in node:
            continue
        while isinstance(node[key], dict | list) and node[key] and draw(st.booleans()):
            node = node[key]
            key = draw(st.sampled_from(list(node) if isinstance(node, dict) else range(len(node))))
        op = draw(st.sampled_from(["delete", "replace", "nudge", "nudge", "swap"]))
        if op == "delete":
            del node[key]
        elif op == "replace":
            node[key] = draw(JSON_VALUES)
        elif op == "nudge":
            node[key] = nudged(draw, node[key])
        elif isinstance(node, list) and len(node) > 1:
            other = draw(st.sampled_from([i for i in range(len(node)) if i != key]))
            node[key], node[other] = node[other], node[key]
    text = json.dumps(meta, allow_nan=True, ensure_ascii=draw(st.booleans())).encode()
    damage = draw(st.sampled_from(["none"] * 6 + ["truncate", "byte", "bom", "empty", "not-an-object"]))
    if damage == "truncate":
        text = text[: draw(st.integers(0, len(text) - 1))]
    elif damage == "byte":
        i = draw(st.integers(0, len(text) - 1))
        text = text[:i] + bytes([draw(st.integers(0, 255))]) + text[i + 1 :]
    elif damage == "bom":
        text = b"\xef\xbb\xbf" + text
    elif damage == "empty":
        text = b""
    elif damage == "not-an-object":
        text = json.dumps(draw(st.lists(JSON_VALUES, max_size=2) | st.just(None) | st.integers())).encode()
    return text


@settings(max_examples=100, **SETTINGS)
@given(data=st.data())
def test_corrupted_metadata_is_refused_or_harmless(run, predictor, clean_meta, base, base_csv, tmp_path, capsys, data):
    meta_path = tmp_path / "meta.json"
    meta_path.write_bytes(data.draw(corrupted_metadata(clean_meta), label="metadata"))
    windows = base[predictor.features].to_numpy(np.float32)[None, -predictor.window :]
    try:
        p = Predictor(run / "model.onnx", meta_path)
    except DwcpError as exc:  # any refusal (DataError, ModelFileError)
        assert "\n" not in str(exc)
        refused = True
    else:
        refused = False
        # what passes must be the model's own contract, byte-for-byte as canonical JSON, and its own sha256
        for key in CONTRACT_KEYS:
            assert canonical(p.metadata[key]) == canonical(clean_meta[key]), key
        assert p.metadata["model_sha256"] == clean_meta["model_sha256"]
        np.testing.assert_array_equal(p.predict_windows(windows), predictor.predict_windows(windows))

    out = tmp_path / "out.parquet"
    out.unlink(missing_ok=True)
    args = ["--model", str(run / "model.onnx"), "--metadata", str(meta_path), "--input", str(base_csv)]
    code, err = run_forecast([*args, "--output", str(out)], capsys)
    outcome(code, err)
    assert_clean_exit(code, err)
    assert (code == 2) == refused, err  # the command and the class agree
    if not refused:
        got = pd.read_parquet(out)
        assert len(got) == 3 and all(got[t].notna().all() for t in predictor.targets)


# -- corrupted telemetry ---------------------------------------------------------------------------------------------
CELL_VALUES = st.sampled_from(
    [math.nan, math.inf, -math.inf, 1e39, -1e39, 1e300, 3e38, -1.0, 0.0, 1e-300, "", " ", "abc", "1,5", "NA", "1e5"]
) | st.floats() | st.integers(-(2**64), 2**64) | st.text(max_size=5)  # fmt: skip
# names and ids that CSV readers and one-line messages find hard: empty, NA-like, line breaks, quotes, very long
ODD_TEXTS = {
    "empty": "", "space": " ", "NA": "NA", "01": "01", "LF": "a\nb", "CRLF": "a\r\nb", "quote": '"',
    "unicode": "é\u2028", "140k": "x" * 140_000,
}  # fmt: skip
ODD_TEXT = st.sampled_from(list(ODD_TEXTS.values()))
ID_TEXT = st.text(max_size=5) | ODD_TEXT
ROW_OPS = ["shuffle", "dup_rows", "drop_rows", "empty_id", "move_row"] + ["rename_link"] * 2 + ["cell"] * 3
COLUMN_OPS = ["drop_col", "dup_col", "rename_col", "rename_col"]


@st.composite
def corrupted_table(draw, base: pd.DataFrame, features: list[str]):
    """(frame, links touched, only harmless edits, exact duplicate rows added). Touched links may change or vanish;
    the others must come out exactly as from the clean file."""
    df = base.copy()
    required = {*SERIES, TIME, *features}
    keys = [tuple(k) for k in base[SERIES].itertuples(index=False)]  # original link of each row, by index label
    all_links = set(keys)
    touched: set[tuple] = set()
    harmless, dup_rows = True, False
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(ROW_OPS + COLUMN_OPS))
        if df.empty:
            break
        row = draw(st.integers(0, len(df) - 1))
        link = keys[df.index[row]]
        if op == "shuffle":
            df = df.sample(frac=1.0, random_state=draw(st.integers(0, 2**16)))
        elif op == "dup_rows":
            df = pd.concat([df, df.iloc[draw(st.lists(st.integers(0, len(df) - 1), min_size=1, max_size=4))]])
            dup_rows = True
        elif op == "drop_rows":
            rows = draw(st.lists(st.integers(0, len(df) - 1), min_size=1, max_size=8, unique=True))
            touched |= {keys[df.index[r]] for r in rows}
            df = df.drop(index=df.index[rows])
            harmless = False
        elif op in ("empty_id", "move_row", "rename_link", "cell"):
            col = draw(st.sampled_from(SERIES if op != "cell" else [TIME, *features, EXTRA]))
            if op == "empty_id":
                value = None
            elif op == "move_row":  # the row now claims to belong to another link
                value = draw(st.sampled_from(sorted({k[SERIES.index(col)] for k in all_links})))
            elif op == "rename_link":
                value = draw(ID_TEXT)
            else:
                value = draw(CELL_VALUES)
            if df.columns.tolist().count(col) != 1:
                continue
            df[col] = df[col].astype(object)  # any value fits; the file decides the type
            rows = [i for i in range(len(df)) if keys[df.index[i]] == link] if op == "rename_link" else [row]
            df.iloc[rows, [df.columns.get_loc(col)]] = value
            if col != EXTRA:
                harmless = False
                touched.add(link)
                if all(c in df.columns for c in SERIES):  # the link the rows now claim, if it is one of the others
                    touched |= {tuple(k) for k in df.iloc[rows][SERIES].itertuples(index=False)} & all_links
        else:
            col = draw(st.sampled_from(list(dict.fromkeys(df.columns))))
            pos = list(df.columns).index(col)
            if op == "drop_col":
                df = df.drop(columns=col)
            elif op == "dup_col":
                same = draw(st.booleans())
                extra = df.iloc[:, pos] if same else df.iloc[:, pos].sample(frac=1.0, random_state=0).to_numpy()
                df = pd.concat([df, pd.DataFrame({col: extra}, index=df.index)], axis=1)
                harmless = False  # a repeated name is ambiguous: refusing it is right too
            else:
                name = draw(st.one_of(ODD_TEXT, st.text(max_size=6), st.sampled_from(sorted(required))))
                harmless = harmless and name not in df.columns
                df.columns = [name if i == pos else c for i, c in enumerate(df.columns)]
                if name in required:
                    touched, harmless = set(all_links), False
            if col in required:
                touched, harmless = set(all_links), False
    return df, touched, harmless, dup_rows


def write_table(df: pd.DataFrame, path: Path) -> None:
    """CSV, or Parquet column by column (keeps duplicate names; a column of mixed types is stored as text)."""
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
        return
    arrays = []
    for i in range(df.shape[1]):
        col = df.iloc[:, i]
        try:
            arrays.append(pa.array(col, from_pandas=True))
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            arrays.append(pa.array([None if pd.isna(v) else str(v) for v in col]))
    pq.write_table(pa.Table.from_arrays(arrays, names=[str(c) for c in df.columns]), path)


def read_reference(path: Path, columns: list[str]) -> pd.DataFrame:
    """The file as pandas reads it, for the independent check of a forecast."""
    if path.suffix == ".csv":  # a link may be named NA or null: in the id columns only an empty cell is missing
        ids = [c for c in SERIES if c in columns]
        na = {c: [""] if c in ids else sorted(STR_NA_VALUES) for c in columns}  # pandas' words elsewhere
        return pd.read_csv(path, usecols=columns, dtype=dict.fromkeys(ids, str), keep_default_na=False, na_values=na)
    return pq.read_table(path, columns=columns).to_pandas()


def expected_forecast(ref: pd.DataFrame, key: tuple, t: float, predictor: Predictor, policy: str) -> np.ndarray:
    """The forecast from the last `window` rows up to time t of the link `key` alone (one link's own rows only)."""
    mask = np.ones(len(ref), dtype=bool)
    for col, value in zip(SERIES, key, strict=True):
        mask &= (ref[col] == value).to_numpy()
    link = ref.loc[mask, [TIME, *predictor.features]].apply(pd.to_numeric)
    link = link.sort_values(TIME, kind="stable")
    if policy == "first":
        link = link.drop_duplicates(TIME, keep="first")
    elif policy == "mean":
        link = link.groupby(TIME, sort=True).mean().reset_index()
    window = link.loc[link[TIME] <= t, predictor.features].to_numpy(np.float32)[-predictor.window :]
    assert len(window) == predictor.window, f"link {key} has no full window ending at {t}"
    return predictor.predict_windows(window[None])[0]


def check_forecast_of_corrupted_table(run, predictor, clean, base, tmp_path, capsys, data, suffix: str) -> None:
    df, touched, harmless, dup_rows = data.draw(corrupted_table(base, predictor.features), label="table")
    policy = data.draw(st.sampled_from(["error", "first", "mean"]), label="duplicates")
    rolling = data.draw(st.booleans(), label="rolling")
    path = tmp_path / f"telemetry{suffix}"
    write_table(df, path)
    damage = data.draw(st.sampled_from(["none"] * 8 + ["truncate", "bytes", "garbage", "header-only"]), label="damage")
    if damage != "none":
        raw = path.read_bytes()
        if damage == "truncate":
            raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
        elif damage == "bytes":
            i = data.draw(st.integers(0, len(raw) - 1))
            raw = raw[:i] + data.draw(st.binary(min_size=1, max_size=8)) + raw[i + 8 :]
        elif damage == "garbage":
            raw = data.draw(st.binary(max_size=64))
        else:
            write_table(df.iloc[:0], path)
            raw = path.read_bytes()
        path.write_bytes(raw)
        touched, harmless = set(clean), False
    check_forecast(
        run, predictor, clean, path, capsys, touched, harmless, dup_rows and policy == "error", policy, rolling
    )


def check_forecast(
    run, predictor, clean, path: Path, capsys, touched: set, harmless: bool, must_fail: bool, policy: str, rolling: bool
) -> None:
    """Run `forecast` on ``path`` and check the contract. ``touched``: links the edits may have changed (the others
    must come out as from the clean file); ``harmless``: refusing is wrong; ``must_fail``: succeeding is wrong."""
    out = path.with_name("out.parquet")
    out.unlink(missing_ok=True)
    args = ["--model", str(run), "--input", str(path), "--output", str(out), "--duplicates", policy]
    code, err = run_forecast([*args, "--rolling"] if rolling else args, capsys)
    outcome(code, err)
    assert_clean_exit(code, err)
    if harmless and not must_fail:
        assert code == 0, f"a harmless edit was refused: {err}"
    if code != 0:
        return
    assert not (must_fail and not touched), "duplicated rows passed with duplicates=error"
    got = pd.read_parquet(out)
    ref = read_reference(path, list(dict.fromkeys([*SERIES, TIME, *predictor.features])))
    for row in got.itertuples(index=False):
        key = tuple(getattr(row, c) for c in SERIES)
        assert all(pd.notna(k) for k in key), f"a forecast for a link without an id: {row}"
        y = np.array([getattr(row, t) for t in predictor.targets])
        t = float(getattr(row, TIME))
        np.testing.assert_allclose(y, expected_forecast(ref, key, t, predictor, policy), rtol=1e-5, atol=1e-6)
    for key, (last, y) in clean.items():
        if key in touched:
            continue
        mask = np.ones(len(got), dtype=bool)
        for col, value in zip(SERIES, key, strict=True):
            mask &= (got[col] == value).to_numpy()
        rows = got[mask]
        assert len(rows) == (ROWS_PER_LINK - predictor.window + 1 if rolling else 1), f"intact link {key}: {rows}"
        assert float(rows[TIME].iloc[-1]) == last
        np.testing.assert_allclose(rows[predictor.targets].iloc[-1].to_numpy(float), y, rtol=1e-5, atol=1e-6)


@settings(max_examples=100, **SETTINGS)
@given(data=st.data())
def test_forecast_of_a_corrupted_csv(run, predictor, clean, base, tmp_path, capsys, data):
    check_forecast_of_corrupted_table(run, predictor, clean, base, tmp_path, capsys, data, ".csv")


@settings(max_examples=50, **SETTINGS)
@given(data=st.data())
def test_forecast_of_a_corrupted_parquet(run, predictor, clean, base, tmp_path, capsys, data):
    check_forecast_of_corrupted_table(run, predictor, clean, base, tmp_path, capsys, data, ".parquet")


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
@pytest.mark.parametrize("where", ["required column", "extra column", "link id", "repeated link id"])
@pytest.mark.parametrize("name", list(ODD_TEXTS))
def test_forecast_with_odd_names_and_ids(run, predictor, clean, base, tmp_path, capsys, suffix, where, name):
    """Each odd text in each place once: random draws reach some of them only rarely."""
    text, df = ODD_TEXTS[name], base.copy()
    touched, harmless, must_fail = set(), False, False
    if where == "required column":
        df, touched = df.rename(columns={"rtt_ms": text}), set(clean)
    elif where == "extra column":
        df, harmless = df.rename(columns={EXTRA: text}), text not in df.columns
    else:
        first = (df[SERIES] == df[SERIES].iloc[0]).all(axis=1)
        touched = {tuple(df.loc[first, SERIES].iloc[0])}
        df["node_id"] = df["node_id"].astype(object)
        df.loc[first, "node_id"] = text
        touched |= {k for k in clean if k[0] == text}
        if where == "repeated link id":
            df, must_fail = pd.concat([df, df[first].iloc[[3]]]), True
    path = tmp_path / f"telemetry{suffix}"
    write_table(df, path)
    check_forecast(run, predictor, clean, path, capsys, touched, harmless, must_fail, "error", False)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_link_ids_that_look_alike_as_numbers_stay_apart(run, predictor, clean, base, tmp_path, capsys, suffix):
    """Ids are names: "01" and "1" are two links, whose rows must never share a window (a CSV reader that parses
    them as numbers merges them)."""
    links = list(clean)[:2]
    parts = []
    for key, node, offset in zip(links, ["01", "1"], [0, 150], strict=True):
        rows = base[(base[SERIES] == key).all(axis=1)].copy()
        rows["node_id"], rows["peer_id"], rows[TIME] = node, "2", rows[TIME] + offset  # interleaved in time
        parts.append(rows)
    path = tmp_path / f"telemetry{suffix}"
    write_table(pd.concat(parts), path)
    out = tmp_path / "out.parquet"
    code, err = run_forecast(["--model", str(run), "--input", str(path), "--output", str(out)], capsys)
    assert_clean_exit(code, err)
    if code == 0:
        got = pd.read_parquet(out)
        assert sorted(got["node_id"].astype(str)) == ["01", "1"], f"two links merged into one: {got}"
        for key, node in zip(links, ["01", "1"], strict=True):
            row = got[got["node_id"].astype(str) == node]
            np.testing.assert_allclose(row[predictor.targets].to_numpy(float)[0], clean[key][1], rtol=1e-5)


# -- corrupted frames straight into the Predictor -------------------------------------------------------------------
@settings(max_examples=100, **SETTINGS)
@given(data=st.data())
def test_predict_on_a_corrupted_frame(predictor, base, data):
    df = base[(base[SERIES] == base[SERIES].iloc[0]).all(axis=1)].reset_index(drop=True)
    for _ in range(data.draw(st.integers(0, 3))):
        op = data.draw(st.sampled_from(["cell", "cell", "drop_col", "dup_col", "reorder", "dtype", "head", "extra"]))
        pos = data.draw(st.integers(0, df.shape[1] - 1))  # by position: names may repeat
        if op == "cell" and len(df):
            df.isetitem(pos, df.iloc[:, pos].astype(object))
            df.iloc[data.draw(st.integers(0, len(df) - 1)), pos] = data.draw(CELL_VALUES | st.none())
        elif op == "drop_col":
            df = df.iloc[:, [i for i in range(df.shape[1]) if i != pos]]
        elif op == "dup_col":
            df = df.iloc[:, [*range(df.shape[1]), pos]]
        elif op == "reorder":
            df = df.iloc[:, ::-1]
        elif op == "dtype":
            kind = data.draw(st.sampled_from([object, str, "float32", "int64"]))
            with contextlib.suppress(ValueError, TypeError, OverflowError):  # a cast that cannot apply: skip it
                df.isetitem(pos, df.iloc[:, pos].astype(kind))
        elif op == "head":
            df = df.head(data.draw(st.integers(0, len(df))))
        else:
            df[data.draw(st.text(max_size=4))] = data.draw(CELL_VALUES)
    before = df.copy()
    try:
        y = predictor.predict(df)
        rolling = predictor.predict_rolling(df)
    except DwcpError as exc:  # any refusal (DataError, ModelFileError)
        assert "\n" not in str(exc)
        return
    finally:
        pd.testing.assert_frame_equal(df, before)  # the caller's frame is never modified
    x = np.stack([pd.to_numeric(df[c]).to_numpy(np.float64) for c in predictor.features], axis=1)  # [rows, F]
    expected = predictor.predict_windows(x.astype(np.float32)[None, -predictor.window :])[0]
    np.testing.assert_allclose([y[t] for t in predictor.targets], expected, rtol=1e-6)
    assert len(rolling) == len(df) - predictor.window + 1
    np.testing.assert_allclose(rolling[predictor.targets].iloc[-1].to_numpy(), expected, rtol=1e-6)


@settings(max_examples=300, **SETTINGS)
@given(ids=st.lists(st.one_of(st.text(max_size=12), st.from_regex(r"[=+\-@\t\r][^\n]{0,10}", fullmatch=True),
                              st.floats(-1e6, 1e6).map(repr), st.integers().map(str),
                              st.sampled_from(["-inf", "-nan", "-1_0", "-1 ", "+.5", "-1.", "-1e-3"])),
                    min_size=1, max_size=6))  # fmt: skip
def test_any_link_id_a_spreadsheet_runs_is_refused_and_no_other(ids):
    """CSV injection as a class: an id is refused exactly when it starts with one of OWASP's formula characters
    (=, +, -, @, tab, CR) and is not a plain number; the refusal names the first such row in one line."""
    from dwcp_lstm.serve import check_no_formulas
    from dwcp_lstm.tables import DataError

    def runs(i: str) -> bool:  # a plain number: only digits, signs, a point and an exponent, and float() reads it
        if not i or i[0] not in "=+-@\t\r":
            return False
        try:
            float(i)
        except ValueError:
            return True
        return not set(i) <= set("0123456789+-.eE")

    df = pd.DataFrame({"node_id": ids})
    bad = [k for k, i in enumerate(ids) if runs(i)]
    try:
        check_no_formulas(df, ["node_id"], "t.csv")
    except DataError as exc:
        message = str(exc)
        assert bad and "\n" not in message and f"t.csv: column 'node_id' row {bad[0] + 1}: link id " in message
    else:
        assert not bad, ids

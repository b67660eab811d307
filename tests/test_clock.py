"""Wall-clock inputs (``--data.clock``, ``--data.series_start``): a column holding the row's wall-clock second modulo a
period, derived from the time column (plus each series' start time read from its id) in training and, identically, in
``forecast`` and ``plan``, whose input files need only their own columns."""

from __future__ import annotations

import datetime as dt
import json
import re

import numpy as np
import pandas as pd
import pytest
from conftest import fit_args, run_dir_of

from dwcp_lstm.cli import cli_main
from dwcp_lstm.data import FEATURES, DwcpDataModule
from dwcp_lstm.errors import ConfigError, DataError, ModelFileError
from dwcp_lstm.serve import Predictor, forecast_table
from dwcp_lstm.tables import add_clock

FORMAT = "%Y-%m-%d-%H-%M-%S"
PERIOD = 900.0  # 15 minutes: three 5-minute rows per phase cycle


@pytest.fixture(scope="module")
def relative_csv(small_csv, tmp_path_factory):
    """The small synthetic data re-expressed as a capture log: one series column whose id is the link's start time
    (each link starts at a different row, so the ids differ) and a time column counting seconds from that start."""
    df = pd.read_csv(small_csv)
    parts = []
    for k, (_, g) in enumerate(df.groupby(["node_id", "peer_id"], sort=True)):
        g = g.iloc[k:].copy()  # link k starts k rows later
        start = int(g["timestamp"].iloc[0])
        g["series_id"] = pd.Timestamp(start, unit="s").strftime(FORMAT)
        g["seconds"] = g["timestamp"] - start
        parts.append(g.drop(columns=["timestamp", "node_id", "peer_id"]))
    path = tmp_path_factory.mktemp("clock") / "captures.csv"
    pd.concat(parts).to_csv(path, index=False)
    return path


def test_the_clock_is_the_wall_clock_second_modulo_the_period(small_csv, relative_csv):
    absolute = pd.read_csv(small_csv)
    direct = add_clock(absolute, {"beat": PERIOD}, None, ["node_id", "peer_id"], "timestamp", small_csv)
    np.testing.assert_array_equal(direct["beat"], np.mod(absolute["timestamp"].to_numpy(np.float64), PERIOD))
    assert "beat" not in absolute.columns  # the caller's frame is left as it was
    rel = pd.read_csv(relative_csv)
    derived = add_clock(rel, {"beat": PERIOD, "minute": 60.0}, FORMAT, ["series_id"], "seconds", relative_csv)
    start = np.array([dt.datetime.strptime(i, FORMAT).replace(tzinfo=dt.UTC).timestamp() for i in rel["series_id"]])
    wall = start + rel["seconds"].to_numpy()  # by hand: the start read from the id plus the seconds since
    np.testing.assert_allclose(derived["beat"], np.mod(wall, PERIOD), atol=1e-6)
    np.testing.assert_allclose(derived["minute"], np.mod(wall, 60.0), atol=1e-6)


def test_a_series_id_that_is_not_a_start_time_is_named(relative_csv):
    rel = pd.read_csv(relative_csv)
    with pytest.raises(ConfigError, match=r"start time is read from one series column, got \['series_id', 'r'\]"):
        add_clock(rel.assign(r=1), {"beat": PERIOD}, FORMAT, ["series_id", "r"], "seconds", relative_csv)
    rel.loc[rel.index[5], "series_id"] = "link-7"
    with pytest.raises(DataError, match=r"captures.csv: series id 'link-7' in column 'series_id' is not a start"):
        add_clock(rel, {"beat": PERIOD}, FORMAT, ["series_id"], "seconds", relative_csv)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"clock": {"beat": PERIOD}}, "--data.clock: 'beat' is not among the features"),
        ({"clock": {"rtt_ms": PERIOD}}, "--data.clock: 'rtt_ms' is a target or a series column"),
        ({"clock": {"beat": 0}, "features": [*FEATURES, "beat"]}, "the period of 'beat' must be a number of seconds"),
        ({"clock": {"beat": float("nan")}, "features": [*FEATURES, "beat"]}, "must be a number of seconds > 0"),
        ({"clock": {"beat": True}, "features": [*FEATURES, "beat"]}, "must be a number of seconds > 0"),
        ({"clock": ["beat"], "features": [*FEATURES, "beat"]}, "--data.clock must map new column names"),
        ({"series_start": "yesterday"}, "--data.series_start must be a strptime format"),
        ({"series_start": FORMAT}, "reads the start time from one series column, but there are 2"),
    ],
)
def test_bad_clock_settings_are_refused(settings, expected):
    with pytest.raises(ConfigError, match=expected):
        DwcpDataModule(**settings)


@pytest.fixture(scope="module")
def clock_run(relative_csv, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clock_run")
    features = [*FEATURES, "beat"]
    cli_main(fit_args(
        tmp, f"--data.data_path={relative_csv}", "--data.series_columns=[series_id]", "--data.time_column=seconds",
        f"--data.features=[{','.join(features)}]", f"--data.clock={{beat: {PERIOD}}}",
        f"--data.series_start={FORMAT}", f"--data.cyclic={{beat: {PERIOD}}}", "--trainer.max_epochs=1",
    ))  # fmt: skip
    return run_dir_of(tmp)


def test_forecasting_derives_the_clock_as_training_did(clock_run, relative_csv, capsys):
    meta = json.loads((clock_run / "model_metadata.json").read_text())
    assert meta["series"]["clock"] == {"beat": PERIOD} and meta["series"]["start_format"] == FORMAT
    predictor = Predictor.from_run(clock_run)
    assert predictor.file_features == FEATURES  # what an input file must hold: no clock column
    dm = DwcpDataModule(data_path=str(relative_csv), series_columns=["series_id"], time_column="seconds",
                        features=[*FEATURES, "beat"], clock={"beat": PERIOD}, series_start=FORMAT)  # fmt: skip
    dm.setup("fit")
    trained = pd.DataFrame({"series_id": dm.frame_keys["series_id"].to_numpy(), "seconds": dm.timestamps,
                            "beat": dm.raw_features[:, -1]})  # fmt: skip
    served = predictor.with_clock(pd.read_csv(relative_csv), ["series_id"], "seconds", relative_csv)
    both = trained.merge(served[["series_id", "seconds", "beat"]], on=["series_id", "seconds"], suffixes=("", "_s"))
    assert len(both) == len(trained)
    np.testing.assert_allclose(both["beat"], both["beat_s"].astype(np.float32), atol=1e-4)
    # the file has no beat column; forecast and the Python path agree
    out = forecast_table(predictor, pd.read_csv(relative_csv), ["series_id"], "seconds", relative_csv)
    assert len(out) == 4 and np.isfinite(out[predictor.columns].to_numpy()).all()
    capsys.readouterr()
    cli_main(["forecast", "--model", str(clock_run), "--input", str(relative_csv)])  # returns: exit code 0
    assert capsys.readouterr().out.count("\n") == 5  # header + one row per link


def test_a_metadata_clock_that_cannot_work_is_refused(clock_run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(clock_run, copy)
    meta_path = copy / "model_metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["series"]["clock"] = {"beat": -1}
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match=r"key series.clock: the period of 'beat' must be a number of seconds"):
        Predictor.from_run(copy)


def test_plan_derives_the_clock_too(clock_run, relative_csv, capsys):
    capsys.readouterr()
    cli_main(["plan", "--model", str(clock_run), "--input", str(relative_csv), "--memory-gib", "1", "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert len(plan["links"]) == 4
    # --step-seconds skips the cadence check, but the clock still reads the time column as seconds: milliseconds
    # would have been a wrong beat, silently (found by fuzzing)
    ms = relative_csv.parent / "ms.csv"
    df = pd.read_csv(relative_csv)
    df["seconds"] = df["seconds"] * 1000
    df.to_csv(ms, index=False)
    with pytest.raises(SystemExit) as exc:
        cli_main(["plan", "--model", str(clock_run), "--input", str(ms), "--memory-gib", "1", "--step-seconds", "300"])
    assert exc.value.code == 2 and "cadence" in capsys.readouterr().err


def test_a_file_column_named_like_a_clock_column_is_refused(clock_run, relative_csv, tmp_path, capsys):
    """Training and forecasting would silently replace the file's own column with the derived one."""
    clash = tmp_path / "clash.csv"
    pd.read_csv(relative_csv).assign(beat=1.0).to_csv(clash, index=False)
    expected = "clash.csv: column 'beat' is computed from the wall clock (data.clock); the file has a column"
    dm = DwcpDataModule(data_path=str(clash), series_columns=["series_id"], time_column="seconds",
                        features=[*FEATURES, "beat"], clock={"beat": PERIOD}, series_start=FORMAT)  # fmt: skip
    with pytest.raises(DataError, match=re.escape(expected)):
        dm.setup("fit")
    for command in ("forecast", "plan"):
        extra = ["--memory-gib", "1", "--dirty-rate-mbps", "0"] if command == "plan" else []
        with pytest.raises(SystemExit) as exc:
            cli_main([command, "--model", str(clock_run), "--input", str(clash), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and expected in err[0], err


def test_a_start_time_with_an_offset_is_that_instant():
    """A series id such as 2025-01-01T00:00:00+0100 with ``%z`` raised a TypeError traceback (a naive epoch minus an
    aware start; found by fuzzing); it is 23:00 UTC the day before, and an id without an offset is read as UTC."""
    from dwcp_lstm.tables import add_clock

    df = pd.DataFrame({"cap": ["2025-01-01T00:00:00+0100"] * 2 + ["2025-01-01T00:00:00+0000"] * 2, "t": [0, 1] * 2})
    out = add_clock(df, {"day_s": 86400.0}, "%Y-%m-%dT%H:%M:%S%z", ["cap"], "t", "x.csv")
    assert out["day_s"].tolist() == [82800.0, 82801.0, 0.0, 1.0]
    naive = pd.DataFrame({"cap": ["2025-01-01-00-00-05"] * 2, "t": [0, 1]})
    assert add_clock(naive, {"beat_s": 15.0}, "%Y-%m-%d-%H-%M-%S", ["cap"], "t", "x.csv")["beat_s"].tolist() == [5, 6]


@pytest.mark.parametrize(
    "start", ["9999-12-31-23-59-59", "0001-01-01-00-00-07", "1677-09-21-00-00-00", "2262-04-12-00-00-00"]
)
def test_a_start_outside_the_nanosecond_range_is_read_as_any_other(start):
    """A series id starting before 1677-09-22 or after 2262-04-11 parses (strptime) but raised OutOfBoundsDatetime,
    a traceback, in fit and forecast (found by a hostile-input hunt). Its clock inputs are those of the start read by
    the standard library (datetime.timestamp), the reference here."""
    from datetime import datetime

    from dwcp_lstm.tables import add_clock

    fmt = "%Y-%m-%d-%H-%M-%S"
    df = pd.DataFrame({"cap": [start] * 3, "t": [0.0, 1.5, 61.0]})
    out = add_clock(df, {"beat_s": 15.0, "day_s": 86400.0}, fmt, ["cap"], "t", "x.csv")
    epoch = datetime.strptime(start, fmt).replace(tzinfo=dt.UTC).timestamp()
    for name, period in (("beat_s", 15.0), ("day_s", 86400.0)):
        np.testing.assert_allclose(out[name], np.mod(epoch + df["t"].to_numpy(), period), atol=1e-6)


def test_absolute_times_are_refused_when_the_start_comes_from_the_series_id(clock_run, relative_csv, tmp_path, capsys):
    """Found by fuzzing: a capture log whose time column held the wall clock itself (a datetime column, or Unix
    seconds) had the start added twice; the clock input was that of another second, and forecast said nothing."""
    rel = pd.read_csv(relative_csv)
    start = pd.to_datetime(rel["series_id"], format=FORMAT, utc=True)
    as_dates = rel.assign(seconds=start + pd.to_timedelta(rel["seconds"], unit="s"))
    with pytest.raises(DataError, match=r"x.parquet: column 'seconds' holds dates and times; with --data.series_start"):
        add_clock(as_dates, {"beat": PERIOD}, FORMAT, ["series_id"], "seconds", "x.parquet")
    unix = rel.assign(seconds=(start - pd.Timestamp(0, tz="UTC")).dt.total_seconds() + rel["seconds"])
    with pytest.raises(DataError, match=r"x.csv: column 'seconds' row 1: 1\.\d+e\+09 looks like an absolute time"):
        add_clock(unix, {"beat": PERIOD}, FORMAT, ["series_id"], "seconds", "x.csv")
    as_deltas = rel.assign(seconds=pd.to_timedelta(rel["seconds"], unit="s"))  # seconds since the start: fine
    beat = {name: add_clock(df, {"beat": PERIOD}, FORMAT, ["series_id"], "seconds", "x")["beat"]
            for name, df in (("deltas", as_deltas), ("seconds", rel))}  # fmt: skip
    np.testing.assert_allclose(beat["deltas"], beat["seconds"])
    path = tmp_path / "unix.csv"
    unix.to_csv(path, index=False)
    with pytest.raises(SystemExit) as exc:
        cli_main(["forecast", "--model", str(clock_run), "--input", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "looks like an absolute time" in err[0], err


def test_durations_are_refused_as_the_wall_clock():
    """Without --data.series_start the clock reads the time column as the wall clock: seconds since a capture began
    (a timedelta column) were read as seconds since 1970, and the forecast moved with them, exit 0."""
    df = pd.DataFrame({"link": ["a", "a"], "timestamp": pd.to_timedelta([1800, 1801], unit="s")})
    with pytest.raises(DataError, match=r"^td\.parquet: column 'timestamp' holds durations; the wall-clock inputs "):
        add_clock(df, {"beat_s": 3600}, None, ["link"], "timestamp", "td.parquet")
    absolute = df.assign(timestamp=[1_762_128_000.0 + 1800, 1_762_128_000.0 + 1801])  # Unix seconds, 2025
    got = add_clock(absolute, {"beat_s": 3600}, None, ["link"], "timestamp", "t")
    assert got["beat_s"].tolist() == [1800.0, 1801.0]  # absolute seconds still work
    with pytest.raises(DataError, match=r"^t: column 'timestamp' reaches only 1801 s \(before 2000 as a Unix time\)"):
        add_clock(df.assign(timestamp=[1800.0, 1801.0]), {"beat_s": 3600}, None, ["link"], "timestamp", "t")

"""Bad input: one clear line naming the file, column or row, exit code 2, no traceback, nothing overwritten."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import fit_args, run_dir_of

from dwcp_lstm import synthetic
from dwcp_lstm.cli import cli_main
from dwcp_lstm.errors import ConfigError
from dwcp_lstm.synthetic import TARGETS


def base_frame() -> pd.DataFrame:
    return synthetic.generate(samples=600, links=2, seed=1)  # 2 links x 300 rows


def write(tmp: Path, df: pd.DataFrame, name: str = "bad.csv") -> Path:
    path = tmp / name
    df.to_csv(path, index=False)
    return path


def _names_that_join_alike(df: pd.DataFrame) -> pd.DataFrame:
    """Two links whose ids joined with "->" read the same: ("x->y", "z") and ("x", "y->z")."""
    df = df.astype({"node_id": str, "peer_id": str})
    first = df["node_id"] == df["node_id"].iloc[0]
    df.loc[first, ["node_id", "peer_id"]] = ["x->y", "z"]
    df.loc[~first, ["node_id", "peer_id"]] = ["x", "y->z"]
    return df


def _set(col, row, value):
    def f(df):
        df[col] = df[col].astype(object) if isinstance(value, str) else df[col]
        df.loc[row, col] = value
        return df

    return f


# (id, how to spoil the frame or the file, extra CLI flags, expected text of the one-line message)
FIT_CASES = [
    ("missing-column", lambda df: df.drop(columns=["rtt_ms"]), [], "missing required column 'rtt_ms'"),
    ("non-numeric", _set("jitter_ms", 7, "fast"), [], "column 'jitter_ms' row 8: non-numeric value 'fast'"),
    ("nan", _set("rtt_ms", 10, np.nan), [], "column 'rtt_ms' row 11: NaN"),
    ("inf", _set("throughput_mbps", 3, np.inf), [], "column 'throughput_mbps' row 4: inf"),
    # a CSV column of True and False (pandas reads it as bool) was trained on as 0/1
    ("boolean", lambda df: df.assign(rtt_ms=df["rtt_ms"] > 0), [], "column 'rtt_ms' row 1: boolean value True"),
    ("negative-throughput", _set("throughput_mbps", 5, -1.0), [], "'throughput_mbps' row 6: negative value -1"),
    ("negative-rtt", _set("rtt_ms", 2, -3.0), [], "column 'rtt_ms' row 3: negative value -3"),
    ("loss-above-1", _set("packet_loss", 9, 1.5), [], "column 'packet_loss' row 10: above 1 value 1.5"),
    # a unit mix-up (milliseconds for hours) would become a confident forecast: the contract's units are checked
    (
        "hour-out-of-range",
        lambda df: _set("time_of_day", 4, 1e30)(df.astype({"time_of_day": float})),
        [],
        "column 'time_of_day' row 5: above 24 value 1e+30",
    ),
    ("weekday-out-of-range", _set("day_of_week", 8, 7), [], "column 'day_of_week' row 9: above 6 value 7"),
    ("negative-counter", _set("queue_depth", 1, -2), [], "column 'queue_depth' row 2: negative value -2"),
    ("duplicate", lambda df: pd.concat([df.iloc[:5], df.iloc[4:]]), [], "row 6 repeats row 5: duplicated (node_id="),
    # the report grouped both as one link 'x->y->z' (per-link figures, worst link, online state), exit 0
    ("names-join-alike", _names_that_join_alike, [], "links ('x->y', 'z') and ('x', 'y->z') have the same name"),
    # seconds since each capture began read as the wall clock (1970-01-01 00:00 to 01:00), exit 0
    (
        "relative-clock",
        lambda df: df.assign(timestamp=df["timestamp"] - df["timestamp"].min()),
        ["--data.clock={beat_s: 900}", f"--data.features=[{', '.join([*synthetic.TARGETS, 'beat_s'])}]"],
        "column 'timestamp' reaches only 89700 s (before 2000 as a Unix time)",
    ),
    # the repeat at the end of an unsorted file: named by its row in the file (was: its position once sorted)
    ("duplicate-at-end", lambda df: pd.concat([df, df.iloc[[450]]]), [], "row 601 repeats row 451: duplicated"),
    ("all-too-short", lambda df: df.groupby("node_id", observed=True).head(15), [], "no series has at least 21 rows"),
    ("empty-link-id", _set("node_id", 12, np.nan), [], "column 'node_id' row 13: empty series id (1 rows)"),
    ("blank-link-id", _set("peer_id", 4, "  "), [], "column 'peer_id' row 5: empty series id"),
    # "node-0 " beside "node-0": two links of every other row each, at twice the cadence (within its tolerance)
    (
        "spaced-link-id",
        _set("node_id", 12, "node-0 "),
        [],
        "column 'node_id' row 13: series id 'node-0 ' differs from 'node-0' only by surrounding spaces, invisible",
    ),
    # the same for a zero-width space and for another Unicode form of the same text (a fullwidth zero; "e" + U+0301)
    (
        "zero-width-link-id",
        _set("node_id", 12, "node-0\u200b"),
        [],
        "column 'node_id' row 13: series id 'node-0\\u200b' differs from 'node-0' only by",
    ),
    # a control character (NUL, ESC, DEL; any category Cc) is as invisible: "node-0\x1b" was a second link
    *(
        (
            f"control-link-id-{ord(c):x}",
            _set("node_id", 12, f"node-0{c}"),
            [],
            f"column 'node_id' row 13: series id {ascii('node-0' + c)} differs from 'node-0' only by",
        )
        for c in ("\x00", "\x1b", "\x7f", "\x85")
    ),
    (
        "unicode-form-link-id",
        _set("node_id", 12, "node-\uff10"),
        [],
        "column 'node_id' row 13: series id 'node-\\uff10' differs from 'node-0' only by",
    ),
    ("beyond-float32", _set("rtt_ms", 6, 1e39), [], "column 'rtt_ms' row 7: value 1e+39 is beyond float32 range"),
    ("duplicate-column", lambda df: pd.concat([df, df[["rtt_ms"]]], axis=1), [], "column 'rtt_ms' appears twice"),
    ("window-zero", None, ["--data.window_size=0"], "--data.window_size must be >= 2 (a change needs two rows), got 0"),
    ("split-sum", None, ["--data.split=[0.6,0.2,0.1]"], "--data.split must be three non-negative fractions"),
    ("unknown-feature", None, [f"--data.features=[{','.join(TARGETS)},bogus]"], "missing required column 'bogus'"),
    ("delta-needs-targets", None, ["--data.features=[rtt_ms,queue_depth]"], "needs every target among the features"),
    ("bad-type", None, ["--data.batch_size=many"], 'Parser key "data.batch_size"'),
    ("bad-duplicates-policy", None, ["--data.duplicates=keep"], "duplicates policy must be one of"),
    ("bad-loss", None, ["--model.loss=mae"], "--model.loss must be one of mse, huber, l1, got 'mae'"),
    ("bad-huber-delta", None, ["--model.huber_delta=0"], "--model.huber_delta must be > 0, got 0"),
    # a clean link's loss: nothing to learn, refused before training (a constant *feature* only warns, below)
    (
        "constant-target",
        lambda df: df.assign(packet_loss=0.0),
        [],
        "column 'packet_loss': target is constant on the training split (all 420 training rows are 0)",
    ),
    (
        "constant-on-training-rows",
        lambda df: _constant_while_training(df, "jitter_ms"),
        [],
        "column 'jitter_ms': target is constant on the training split (all 420 training rows are 1.5)",
    ),
]


def _constant_while_training(df: pd.DataFrame, col: str) -> pd.DataFrame:
    """``col`` = 1.5 on the training rows of every link (the first 70 %: 210 of 300), unchanged after them."""
    df.loc[df.groupby(synthetic.LINK_COLUMNS, observed=True).cumcount() < 210, col] = 1.5
    return df


@pytest.mark.parametrize(("case", "spoil", "flags", "expected"), FIT_CASES, ids=[c[0] for c in FIT_CASES])
def test_fit_rejects_bad_input(tmp_path, capsys, case, spoil, flags, expected):
    df = base_frame()
    path = write(tmp_path, spoil(df) if spoil else df)
    with pytest.raises(SystemExit) as exc:
        cli_main(fit_args(tmp_path, f"--data.data_path={path}", *flags))
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and expected in err[0], err
    if spoil is not None:
        assert str(path) in err[0], "the message names the file"
    assert not list(tmp_path.glob("lightning_logs/version_*/checkpoints/*.ckpt"))


@pytest.mark.parametrize(
    ("case", "make", "expected"),
    [
        ("missing-file", lambda d: d / "nope.csv", "nope.csv: file not found"),
        ("empty-file", lambda d: _touch(d / "empty.csv", b""), "empty.csv: file is empty"),
        ("header-only", lambda d: _touch(d / "h.csv", b"a,b\n"), "h.csv: missing required column"),
        ("not-csv", lambda d: _touch(d / "data.json", b"{}"), "unsupported file type '.json'"),
        ("corrupt-parquet", lambda d: _touch(d / "x.parquet", b"PAR1garbage"), "x.parquet: not a readable parquet"),
        ("directory", lambda d: d, "is a directory"),
        # pandas would drop the extra field (usecols) or, on the first row, shift every value one column left
        ("extra-field", lambda d: _extra_field(d, line=7), "bad.csv: line 7 has 23 fields, the header 22"),
        ("extra-field-first-row", lambda d: _extra_field(d, line=2), "bad.csv: row 1 has more fields than the header"),
        # pandas ended the row at the CR: two half-empty rows, blamed on "column 'timestamp' row 41: NaN or empty"
        ("bare-cr-in-id", lambda d: _bare_cr(d, line=41), "bad.csv: line 41 holds a carriage return (CR) inside a"),
        # read as seconds: an rtt_ms of 25 ms became 0.025, trained on silently
        (
            "duration-feature",
            lambda d: _parquet(d, rtt_ms=lambda v: pd.to_timedelta(v, unit="ms")),
            "bad.parquet: column 'rtt_ms' row 1: a duration (timedelta), expected a number",
        ),
        ("fifo", lambda d: _fifo(d / "fifo.csv"), "fifo.csv: not a regular file (a pipe, device or socket)"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_fit_rejects_bad_files(tmp_path, capsys, case, make, expected):
    path = make(tmp_path)
    with pytest.raises(SystemExit) as exc:
        cli_main(fit_args(tmp_path, f"--data.data_path={path}"))
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and expected in err[0], err


def test_lines_that_all_end_in_a_cr_are_read(tmp_path):
    """A file whose lines all end in a bare CR (classic Mac) is no CR inside a field: read as pandas reads it."""
    from dwcp_lstm.tables import read_table

    assert len(read_table(_bare_cr(tmp_path, line=0), ["node_id", "rtt_ms"], text_columns=["node_id"])) == 600


def _word_in_last_row(text: str) -> str:
    """The sidecar with its last row's first oracle value replaced by a word."""
    lines = text.splitlines()
    head, last = lines[0].split(","), lines[-1].split(",")
    last[next(i for i, c in enumerate(head) if c.startswith("oracle_"))] = "fast"
    return "\n".join([*lines[:-1], ",".join(last)]) + "\n"


@pytest.mark.parametrize(
    ("case", "spoil", "expected"),
    [
        ("empty", lambda text: "", "cannot read the oracle sidecar (No columns to parse from file)"),
        (
            "repeated-key",
            lambda text: text + "".join(text.splitlines(keepends=True)[-5:]),
            ": a (series, time) key repeated in the oracle sidecar",
        ),
        ("text", _word_in_last_row, "row 600: not a number in the oracle sidecar"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_fit_refuses_a_broken_oracle_sidecar_before_training(tmp_path, capsys, case, spoil, expected):
    """The report reads ``<data>.oracle.csv`` after training: a broken one raised a pandas traceback there and the
    run lost its report (found by fuzzing). It is read before the first training step now."""
    df, oracle = synthetic.generate_with_oracle(samples=600, seed=1, links=2)
    path = write(tmp_path, df, "d.csv")
    side = synthetic.oracle_path(path)
    oracle.to_csv(side, index=False)
    side.write_text(spoil(side.read_text()))
    with pytest.raises(SystemExit) as exc:
        cli_main(fit_args(tmp_path, f"--data.data_path={path}"))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exc.value.code == 2 and len(err) == 1 and expected in err[0] and "d.oracle.csv" in err[0], err
    assert not list(tmp_path.glob("lightning_logs/version_*/checkpoints/*.ckpt"))


def test_an_oracle_sidecar_left_beside_other_data_is_refused(tmp_path, capsys):
    """Its rows are joined by link and time, which other data of the same size shares: a file replaced by ``cp``
    kept its old sidecar, and fit and report joined it silently (gap closed -0.08 where 0.95 was true). The sidecar
    records its data file's sha256 now; one written by ``generate`` for these bytes is accepted."""
    import shutil

    for seed, folder in ((7, "stale"), (8, "fresh")):
        cli_main(["generate", "--samples", "600", "--links", "2", "--seed", str(seed), "--output",
                  str(tmp_path / folder / "d.csv")])  # fmt: skip
    shutil.copy(tmp_path / "fresh" / "d.csv", tmp_path / "stale" / "d.csv")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli_main(fit_args(tmp_path, f"--data.data_path={tmp_path / 'stale' / 'd.csv'}"))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exc.value.code == 2 and len(err) == 1 and "d.oracle.csv: the oracle sidecar belongs to other data" in err[0]
    from dwcp_lstm.data import DwcpDataModule
    from dwcp_lstm.evaluate import oracle_forecasts

    dm = DwcpDataModule(data_path=str(tmp_path / "fresh" / "d.csv"))
    dm.setup("test")
    assert oracle_forecasts(dm, dm.target_rows("test")) is not None  # its own sidecar: read


def _extra_field(tmp: Path, line: int) -> Path:
    path = write(tmp, base_frame())
    lines = path.read_text().splitlines(keepends=True)
    lines[line - 1] = lines[line - 1].rstrip("\n") + ",1\n"
    path.write_text("".join(lines))
    return path


def _bare_cr(tmp: Path, line: int) -> Path:
    """A CR after the first field of ``line`` (its link id, unquoted); 0: every line ending in a CR alone."""
    path = write(tmp, base_frame()[["node_id", *base_frame().columns.drop("node_id")]])
    lines = path.read_text().splitlines(keepends=True)
    if line:
        lines[line - 1] = lines[line - 1].replace(",", "\r,", 1)
    path.write_bytes("".join(lines).replace("\n", "\n" if line else "\r").encode())
    return path


def _parquet(tmp: Path, **changes) -> Path:
    df = base_frame()
    path = tmp / "bad.parquet"
    df.assign(**{c: f(df[c]) for c, f in changes.items()}).to_parquet(path, index=False)
    return path


def _fifo(path: Path) -> Path:
    import os

    os.mkfifo(path)
    return path


def _touch(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["generate", "--output", "{tmp}/out.txt"], "output must end in .csv or .parquet"),
        (["generate", "--output", "{tmp}/out.csv", "--seed", "-1"], "--seed must be an integer from 0 to 2**32 - 1"),
        (["generate", "--card", "--samples", "0"], "--card needs --samples of at least 1000, got 0"),  # no traceback
        (["generate", "--card", "--samples", "100"], "--card needs --samples of at least 1000, got 100"),  # NaN table
        (["generate", "--card", "--links", "-1"], "--card prints the data card of --samples and --seed only; --links"),
        (["generate", "--card", "--output=x.csv"], "data card of --samples and --seed only; --output does not apply"),
        (["generate", "--output", "{tmp}/d.oracle.csv"], "d.oracle.csv: a name ending in .oracle.csv is the oracle"),
        (["generate", "--card", "--seed", "-1"], "--seed must be an integer from 0 to 2**32 - 1"),
        # found before generating (it used to generate, then fail with a misleading "File exists")
        (["generate", "--output", "/dev/null/x.csv"], "/dev/null/x.csv: cannot create folder /dev/null"),
        (["generate", "--output", "{tmp}/out.csv", "--samples", "1"], "--samples must be from 2 to 50,000,000, got 1"),
        (["generate", "--output", "{tmp}/out.csv", "--samples", "100000000000"], "--samples must be from 2 to"),
        (["generate", "--output", "{tmp}/out.csv", "--noise", "0.3"], "--noise must be from 0 to 0.1"),
        (["generate", "--output", "{tmp}/out.csv", "--profile", "seed", "--links", "3"], "the seed profile writes one"),
        # ignored: the file was byte-identical to the one without it
        (["generate", "--output", "{tmp}/o.csv", "--profile", "seed", "--noise", "0.05"], "--noise applies to the dyn"),
        (["generate", "--output", "{tmp}/out.csv", "--oracle-steps", "100000"], "--oracle-steps must be from 1 to 288"),
        (["bench", "--quick", "--skip-load", "--rows", "100000000000"], "--rows must be from 1000 to 50,000,000"),
        (["bench", "--quick", "--skip-load", "--threads", "99999999999"], "--threads must be from 1 to 1024"),
        (["fit", "--threads", "100000"], "--threads must be from 1 to 1024, got 100000"),
        (["generate", "--output", "{tmp}/out.csv", "--links", "0"], "--links must be between 1"),
        # the sidecar's steps were ignored, silently, without the sidecar
        (["generate", "--output", "{tmp}/out.csv", "--oracle", "false", "--oracle-steps", "5"], "--oracle-steps sets"),
        (["report", "--run", "{tmp}/no_such_run"], "no_such_run: run directory not found"),
        (["report", "--run", "{tmp}"], "config.yaml: file not found"),
        # '' is the working directory: its model.onnx was read (or "model.onnx: file not found" named no flag)
        (["report", "--run", ""], "--run must name a run directory, got ''"),
        (["export", "--run", ""], "--run must name a run directory, got ''"),
        (["bench", "--quick", "--skip-load", "--run", " "], "--run must name a run directory"),
        (["forecast", "--model", "", "--input", "{tmp}/x.csv"], "--model must name a model.onnx or a run directory"),
        (["forecast", "--model", "{tmp}", "--input", ""], "--input must name a telemetry .csv or .parquet file"),
        (["plan", "--model", "", "--input", "{tmp}/x.csv", "--memory-gib", "8"], "--model must name a model.onnx"),
        (["plan", "--model", "{tmp}", "--input", "", "--memory-gib", "8"], "--input must name a telemetry .csv"),
        (["bench", "--quick", "--skip-load", "--output", "{tmp}/no_dir/b.json"], "folder {tmp}/no_dir does not exist"),
        (["bench", "--quick", "--skip-load", "--output", "{tmp}"], "{tmp}: is a directory, expected a file name"),
    ],
)
def test_other_commands_reject_bad_input(tmp_path, capsys, argv, expected):
    with pytest.raises(SystemExit) as exc:
        cli_main([a.format(tmp=tmp_path) for a in argv])
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and expected.format(tmp=tmp_path) in err[0], err


def test_a_thread_count_from_the_environment_is_named_as_such(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "99999")  # read by resolve_threads when --threads is not given
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", f"--trainer.default_root_dir={tmp_path}"])
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert err == ["error: the environment variable OMP_NUM_THREADS must be from 1 to 1024, got 99999"], err


def test_bench_checks_its_output_before_benchmarking(tmp_path, monkeypatch, capsys):
    from dwcp_lstm import bench

    monkeypatch.setattr(bench, "run_bench", lambda *a: pytest.fail("benchmarked before checking --output"))
    with pytest.raises(SystemExit) as exc:
        cli_main(["bench", "--quick", "--output", str(tmp_path / "missing" / "b.json")])
    assert exc.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_generate_never_leaves_a_half_written_file(tmp_path):
    out = tmp_path / "d.csv"
    cli_main(["generate", "--output", str(out), "--samples", "600"])
    before = out.read_bytes()
    with pytest.raises(SystemExit):
        cli_main(["generate", "--output", str(out), "--samples", "1"])
    assert out.read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))


def test_no_traceback_from_the_real_entry_point(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dwcp_lstm", "fit", f"--data.data_path={tmp_path / 'missing.csv'}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'missing.csv'}: file not found"


def test_unsorted_rows_are_sorted_with_a_warning(tmp_path, small_csv, caplog):
    from dwcp_lstm.data import DwcpDataModule

    df = pd.read_csv(small_csv)
    shuffled = write(tmp_path, df.sample(frac=1.0, random_state=0))
    a, b = DwcpDataModule(data_path=str(small_csv)), DwcpDataModule(data_path=str(shuffled))
    a.setup("fit")
    b.setup("fit")
    assert (a.datasets["train"].x == b.datasets["train"].x).all()
    assert "not sorted" in caplog.text


def test_gaps_split_a_series_and_windows_never_cross_them(tmp_path, caplog):
    from dwcp_lstm.data import DwcpDataModule

    df = base_frame()
    first = df["node_id"] == df["node_id"].iloc[0]
    df.loc[first & (df.index >= 150), "timestamp"] += 100 * 300  # a 100-step hole in link 1
    dm = DwcpDataModule(data_path=str(write(tmp_path, df)))
    dm.setup("fit")
    assert len(dm.bounds) == 3 and "gaps" in caplog.text
    for stage in ("train", "val", "test"):
        s = dm.starts[stage]
        assert (dm.segment_of_row[s] == dm.segment_of_row[s + dm.window_size]).all()
        steps = np.diff(dm.timestamps[s[:, None] + np.arange(dm.window_size + 1)], axis=1)
        assert steps.max() <= 300


def test_short_links_are_skipped_with_a_warning(tmp_path, caplog):
    from dwcp_lstm.data import DwcpDataModule

    df = base_frame()
    short = df[df["node_id"] == df["node_id"].iloc[-1]].head(10)
    df = pd.concat([df[df["node_id"] == df["node_id"].iloc[0]], short])
    dm = DwcpDataModule(data_path=str(write(tmp_path, df)))
    dm.setup("fit")
    assert len(dm.bounds) == 1 and "skipped 1 of 2" in caplog.text


def test_a_constant_feature_only_warns(tmp_path, caplog):
    """A feature that never changes on the training rows carries nothing, but the other inputs still do: a warning,
    not an error (only targets are refused)."""
    from dwcp_lstm.data import DwcpDataModule

    dm = DwcpDataModule(data_path=str(write(tmp_path, base_frame().assign(queue_depth=5.0))))
    dm.setup("fit")
    assert "column 'queue_depth' is constant on the training rows" in caplog.text


def test_a_constant_target_is_refused_for_training_only(tmp_path):
    """Evaluating a trained model on other data scales with the model's scalers: a target that is constant on that
    data's first rows is no reason to refuse (``setup("test")``), only to train on it (``setup("fit")``)."""
    from dwcp_lstm.data import DwcpDataModule
    from dwcp_lstm.tables import DataError

    path = str(write(tmp_path, base_frame().assign(packet_loss=0.0)))
    DwcpDataModule(data_path=path).setup("test")
    with pytest.raises(DataError, match="'packet_loss': target is constant on the training split"):
        DwcpDataModule(data_path=path).setup("fit")


def test_a_target_constant_in_float32_is_refused_like_a_constant_one(tmp_path):
    """0.02 + 1e-12 noise is one value to the float32 model: it passed the exact comparison and trained, the scaler
    dividing the noise by its own tiny spread (the report: packet_loss +30,855 % vs persistence)."""
    from dwcp_lstm.data import DwcpDataModule
    from dwcp_lstm.tables import DataError

    df = base_frame()
    df["packet_loss"] = 0.02 + 1e-12 * np.random.default_rng(0).standard_normal(len(df))
    path = tmp_path / "f32.csv"
    df.to_csv(path, index=False, float_format="%.17g")
    assert pd.read_csv(path)["packet_loss"].nunique() > 1
    with pytest.raises(DataError, match=r"'packet_loss': target is constant on the training split \(all \d+ "
                       r"training rows are 0.02 to float32 precision"):  # fmt: skip
        DwcpDataModule(data_path=str(path)).setup("fit")


@pytest.mark.parametrize(("policy", "rows"), [("first", 600), ("mean", 600)])
def test_duplicate_policies(tmp_path, policy, rows):
    from dwcp_lstm.data import DwcpDataModule

    df = base_frame()
    dup = df.iloc[[10]].copy()
    dup["rtt_ms"] += 10
    dm = DwcpDataModule(data_path=str(write(tmp_path, pd.concat([df, dup]))), duplicates=policy)
    dm.setup("fit")
    assert len(dm.raw_targets) == rows
    j = dm.targets.index("rtt_ms")
    expected = df["rtt_ms"].iloc[10] + (5 if policy == "mean" else 0)
    assert dm.raw_targets[10, j] == pytest.approx(expected)


def test_non_finite_loss_stops_training_without_a_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(fit_args(tmp_path, "--model.optimizer.init_args.lr=1e12", "--trainer.max_epochs=1"))
    assert exc.value.code == 3
    err = capsys.readouterr().err
    assert "non-finite training loss" in err
    assert not list(tmp_path.glob("lightning_logs/version_*/checkpoints/*.ckpt"))


def test_duplicate_parquet_columns_are_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dwcp_lstm.tables import DataError, read_table

    path = tmp_path / "dup.parquet"
    pq.write_table(pa.Table.from_arrays([pa.array([1.0]), pa.array([2.0])], names=["rtt_ms", "rtt_ms"]), path)
    with pytest.raises(DataError, match="column 'rtt_ms' appears twice"):
        read_table(path, ["rtt_ms"])


def test_parquet_with_lying_pandas_metadata_or_nested_ids_is_refused(tmp_path):
    """Found by fuzzing: pandas metadata naming a missing index column, a dtype that does not exist, or a string
    dtype over a list column raised KeyError / TypeError / ArrowNotImplementedError tracebacks; a list column of
    link ids (no metadata) a TypeError in the grouping."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from dwcp_lstm.tables import DataError, order_series, read_table

    df = pd.DataFrame({"node_id": ["a", "b"], "timestamp": [1, 2], "rtt_ms": [1.0, 2.0]})
    table = pa.Table.from_pandas(df, preserve_index=False)
    meta = json.loads(table.schema.metadata[b"pandas"])
    spoiled = {
        "index": {**meta, "index_columns": ["nope"]},
        "dtype": {**meta, "columns": [{**c, "numpy_type": "bogus"} for c in meta["columns"]]},
    }
    for name, lie in spoiled.items():
        pq.write_table(table.replace_schema_metadata({b"pandas": json.dumps(lie).encode()}), tmp_path / f"{name}.pq")
    listed = table.set_column(0, "node_id", pa.array([[1], [2]]))  # keeps the metadata: a string column
    pq.write_table(listed, tmp_path / "cast.pq")
    for name in (*spoiled, "cast"):
        with pytest.raises(DataError, match=rf"{name}\.pq: not a readable parquet file \(pandas cannot rebuild"):
            read_table(tmp_path / f"{name}.pq", ["node_id", "rtt_ms"], text_columns=["node_id"])
    pq.write_table(listed.replace_schema_metadata(None), tmp_path / "nested.pq")
    got = read_table(tmp_path / "nested.pq", text_columns=["node_id"])
    with pytest.raises(DataError, match=r"column 'node_id' row 1: series id array\(\[1\]\) is a ndarray"):
        order_series(got, ["node_id"], "timestamp", "nested.pq")


def test_a_target_that_never_changes_on_the_test_split_is_reported_as_undefined(tmp_path):
    """Links whose loss goes clean after the training rows (packet_loss 0 from the validation split on; a target
    constant on the *training* split is refused, see FIT_CASES) train, and the report calls the test figures that
    need variance or a non-zero mean undefined (null in strict JSON) instead of crashing after the compute is spent."""
    import json

    df = synthetic.generate(samples=1200, links=2, seed=3)  # 2 links x 600 rows: training rows 0..419 of each
    row_in_link = df.groupby(synthetic.LINK_COLUMNS, observed=True).cumcount()
    df.loc[row_in_link >= 420, "packet_loss"] = 0.0  # the whole 20-row history of every test window is 0 too
    path = write(tmp_path, df)
    cli_main(fit_args(tmp_path, f"--data.data_path={path}", "--trainer.max_epochs=1"))
    run = sorted((tmp_path / "lightning_logs").glob("version_*"))[-1]
    text = (run / "report.json").read_text()
    report = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in report.json"))
    loss = report["per_target"]["packet_loss"]
    assert loss["correlation"] is None and loss["r2"] is None and loss["wape"] is None and loss["mape"] is None
    assert loss["rmse"] >= 0 and report["skill"]["packet_loss"] is None
    assert loss["rmse_over_mean"] is None and loss["mae_over_mean"] is None  # the test mean is 0
    assert report["overall"]["undefined"]["correlation"] == ["packet_loss"]
    assert report["overall"]["undefined"]["rmse_over_mean"] == ["packet_loss"]
    assert report["overall"]["average_correlation"] is not None  # the mean of the defined ones
    assert (run / "report.md").exists() and (run / "model.onnx").exists()


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ("data: 5\n", "'data' must be a mapping"),
        ("data:\n  window_size: 5\n", "data.window_size is 5, the checkpoint best.ckpt was trained with 20"),
        ("data: [unclosed\n", "not valid YAML"),
        # the file is named: a run folder holds several, and the key alone does not say which one is wrong
        ("data:\n  windw_size: 20\n", "config.yaml: Group 'data' does not accept option 'windw_size'"),
        ("data:\n  window_size: 1\n", "config.yaml: --data.window_size must be >= 2"),
    ],
)
def test_report_refuses_a_run_config_that_does_not_match_its_checkpoint(tmp_path, smoke_run, capsys, config, expected):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    (run / "config.yaml").write_text(config)
    before = (run / "report.json").read_bytes()
    with pytest.raises(SystemExit) as exc:
        cli_main(["report", "--run", str(run)])
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and expected in err[0], err
    assert (run / "report.json").read_bytes() == before


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        # the module was built first: 36 GB for its example input, then "can't allocate memory"
        ("window_size", 10**9, "config.yaml: data.window_size is 20, the checkpoint best.ckpt was trained with 10000"),
        ("lstm_sizes", [10**6], "best.ckpt: its model.lstm_sizes is [1000000], but the run's config.yaml records"),
        # the message ended at jsonargparse's first line, "Parser key "module.optimizer":", saying nothing
        ("optimizer", {"class_path": "os.system"}, 'Parser key "module.optimizer": Type'),
    ],
    ids=["huge-window", "huge-layer", "optimizer-function"],
)
def test_tampered_checkpoint_hyperparameters_are_refused_before_the_model_is_built(
    tmp_path, smoke_run, capsys, key, value, expected
):
    import shutil

    import torch

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    ckpt = run / "checkpoints" / "best.ckpt"
    contents = torch.load(ckpt, weights_only=True)
    contents["hyper_parameters"][key] = value
    torch.save(contents, ckpt)
    before = (run / "model.onnx").read_bytes()
    with pytest.raises(SystemExit) as exc:
        cli_main(["export", "--run", str(run)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exc.value.code == 2 and len(err) == 1 and expected in err[0], err
    if key == "optimizer":
        assert "Importing 'os.system' is not allowed" in err[0]
    assert (run / "model.onnx").read_bytes() == before


@pytest.mark.parametrize("command", ["export", "report"])
def test_a_checkpoint_with_nan_weights_is_refused_and_replaces_nothing(tmp_path, smoke_run, capsys, command):
    """``export --run`` replaced a working model.onnx with a NaN one and wrote ``"max_rel_diff": NaN`` (not JSON);
    ``report --run`` printed "mean correlation nan ... target met: False", exit 0."""
    import shutil

    import torch

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    ckpt = run / "checkpoints" / "best.ckpt"
    contents = torch.load(ckpt, weights_only=True)
    name = next(k for k in contents["state_dict"] if k.endswith("weight_ih_l0"))
    contents["state_dict"][name] = torch.full_like(contents["state_dict"][name], float("nan"))
    torch.save(contents, ckpt)
    kept = ("model.onnx", "model_metadata.json", "report.json", "report.md")
    before = {n: (run / n).read_bytes() for n in kept}
    with pytest.raises(SystemExit) as exc:
        cli_main([command, "--run", str(run)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exc.value.code == 2 and len(err) == 1, err
    assert f"best.ckpt: the weight {name} holds NaN or infinite values" in err[0], err
    assert {n: (run / n).read_bytes() for n in kept} == before


@pytest.mark.parametrize("bad", ["weights", "parity"])
def test_an_export_with_non_finite_weights_or_parity_keeps_the_files_in_place(tmp_path, smoke_run, monkeypatch, bad):
    """The fit-end export (``OnnxExport`` calls ``export_run``) and ``export --run`` alike: a diverged model, or a
    NaN parity figure, is refused before model.onnx or model_metadata.json is replaced, and no JSON holds NaN."""
    import shutil

    import torch

    from dwcp_lstm import callbacks
    from dwcp_lstm.errors import DwcpError
    from dwcp_lstm.runs import load_run

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    module, dm, _ = load_run(run)
    if bad == "weights":
        with torch.no_grad():
            next(module.parameters()).fill_(float("inf"))
        expected = "model.onnx: not exported: the weight"
    else:
        real = callbacks.onnx_parity
        monkeypatch.setattr(callbacks, "onnx_parity", lambda *a: {**real(*a), "max_rel_diff": float("nan")})
        expected = "model.onnx: not exported: model_metadata.json would hold a non-finite parity.max_rel_diff"
    before = {n: (run / n).read_bytes() for n in ("model.onnx", "model_metadata.json")}
    with pytest.raises(DwcpError, match=expected):
        callbacks.export_run(module, dm, run)
    assert {n: (run / n).read_bytes() for n in before} == before
    assert not list(run.glob(".export-*"))  # the staging folder is gone
    json.loads((run / "model_metadata.json").read_text(), parse_constant=lambda c: pytest.fail(f"JSON holds {c}"))


@pytest.mark.parametrize("dtype", [np.uint64, np.int64])
def test_rows_out_of_order_are_found_whatever_the_time_dtype(dtype, caplog):
    """A difference of unsigned times wraps around (and one of extreme int64 times overflows) into a step >= 0: rows
    out of order read as sorted, forecasts then came from a scrambled window. Compared, not subtracted, now."""
    from dwcp_lstm.tables import order_series

    start = np.iinfo(np.int64).max - 10**6 if dtype == np.int64 else 1_762_000_000
    t = (start + 300 * np.array([0, 1, 3, 2, 4])).astype(dtype)
    df = pd.DataFrame({"link": ["a"] * 5, "timestamp": t, "x": [0.0, 1.0, 3.0, 2.0, 4.0]})
    out = order_series(df, ["link"], "timestamp", "t.parquet")
    assert out["x"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert "rows are not sorted" in caplog.text


def test_report_compares_the_settings_before_generating_any_data(tmp_path, smoke_run, capsys):
    """An edited config.yaml (other synthetic data, in another folder) made ``report`` generate that data wherever
    the config said, then refuse the run: with 50M rows, minutes and gigabytes for nothing (found by fuzzing)."""
    import shutil

    import yaml

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    elsewhere = tmp_path / "elsewhere" / "deep"
    cfg["data"].update(data_path=None, data_dir=str(elsewhere))
    cfg["data"]["synthetic"]["samples"] = 300
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as exc:
        cli_main(["report", "--run", str(run)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exc.value.code == 2 and len(err) == 1 and "data.synthetic" in err[0], err
    assert not elsewhere.exists()


@pytest.mark.parametrize(("key", "value"), [("split", [0.15, 0.15, 0.7]), ("max_gap", 0.0), ("seed", 7)])
def test_report_and_export_refuse_a_config_edited_after_training(tmp_path, smoke_run, capsys, key, value):
    """The test split would hold training rows (split), the exported contract stop splitting links at gaps (max_gap):
    silently, before. Where the data lives and how it is batched may still change."""
    import shutil

    import yaml

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    trained = cfg["data"][key]
    cfg["data"].update({key: value, "num_workers": 1, "batch_size": 16})
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    before = {n: (run / n).read_bytes() for n in ("report.json", "model.onnx", "model_metadata.json")}
    for command in ("report", "export"):
        with pytest.raises(SystemExit) as exc:
            cli_main([command, "--run", str(run)])
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert exc.value.code == 2 and len(err) == 1, err
        assert f"config.yaml: data.{key} is {value!r}, the checkpoint best.ckpt was trained with {trained!r}" in err[0]
    assert before == {n: (run / n).read_bytes() for n in before}


# "billion laughs": each level ten aliases of the one before; 9 levels expand to 10**9 values (jsonargparse copied
# them: over 2 GB and no end)
BOMB = (
    "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n"
    + "".join(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9))
).encode()


@pytest.mark.parametrize(
    ("name", "data", "expected"),
    [
        ("config.yaml", b"data: \xff\xfe bad\n", "config.yaml: not UTF-8 text"),
        ("config.yaml", b"data: " + b"[" * 20000 + b"]" * 20000, "config.yaml: not"),
        ("model_metadata.json", b"[" * 100000 + b"]" * 100000, "model_metadata.json: not valid JSON"),
        ("config.yaml", BOMB, "config.yaml: the YAML expands to more than 100,000 values"),
        ("config.yaml", b"data:\n  seed: 1\nmodel: {}\ndata:\n  seed: 2\n", "config.yaml: line 4: key 'data' appears"),
    ],
    ids=["config-not-utf8", "config-nested", "metadata-nested", "config-alias-bomb", "config-key-twice"],
)
def test_hostile_run_files_are_one_line_errors(tmp_path, smoke_run, capsys, name, data, expected):
    """Each used to end in a UnicodeDecodeError or RecursionError traceback."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    (run / name).write_bytes(data)
    command = (
        ["report", "--run", str(run)]
        if name == "config.yaml"
        else ["forecast", "--model", str(run), "--input", str(tmp_path / "none.csv")]
    )
    with pytest.raises(SystemExit) as exc:
        cli_main(command)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exc.value.code == 2 and len(err) == 1 and expected in err[0], err


def test_integer_times_beyond_float_precision_keep_their_cadence(caplog):
    """Near 2**62 a float64 time is 1024 s coarse: a regular 300 s link read as a run of gaps, then was refused
    with "no series has at least 21 rows". Integer steps are now taken exactly."""
    from dwcp_lstm.tables import segment_bounds, time_steps

    t = np.int64(2**62) + 300 * np.arange(60, dtype=np.int64)
    df = pd.DataFrame({"link": ["a"] * 60, "timestamp": t})
    assert segment_bounds(df, ["link"], "timestamp", 21, 3.0, "t.csv").tolist() == [[0, 60]]
    assert "gaps" not in caplog.text
    np.testing.assert_array_equal(time_steps(t), np.full(59, 300.0))
    np.testing.assert_array_equal(time_steps(t.astype(np.uint64)), np.full(59, 300.0))


def test_a_step_of_exactly_max_gap_cadences_is_not_a_gap():
    """Training (``segment_bounds``) and serving (``Predictor``) cut links by one rule, ``tables.is_gap``: a step of
    exactly ``max_gap`` x the cadence stays, anything longer splits the link; ``max_gap <= 0`` never splits."""
    from dwcp_lstm.tables import is_gap, segment_bounds

    steps = np.full(40, 300.0)
    steps[[10, 25]] = [900.0, 900.5]  # 3.0 x and just over 3 x the 300 s cadence
    t = np.r_[0.0, np.cumsum(steps)]
    df = pd.DataFrame({"link": ["a"] * len(t), "timestamp": t})
    assert segment_bounds(df, ["link"], "timestamp", 1, 3.0, "t.csv").tolist() == [[0, 26], [26, 41]]
    np.testing.assert_array_equal(np.flatnonzero(is_gap(steps, 300.0, 3.0)), [25])
    assert not is_gap(steps, 300.0, 0.0).any() and not is_gap(np.array([np.nan]), 300.0, 3.0).any()


def test_report_refuses_a_data_file_that_changed_since_training(tmp_path, smoke_run, capsys):
    """A truncated file put the model's training rows into the test split (and the calibration's validation rows
    elsewhere): report.json overwritten with flattering figures. The checkpoint records the file's sha256; a moved
    but identical file is fine."""
    import shutil

    import yaml

    from dwcp_lstm.runs import datamodule_from_config

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    source = datamodule_from_config(run / "config.yaml").path
    moved, cut = tmp_path / "moved.csv", tmp_path / "cut.csv"
    shutil.copy(source, moved)
    pd.read_csv(source).groupby(["node_id", "peer_id"]).head(300).to_csv(cut, index=False)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    before = (run / "report.json").read_bytes()
    cfg["data"]["data_path"] = str(cut)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as exc:
        cli_main(["report", "--run", str(run)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exc.value.code == 2 and len(err) == 1 and "cut.csv: the file changed since the checkpoint" in err[0], err
    assert (run / "report.json").read_bytes() == before
    cfg["data"]["data_path"] = str(moved)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    cli_main(["export", "--run", str(run)])  # the same bytes elsewhere: accepted


@pytest.mark.parametrize("command", ["report", "export"])
def test_a_run_config_naming_another_csv_is_refused_unread(tmp_path, smoke_run, capsys, command):
    """A tampered config.yaml whose data_path named any CSV had that file parsed and its header echoed ("missing
    required column 'node_id' (has: 'secret_col_A', ...)"). The checkpoint's sha256 is compared before parsing."""
    import shutil

    import yaml

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    other = tmp_path / "other.csv"
    other.write_text("secret_col_A,secret_col_B\n1,2\n")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["data_path"] = str(other)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as exc:
        cli_main([command, "--run", str(run)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exc.value.code == 2 and len(err) == 1 and "other.csv: the file changed since the checkpoint" in err[0], err
    assert "secret_col" not in err[0]


def test_a_config_file_of_aliases_without_end_is_one_line(tmp_path, capsys):
    cfg = _touch(tmp_path / "bomb.yaml", BOMB)
    with pytest.raises(SystemExit) as exc:
        cli_main(fit_args(tmp_path, "--config", str(cfg)))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exc.value.code == 2 and len(err) == 1 and "the YAML expands to more than 100,000 values" in err[0], err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # PyYAML keeps the last of two equal keys: the second data section replaced the first, data_path with it,
        # and the run trained on the built-in data instead of the user's file, exit 0
        (
            "data:\n  data_path: x.csv\ntrainer:\n  max_epochs: 1\ndata:\n  batch_size: 32\n",
            "line 5: key 'data' appears twice in one section",
        ),
        ("trainer:\n  max_epochs: 1\n  max_epochs: 2\n", "line 3: key 'max_epochs' appears twice"),
        # jsonargparse said "Unexpected config: <the text>", naming no file
        ("", "the config is empty (or only comments); expected a mapping of settings"),
        ("# just a comment\n", "the config is empty (or only comments)"),
        ("hello\n", "the config is a str, 'hello'; expected a mapping"),
        ("- a\n- b\n", "the config is a list, ['a', 'b']; expected a mapping"),
    ],
    ids=["section-twice", "key-twice", "empty", "comment-only", "scalar", "list"],
)
def test_a_config_file_that_is_not_one_mapping_of_settings_is_one_line(tmp_path, capsys, text, expected):
    cfg = _touch(tmp_path / "c.yaml", text.encode())
    with pytest.raises(SystemExit) as exc:
        cli_main(fit_args(tmp_path, "--config", str(cfg)))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exc.value.code == 2 and len(err) == 1 and f"{cfg}: {expected}" in err[0], err
    assert not list(tmp_path.glob("lightning_logs/version_*"))


@pytest.mark.parametrize("form", ["separate", "equals"])
def test_a_config_file_that_is_not_text_is_one_line(tmp_path, capsys, form):
    """``fit --config`` with a binary file ended in jsonargparse's UnicodeDecodeError, naming no file."""
    cfg = _touch(tmp_path / "bin.yaml", b"\xff\xfe\x00bad")
    flag = ["--config", str(cfg)] if form == "separate" else [f"--config={cfg}"]
    with pytest.raises(SystemExit) as exc:
        cli_main(fit_args(tmp_path, *flag))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exc.value.code == 2 and len(err) == 1 and f"{cfg}: not UTF-8 text" in err[0], err


NESTED_CONTENTS = {  # (a data section's text, a synthetic section's text, the expected refusal)
    "not-utf8": (b"batch_size: 32\n\xff\xfe\n", b"samples: 2000\n\xff\xfe\n", "not UTF-8 text"),
    "key-twice": (b"batch_size: 32\nbatch_size: 16\n", b"samples: 2000\nsamples: 3000\n", "line 2: key"),
    "alias-bomb": (BOMB, BOMB, "the YAML expands to more than 100,000 values"),
}


@pytest.mark.parametrize("content", list(NESTED_CONTENTS))
@pytest.mark.parametrize("where", ["--data", "--data.synthetic", "data-in-config", "synthetic-in-config"])
def test_a_group_given_as_a_file_gets_the_checks_of_a_config_file(tmp_path, capsys, where, content):
    """jsonargparse reads a group given as a file path itself: a non-UTF-8 one was a UnicodeDecodeError traceback,
    a key written twice was taken silently (the last), and an alias bomb took a minute of CPU."""
    data, synthetic, expected = NESTED_CONTENTS[content]
    nested = _touch(tmp_path / "nested.yaml", synthetic if "synthetic" in where else data)
    if where.endswith("-in-config"):
        text = f"data: {nested}\n" if where == "data-in-config" else f"data:\n  synthetic: {nested}\n"
        flags = ["--config", str(_touch(tmp_path / "outer.yaml", text.encode()))]
    else:
        flags = [where, str(nested)]
    with pytest.raises(SystemExit) as exc:
        cli_main(fit_args(tmp_path, *flags))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exc.value.code == 2 and len(err) == 1 and f"{nested}: {expected}" in err[0], err
    assert not list(tmp_path.glob("lightning_logs/version_*"))


@pytest.mark.parametrize("content", [b"samples: 2000\n", b"samples: 2000\n\xff\xfe\n", b"secret_key: 1\n"])
def test_a_run_config_naming_another_file_is_refused_unread(tmp_path, smoke_run, capsys, content):
    """A run's config.yaml is written by the fit with every section inline: ``synthetic: /any/file`` made ``report``
    read any YAML file on the machine (a traceback where it was not UTF-8) and echo its keys in the error."""
    import shutil

    import yaml

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    other = _touch(tmp_path / "other.yaml", content)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["synthetic"] = str(other)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as exc:
        cli_main(["report", "--run", str(run)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exc.value.code == 2 and len(err) == 1, err
    assert f"config.yaml: data.synthetic is '{other}', a file name; a run's config.yaml holds" in err[0], err
    assert "secret_key" not in err[0]


def test_a_run_config_cannot_make_the_parser_read_a_file(tmp_path):
    """Beyond ``data.synthetic``: whatever group a run's config.yaml would have jsonargparse read from a file."""
    from jsonargparse import ArgumentParser

    from dwcp_lstm.data import SyntheticSpec
    from dwcp_lstm.imports import config_files_checked

    other = _touch(tmp_path / "other.yaml", b"samples: 2000\n")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(SyntheticSpec, "synthetic")
    refused = pytest.raises(ConfigError, match=f"run/config.yaml: a setting names the file {other}")
    with refused, config_files_checked("run/config.yaml"):
        parser.parse_object({"synthetic": str(other)})
    with config_files_checked():  # a command's own flags and --config files may name one
        assert parser.parse_object({"synthetic": str(other)}).synthetic.samples == 2000


@pytest.mark.parametrize("name", ["model_metadata.json", "model.onnx"])
def test_bench_output_never_replaces_the_runs_own_files(tmp_path, smoke_run, capsys, name):
    """``bench --output`` wrote its JSON over the run's model_metadata.json (and would have over model.onnx), after
    the whole benchmark (found by fuzzing)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    before = (run / name).read_bytes()
    with pytest.raises(SystemExit) as exc:
        cli_main(["bench", "--run", str(run), "--quick", "--skip-load", "--output", str(run / name)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    expected = "the run's own model_metadata.json" if name.endswith(".json") else "--output must end in .json"
    assert exc.value.code == 2 and len(err) == 1 and expected in err[0], err
    assert (run / name).read_bytes() == before


def test_generate_without_the_oracle_removes_the_previous_files_sidecar(tmp_path, capsys):
    """The sidecar is joined to the data by (link, time) only: another seed's oracle matched every row, and the
    report's oracle and gap closed were silently wrong (found by fuzzing)."""
    out = tmp_path / "x.csv"
    args = ["generate", "--samples", "2000", "--links", "1", "--output", str(out)]
    cli_main(args)
    assert synthetic.oracle_path(out).is_file()
    cli_main([*args, "--seed", "7", "--oracle", "false"])
    assert not synthetic.oracle_path(out).exists() and "x.oracle.csv: the oracle of the data" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "data"), [("model_metadata.json", b"{bad"), ("model.onnx", b"garbage")])
def test_report_of_a_run_with_a_damaged_model_is_written_without_the_onnx_figures(tmp_path, smoke_run, caplog,
                                                                                   name, data):  # fmt: skip
    """The report's ONNX figures read the pair unchecked: a damaged one raised a JSON or protobuf traceback after
    the whole evaluation, and no report was written (found by fuzzing). Now the same checks as ``forecast``."""
    import json
    import shutil

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    (run / name).write_bytes(data)
    (run / "report.json").unlink()
    cli_main(["report", "--run", str(run)])
    assert json.loads((run / "report.json").read_text())["onnx"] is None
    assert f"{name}" in caplog.text and "the report leaves out the ONNX figures" in caplog.text


def test_report_does_not_vouch_for_another_models_onnx_pair(tmp_path, smoke_run, caplog):
    """Another run's model.onnx + model_metadata.json copied into a run: a consistent pair, so every check of
    ``forecast`` passed and the report printed the pair's own parity figure, 1e-7, as this run's (found by fuzzing).
    The report now measures the parity against the run's checkpoint."""
    import json
    import shutil

    import torch

    from dwcp_lstm.callbacks import export_run
    from dwcp_lstm.runs import load_run

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    module, dm, _ = load_run(run)
    other = tmp_path / "other"
    other.mkdir()
    with torch.no_grad():
        for p in module.net.parameters():
            p.add_(0.05 * torch.randn_like(p))  # another training run of the same contract
    export_run(module, dm, other, parity_windows=64)
    for name in ("model.onnx", "model_metadata.json"):
        shutil.copy(other / name, run / name)
    cli_main(["report", "--run", str(run)])
    assert json.loads((run / "report.json").read_text())["onnx"] is None
    assert "differ from the run's checkpoint's" in caplog.text and "not this run's model" in caplog.text
    shutil.copytree(smoke_run, run, dirs_exist_ok=True)  # its own pair: measured, and within the limit
    cli_main(["report", "--run", str(run)])
    onnx = json.loads((run / "report.json").read_text())["onnx"]
    assert onnx["parity_max_rel"] < 1e-4 and onnx["parity_windows"] > 0


def test_an_edited_model_setting_in_a_runs_config_is_named(tmp_path, smoke_run, caplog):
    """The model comes from the checkpoint: an edited ``model.interval_levels`` in config.yaml changed nothing in the
    report, silently, while report.json echoed the edited file (found by fuzzing). Now a warning names it."""
    import shutil

    import yaml

    from dwcp_lstm.runs import load_run

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    load_run(run)
    assert "the checkpoint's value is used" not in caplog.text  # the run as written: nothing to say
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["interval_levels"] = [0.5, 0.99]
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    load_run(run)
    assert "model.interval_levels is [0.5, 0.99], but the checkpoint" in caplog.text
    assert "the checkpoint's value is used" in caplog.text


def test_an_artifact_name_taken_by_a_folder_is_named_in_the_error(tmp_path):
    """A folder named report.json: the error named the temporary file (.report.json.<pid>-<hex>.tmp)."""
    from dwcp_lstm.tables import atomic_write

    (tmp_path / "report.json").mkdir()
    with pytest.raises(IsADirectoryError) as exc:
        atomic_write(tmp_path / "report.json", "{}")
    assert exc.value.filename == str(tmp_path / "report.json")
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temporary file left


def test_report_refuses_a_folder_named_like_its_report_before_writing(tmp_path, smoke_run, capsys):
    """Found by fuzzing: a folder named report.md failed ``report`` after the evaluation had replaced report.json
    and the plots (exit 1, a stale report.md beside them). Refused before any work now, nothing written."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    (run / "report.md").unlink()
    (run / "report.md").mkdir()
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(SystemExit) as exc:
        cli_main(["report", "--run", str(run)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exc.value.code == 2 and err == [f"error: {run / 'report.md'}: is a directory, expected a file; nothing "
                                           "written"], err  # fmt: skip
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_a_link_named_na_is_a_name(tmp_path):
    """pandas reads NA, None, null... as missing: links so named were refused as "empty series id" (found by
    fuzzing). In the id columns only an empty cell is missing; in number columns those words still are."""
    from dwcp_lstm.tables import read_table

    path = tmp_path / "na.csv"
    path.write_text("link,t,x\nNA,0,1\nNA,1,NA\nnull,0,\n,1,2\n")
    df = read_table(path, ["link", "t", "x"], text_columns=["link"])
    assert df["link"].tolist()[:3] == ["NA", "NA", "null"] and pd.isna(df["link"].iloc[3])
    assert df["x"].isna().tolist() == [False, True, True, False]


def test_a_parser_message_quoting_a_huge_value_is_cut(tmp_path, capsys):
    """jsonargparse quotes the value it refuses: a 1 MB string in a config was one 1 MB error line."""
    cfg = _touch(tmp_path / "huge.yaml", ('trainer:\n  max_epochs: "' + "a" * 100_000 + '"\n').encode())
    with pytest.raises(SystemExit) as exc:
        cli_main(fit_args(tmp_path, "--config", str(cfg)))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exc.value.code == 2 and len(err) == 1 and len(err[0]) < 1100 and "more characters)" in err[0], err[0][:300]


def test_a_file_without_series_columns_is_one_series(tmp_path, capsys):
    """``--data.series_columns []``: the file is one series; the run trained and exported, then the report's
    per-link sections raised an IndexError (exit 1, no report.json)."""
    from conftest import run_dir_of

    df = base_frame()
    path = write(tmp_path, df[df["node_id"] == df["node_id"].iloc[0]], "one.csv")
    cli_main(fit_args(tmp_path, f"--data.data_path={path}", "--data.series_columns=[]"))
    report = json.loads((run_dir_of(tmp_path) / "report.json").read_text())
    assert list(report["per_link"]) == ["all"]


def test_a_huge_link_id_is_cut_in_messages(smoke_run, tmp_path, capsys):
    """Found by a hostile-input hunt: a 50 MB link id was echoed whole, one 50 MB warning line. Messages now show an
    id's first characters and its length; the forecast itself is unchanged for the other links."""
    df = pd.read_csv(next((smoke_run.parent.parent / "data").glob("dwcp_*[0-9].csv")), dtype=str)
    df = df.groupby(["node_id", "peer_id"]).tail(25).reset_index(drop=True)
    huge = "n" * 200_000
    df.loc[0, "node_id"] = huge  # a link of one row: warned about, not forecast
    path = tmp_path / "huge_id.csv"
    df.to_csv(path, index=False)
    cli_main(["forecast", "--model", str(smoke_run), "--input", str(path), "--output", str(tmp_path / "out.csv")])
    err = capsys.readouterr().err.splitlines()
    warned = [line for line in err if "rows since its last gap" in line]
    assert len(warned) == 1 and "(200,000 characters)" in warned[0] and max(map(len, err)) < 1000, warned
    assert huge not in (tmp_path / "out.csv").read_text()


def test_a_link_with_one_test_window_is_reported(tmp_path):
    """Found by a hunt: with a test split of one window per link the report died in torchmetrics (R2 of one row)
    after the whole training and export, and ``report --run`` could never report the run. Its per-link errors are
    given, R2 and correlation are null."""
    cli_main(fit_args(tmp_path, "--data.split=[0.8,0.198,0.002]", "--trainer.max_epochs=1"))
    report = json.loads((run_dir_of(tmp_path) / "report.json").read_text())
    for link in report["per_link"].values():
        assert link["throughput_mbps"]["r2"] is None and link["throughput_mbps"]["rmse"] > 0


@pytest.mark.parametrize("factor", [1000, 1e6])
def test_a_time_column_in_milliseconds_is_refused_before_training(small_csv, tmp_path, capsys, factor):
    """Found by a hunt: times in milliseconds or microseconds trained, then the report replayed migrations with
    steps of years, lost its seasonal baseline without a word, and ``plan`` refused the shipped model."""
    df = pd.read_csv(small_csv, dtype={"node_id": str, "peer_id": str})
    path = tmp_path / "ms.csv"
    df.assign(timestamp=df["timestamp"] * factor).to_csv(path, index=False)
    with pytest.raises(SystemExit) as exc:
        cli_main(fit_args(tmp_path, f"--data.data_path={path}"))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exc.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {path}: column 'timestamp' has a row every {300 * factor:g}") and (
        "milliseconds or microseconds? convert the column to seconds" in err[0]
    ), err[0]
    assert not list(tmp_path.glob("lightning_logs/version_*/checkpoints"))


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_during_generate_leaves_no_temporary_file_and_one_line(tmp_path, sig):
    """Found by a hunt: SIGTERM in a project command (generate, report, export) skipped every ``finally``, leaving a
    45 MB ``.g.csv.*.tmp`` beside the output, and Ctrl-C printed a KeyboardInterrupt traceback. Both now unwind:
    one line, exit 128 + the signal, the temporary file removed, nothing at the output's name."""
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "dwcp_lstm", "generate", "--output", "g.csv", "--samples", "3000000", "--oracle",
         "false"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".g.csv*.tmp")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob(".g.csv*.tmp")), "the output was not being written"
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=60)
    number = getattr(signal, sig).value
    assert proc.returncode == 128 + number and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("error: stopped by "), err[-500:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_generate_refuses_a_folder_at_the_sidecars_name_before_writing_the_data(tmp_path, capsys):
    """Found by a hunt: the data file was replaced first, then the sidecar's name was found to be a folder: new data
    beside no oracle (or beside the old one)."""
    out = tmp_path / "s.csv"
    cli_main(["generate", "--output", str(out), "--samples", "3000", "--seed", "1", "--oracle", "false"])
    before = out.read_bytes()
    (tmp_path / "s.oracle.csv").mkdir()
    with pytest.raises(SystemExit) as exc:
        cli_main(["generate", "--output", str(out), "--samples", "3000", "--seed", "2"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exc.value.code == 2 and len(err) == 1 and "s.oracle.csv" in err[0], err
    assert out.read_bytes() == before


def test_report_md_links_only_the_figures_this_report_drew(tmp_path, smoke_run, capsys, monkeypatch):
    """Found by a hunt: with a folder at timeseries.png the figure was skipped with a warning, but report.md still
    showed ![timeseries.png]; a figure that fails to draw left the earlier report's file beside the new report."""
    import shutil

    from dwcp_lstm import plots

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    (run / "timeseries.png").unlink()
    (run / "timeseries.png").mkdir()
    cli_main(["report", "--run", str(run)])
    md = (run / "report.md").read_text()
    assert "![timeseries.png]" not in md and "![baselines.png](baselines.png)" in md
    assert "timeseries.png skipped" in capsys.readouterr().err
    # an earlier figure that fails to draw this time is removed, not shown beside the new report
    monkeypatch.setattr(plots, "errors", lambda *a, **k: 1 / 0)
    cli_main(["report", "--run", str(run)])
    assert not (run / "error_distribution.png").exists()
    assert "![error_distribution.png]" not in (run / "report.md").read_text()

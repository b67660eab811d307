"""The deployable predictor: ``model.onnx`` + ``model_metadata.json`` in, next-step forecasts in raw units out.

Torch-free by design (numpy, pandas, onnxruntime and :mod:`dwcp_lstm.tables` only; not even ``onnx``), so that a
service can forecast without the training stack. Nothing is unpickled: the model is an ONNX graph (scalers baked in)
and the metadata is JSON. The model's sha256 must match the metadata, and the metadata must match the contract
embedded in the graph (:mod:`dwcp_lstm.contract`), before anything is forecast.

``python -m dwcp_lstm forecast --model lightning_logs/version_N/model.onnx --input metrics.csv`` gives, per link, the
forecast of the step after the link's last row (``--rolling``: one forecast per window).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd

from dwcp_lstm.contract import (
    METADATA_NAME,
    check_external_data,
    compare_contract,
    contract_of,
    external_path,
    horizon_of,
    load_metadata,
    model_path_of,
    output_shape,
    parse_embedded,
)
from dwcp_lstm.errors import ConfigError, DataError, ModelFileError, check_named, not_a_regular_file
from dwcp_lstm.runtime import MAX_THREADS
from dwcp_lstm.tables import (
    DUPLICATE_POLICIES,
    FLOAT32_MAX,
    PARQUET_SUFFIXES,
    TICKS_PER_S,
    add_clock,
    check_cadence_matches,
    check_numeric,
    check_output_file,
    check_table_suffix,
    clip_to,
    fill_missing,
    is_gap,
    latest_segments,
    link_name,
    log,
    long_segments,
    order_series,
    outside_range,
    read_table,
    segment_bounds,
    short_repr,
    target_ranges,
    time_steps,
    write_frame,
)

CHUNK = 4096  # windows per session.run: bounds the [B, W, F] copy on long rolling series
# onnxruntime resolves external data of a graph given as bytes against this folder (else the working directory)
EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"


class Predictor:
    """ONNX Runtime inference of an exported run, with the input checks of the training data.

    Args:
        model_path: the exported ``model.onnx``.
        metadata_path: its ``model_metadata.json``; default: the one beside the model.
        threads: ONNX Runtime intra-op threads; None = its default (one per physical core).

    Raises:
        DataError: missing or invalid metadata, a model whose sha256 differs from the metadata, metadata that differs
            from the contract embedded in the model (edited, or another model's), an external-data file that is
            missing, altered or outside the model's folder, or a graph whose input/output disagree with it.
    """

    def __init__(
        self, model_path: str | Path, metadata_path: str | Path | None = None, threads: int | None = None
    ) -> None:
        self.model_path = Path(model_path)
        self.metadata_path = Path(metadata_path) if metadata_path else self.model_path.with_name(METADATA_NAME)
        bad_type = not isinstance(threads, int) or isinstance(threads, bool)
        if threads is not None and (bad_type or not 0 <= threads <= MAX_THREADS):  # onnxruntime's option is int32
            raise ConfigError(f"threads must be an integer from 0 to {MAX_THREADS} (0: onnxruntime's default), got "
                              f"{threads!r}")  # fmt: skip
        if self.model_path.is_dir():  # the constructor takes the file; forecast/plan --model also take a run folder
            raise ModelFileError(f"{self.model_path}: is a directory, expected the .onnx file")
        problem = not_a_regular_file(self.model_path)
        if problem:
            raise ModelFileError(f"{self.model_path}: {problem}")
        self.metadata = load_metadata(self.metadata_path)
        # Hash the very bytes the session is built from: no window for the file to change between check and load.
        try:
            model_bytes = self.model_path.read_bytes()
        except OSError as exc:
            raise ModelFileError(f"{self.model_path}: cannot read ({exc.strerror or exc})") from None
        sha = hashlib.sha256(model_bytes).hexdigest()
        if sha != self.metadata["model_sha256"]:
            raise ModelFileError(
                f"{self.model_path}: sha256 {sha[:12]}... does not match {self.metadata_path.name} "
                f"({self.metadata['model_sha256'][:12]}...): the model was altered or belongs to another run"
            )
        folder = self.model_path.parent.absolute()
        self.window: int = self.metadata["window_size"]
        self.features: list[str] = [c["name"] for c in self.metadata["features"]]
        series = self.metadata["series"]
        self.clock: dict[str, float] = dict(series.get("clock") or {})  # wall-clock inputs, derived (add_clock)
        self.series_start: str | None = series.get("start_format")
        self.cadence_s: float | None = series.get("cadence_s")  # the training rows' cadence (None: not recorded)
        self.duplicates: str = series.get("duplicates", "error")  # how training read repeated rows and empty cells
        self.fill_missing: bool = series.get("fill_missing", False)
        self.file_features: list[str] = [c for c in self.features if c not in self.clock]  # what an input file holds
        self.targets: list[str] = [c["name"] for c in self.metadata["targets"]]
        self.horizon: int = horizon_of(self.metadata)
        # output columns: the targets for a one-step model, else <target>_h1 .. <target>_hH (step-major)
        self.columns: list[str] = (
            list(self.targets) if self.horizon == 1
            else [f"{t}_h{h + 1}" for h in range(self.horizon) for t in self.targets]
        )  # fmt: skip
        intervals = self.metadata.get("intervals") or {}
        self.levels: list[float] = list(intervals.get("levels", []))  # nominal coverage of the bounds, if any
        self.bound_outputs: list[str] = list(intervals.get("outputs", {}))
        self.all_columns: list[str] = self.columns + self._bound_columns()  # forecast, then every bound
        self.units: dict[str, str] = {c["name"]: str(c.get("unit", "")) for c in self.metadata["targets"]}
        self.feature_units: dict[str, str] = {c["name"]: str(c.get("unit", "")) for c in self.metadata["features"]}
        self.input_name: str = self.metadata["input"]["name"]
        self.output_name: str = self.metadata["output"]["name"]
        # Inputs beyond the training rows' range by more than its width (or size) are refused: a value in kbit/s
        # where Mbit/s was trained became a "confident" 0.0 s plan. `extrapolate` (--extrapolate) forecasts them.
        self.extrapolate = False
        ranges = [c.get("train_range") or [-np.inf, np.inf] for c in self.metadata["features"]]
        self.train_ranges = np.asarray(ranges, dtype=np.float64)  # [F, 2]; unbounded for an export without them
        self._limits = range_limits(self.train_ranges)  # [F, 2]
        opts = ort.SessionOptions()
        opts.log_severity_level = 4  # fatal only: its [W:/E:onnxruntime] lines (coloured) came before our one line
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        # onnxruntime loads side files from a private folder holding only the ones the metadata lists, as checked:
        # a graph that names another file beside the model cannot reach it, and nothing changes after its check
        with tempfile.TemporaryDirectory(prefix="dwcp_side_") as side:
            check_external_data(self.metadata["external_data"], folder, self.metadata_path, copy_to=Path(side))
            opts.add_session_config_entry(EXTERNAL_FOLDER_KEY, side)
            try:
                self.session = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
            except Exception as exc:  # onnxruntime raises its own exception types for a malformed graph
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                if "External data path" in first:  # its own text for a side file it could not find
                    first = f"the graph reads an external-data file {self.metadata_path.name} does not list: {first}"
                raise ModelFileError(f"{self.model_path}: onnxruntime cannot load it ({first})") from None
        embedded = parse_embedded(self.session.get_modelmeta().custom_metadata_map, self.model_path)
        compare_contract(contract_of(self.metadata), embedded, self.metadata_path, self.model_path)
        self._check_session()

    def protected_paths(self) -> list[Path]:
        """The files this predictor was built from: ``forecast --output`` must never replace one."""
        folder = self.model_path.parent
        sides = [external_path(folder, loc, self.metadata_path) for loc in self.metadata["external_data"]]
        return [self.model_path, self.metadata_path, *sides]

    @classmethod
    def from_run(cls, run_dir: str | Path, threads: int | None = None) -> Predictor:
        """The predictor of a finished fit run: its model file (see :func:`~dwcp_lstm.contract.model_path_of`) and
        ``<run_dir>/model_metadata.json``."""
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise ModelFileError(f"{run_dir}: run directory not found")
        return cls(model_path_of(run_dir), run_dir / METADATA_NAME, threads)

    def with_clock(self, df: pd.DataFrame, series: Sequence[str], time: str, source: str | Path) -> pd.DataFrame:
        """``df`` with the model's wall-clock inputs added (:func:`~dwcp_lstm.tables.add_clock`), as training
        derived them; unchanged for a model without any."""
        return add_clock(df, self.clock, self.series_start, series, time, source)

    def ordered(
        self, df: pd.DataFrame, series: Sequence[str], time: str, source: str | Path, duplicates: str | None = None,
        fill: bool | None = None,
    ) -> pd.DataFrame:  # fmt: skip
        """``df`` as the model reads it: its wall-clock inputs added, numbers checked, each link in time order, repeated
        rows and empty cells handled as in training (``duplicates``; ``fill``: carry a link's last known value into
        its empty cells; None: as trained, which the contract records, so that a model trained on a file reads that
        file's quirks the same way)."""
        duplicates = self.duplicates if duplicates is None else duplicates
        fill = self.fill_missing if fill is None else fill
        df = self.with_clock(df, series, time, source)
        check_numeric(df, [time], source, is_time=True)  # rows named in file order, before sorting
        check_numeric(df, self.features, source, allow_nan=fill)
        df = order_series(df, series, time, source, duplicates)
        return fill_missing(df, self.features, series, source) if fill else df

    def read_telemetry(
        self, path: str | Path, series_columns: str | None, time_column: str | None
    ) -> tuple[pd.DataFrame, list[str], str]:
        """The columns of ``path`` the model needs, with the link id and time columns (``--series-columns``,
        comma-separated, '' = one link; ``--time-column``; None: as trained). ``forecast`` and ``plan`` read
        telemetry through this one function."""
        trained = self.metadata["series"]  # how the training data defined a series
        if series_columns is None:
            series = list(trained["columns"])
        else:
            series = [c.strip() for c in str(series_columns).split(",") if c.strip()]
        if time_column is not None and not str(time_column).strip():
            raise ConfigError("--time-column must name a column, got ''")
        time = time_column or trained["time_column"]
        if len(set(series)) != len(series) or time in series:
            raise ConfigError(f"--series-columns {series} and --time-column {time!r}: a column may appear only once")
        columns = list(dict.fromkeys([*series, time, *self.file_features]))
        return read_table(path, columns, text_columns=series, derived=list(self.clock)), series, time

    def _bound_columns(self) -> list[str]:
        """``<column>_lo80`` / ``_hi80`` per level for every forecast column, then (multi-step)
        ``<target>_mean<k>_lo80`` / ``_hi80`` for the mean over the first k steps: the order of :meth:`_table`."""
        tags = [f"{100 * v:g}" for v in self.levels]
        out = []
        for name in self.bound_outputs:
            side = "lo" if name.endswith("lower") else "hi"
            cols = self.columns if not name.startswith("mean") else [
                f"{t}_mean{k + 1}" for k in range(self.horizon) for t in self.targets
            ]  # fmt: skip
            out += [f"{c}_{side}{tag}" for tag in tags for c in cols]
        return out

    def _check_session(self) -> None:
        """The graph's input and outputs must be the metadata's names, float32, with the same fixed dims."""
        outputs = {self.output_name: output_shape(self.horizon, len(self.targets))[1:]}
        outputs.update({n: shape[1:] for n, shape in (self.metadata.get("intervals") or {}).get("outputs", {}).items()})
        for kind, args, expected in (
            ("input", self.session.get_inputs(), {self.input_name: [self.window, len(self.features)]}),
            ("output", self.session.get_outputs(), outputs),
        ):
            names = [a.name for a in args]
            if names != list(expected):
                raise ModelFileError(
                    f"{self.model_path}: graph {kind}s are {names}, {self.metadata_path.name} says {list(expected)}"
                )
            for arg in args:
                dims = expected[arg.name]
                if arg.type != "tensor(float)" or list(arg.shape[1:]) != dims or len(arg.shape) != len(dims) + 1:
                    raise ModelFileError(
                        f"{self.model_path}: graph {kind} {arg.name!r} is {arg.type} {arg.shape}, "
                        f"{self.metadata_path.name} says float32 ['batch', {', '.join(map(str, dims))}]"
                    )

    # -- inference ------------------------------------------------------------------------------------------------
    def predict_windows(self, windows: np.ndarray, source: str = "windows") -> np.ndarray:
        """Raw windows [B, W, F] (feature order of the metadata) -> raw forecasts [B, T] ([B, H, T]), float32.

        The fast path: checks shape and finiteness only. Windows longer than the model's are cut to their last
        ``window`` steps.
        """
        return self._run(windows, [self.output_name], source)[0]

    def _run(self, windows: np.ndarray, names: list[str], source: str) -> list[np.ndarray]:
        """The graph's outputs ``names`` (the forecast first) for raw windows, a chunk at a time, in one pass each."""
        x = self._as_float32(windows, source)
        if x.ndim != 3 or x.shape[2] != len(self.features):
            raise DataError(f"{source}: expected an array [batch, {self.window}, {len(self.features)}], got {x.shape}")
        if x.shape[1] < self.window:
            raise DataError(f"{source}: windows have {x.shape[1]} steps, the model needs {self.window}")
        x = x[:, -self.window :]  # [B, W, F]
        bad = ~np.isfinite(x)
        if bad.any():
            b, t, f = (int(i) for i in np.argwhere(bad)[0])
            raise DataError(f"{source}: window {b + 1} step {t + 1} column {self.features[f]!r}: {x[b, t, f]}")
        hit = outside_range(x, self.features)  # what check_numeric refuses in a table
        if hit is not None:
            (b, t, f), what = hit
            raise DataError(f"{source}: window {b + 1} step {t + 1} column {self.features[f]!r}: {what}")
        self.check_range(x, source)
        chunks = [
            self.session.run(names, {self.input_name: np.ascontiguousarray(x[i : i + CHUNK])})
            for i in range(0, len(x), CHUNK)
        ]
        shapes = self._output_dims()
        if not chunks:  # no windows: empty outputs of the right shapes
            return [np.empty((0, *shapes[n]), np.float32) for n in names]
        for i, chunk in enumerate(chunks):
            self._check_output_shapes(chunk, names, min(CHUNK, len(x) - i * CHUNK), shapes)
        outs = [np.concatenate([c[k] for c in chunks]) for k in range(len(names))]
        for name, out in zip(names, outs, strict=True):
            self._check_finite(name, out, x, source)
        return outs

    def _output_dims(self) -> dict[str, list[int]]:
        """Each graph output's dims after the batch, as the metadata states them."""
        shapes = {self.output_name: output_shape(self.horizon, len(self.targets))[1:]}
        shapes.update({n: s[1:] for n, s in (self.metadata.get("intervals") or {}).get("outputs", {}).items()})
        return shapes

    def _check_output_shapes(self, outs: list, names: list[str], rows: int, shapes: dict[str, list[int]]) -> None:
        """Each output of one session run is [rows, *dims]: the declared shape is not enforced by onnxruntime, and a
        graph giving one row for 4 windows raised a ValueError traceback (or paired forecasts with the wrong link)."""
        for name, out in zip(names, outs, strict=True):
            if out.ndim == 0 or out.shape[0] != rows:
                got = out.shape[0] if out.ndim else 0
                raise ModelFileError(f"{self.model_path}: graph output {name!r} has {got} rows for {rows} windows")
            if list(out.shape[1:]) != list(shapes[name]) or out.dtype != np.float32:
                raise ModelFileError(f"{self.model_path}: graph output {name!r} is {out.dtype} {list(out.shape)}, "
                                     f"{self.metadata_path.name} says float32 [{rows}, "
                                     f"{', '.join(map(str, shapes[name]))}]")  # fmt: skip

    def _check_finite(self, name: str, out: np.ndarray, x: np.ndarray, source: str) -> None:
        """A NaN/inf in any output (forecast or interval bound) must not pass as a number: an empty bound cell,
        or plan's "nan Mbit/s", exit 0. Inputs beyond the training range (``--extrapolate``) overflow float32 inside
        a genuine graph; within it, only an altered graph gives one."""
        flat = out.reshape(len(out), -1)  # [B, columns of this output], the order of all_columns
        bad = ~np.isfinite(flat)
        if not bad.any():
            return
        b, j = (int(i) for i in np.argwhere(bad)[0])
        columns = self._columns_of(name)
        far = bool(((x[b] < self._limits[:, 0]) | (x[b] > self._limits[:, 1])).any())
        why = (
            "inputs far outside the range the model was trained on"
            if far
            else f"the graph computes it from inputs within the training range: is {self.model_path} altered?"
        )
        what = "the forecast" if name == self.output_name else f"graph output {name!r}"
        raise DataError(f"{source}: window {b + 1}: {what} of {columns[j]!r} is {flat[b, j]} ({why})")

    def _columns_of(self, name: str) -> list[str]:
        """The columns of :attr:`all_columns` that graph output ``name`` fills."""
        if name == self.output_name:
            return self.columns
        sizes = [int(np.prod(self._output_dims()[n])) for n in self.bound_outputs]
        k = self.bound_outputs.index(name)
        start = len(self.columns) + sum(sizes[:k])
        return self.all_columns[start : start + sizes[k]]

    def check_range(self, windows: np.ndarray, source: str, labels: Sequence[str] | None = None) -> None:
        """Refuse raw windows [B, W, F] with a value beyond its feature's training range by more than the range's
        width (unless :attr:`extrapolate`): the network never saw anything like it, and its forecast, bounds and
        plan would look as sure as any other. ``labels`` name the windows (e.g. their links) in the message."""
        if self.extrapolate:
            return
        far = (windows < self._limits[:, 0]) | (windows > self._limits[:, 1])
        if far.any():
            b, t, f = (int(i) for i in np.argwhere(far)[0])
            who = f"link {labels[b]}" if labels is not None else f"window {b + 1}"
            raise DataError(f"{source}: {who} step {t + 1} {self._far_message(f, windows[b, t, f])}")

    def check_rows(self, x: np.ndarray, df: pd.DataFrame, series: Sequence[str], time: str, bounds: np.ndarray,
                   source: str) -> None:  # fmt: skip
        """:meth:`check_range` for every row [rows, F] of the segments ``bounds`` (a rolling or online run reads
        each window of the history), the offending row named by its link and time."""
        if self.extrapolate or not len(bounds):
            return
        rows = np.concatenate([np.arange(a, b) for a, b in bounds])
        far = (x[rows] < self._limits[:, 0]) | (x[rows] > self._limits[:, 1])
        if far.any():
            r, f = (int(i) for i in np.argwhere(far)[0])
            i = int(rows[r])
            raise DataError(f"{source}: link {link_name(df, series, i)} {time} {df[time].iloc[i]} "
                            f"{self._far_message(f, x[i, f])} (every window of the history is read)")  # fmt: skip

    def _far_message(self, f: int, value: float) -> str:
        lo, hi = self.train_ranges[f]
        if lo == hi:
            return (
                f"column {self.features[f]!r}: {value:g} differs from {lo:g}, its only value in the training rows (the "
                "model never saw it change); its forecast would be an extrapolation: check the input, or pass "
                "--extrapolate"
            )
        return (
            f"column {self.features[f]!r}: {value:g} is far outside the training rows' range {lo:g} to {hi:g} "
            "(another unit?); its forecast would be an extrapolation: check the input, or pass --extrapolate"
        )

    def predict(
        self, history: pd.DataFrame | np.ndarray, columns: Sequence[str] | None = None, source: str = "history"
    ) -> dict[str, float] | pd.DataFrame:
        """Forecast the step after ``history``.

        Args:
            history: one series as a DataFrame holding the feature columns by name (others are ignored) or an array
                [rows, F]; or a batch of windows [B, W, F]. At least ``window`` rows/steps are needed; the last
                ``window`` are used.
            columns: for arrays, the names of the last axis, checked against the model's feature order (an array
                cannot carry names, so pass them whenever they are known).
            source: how error messages name the input.

        Returns:
            one series: ``{column: value}`` in raw units (see :attr:`units`; the columns are the targets, or
            ``<target>_h<k>`` for the k-th step of a multi-step model); a batch: a DataFrame with those columns and
            the units in ``.attrs["units"]``.
        """
        if isinstance(history, np.ndarray) and history.ndim == 3:
            self._check_columns(columns, source)
            return self._frame(self._table(history, source))
        x = self._series_array(history, columns, source)  # [rows, F]
        if len(x) < self.window:
            raise DataError(f"{source}: {len(x)} rows given, the model needs at least {self.window} (window_size)")
        y = self._table(x[None, -self.window :], source)[0]  # [C]
        return {c: float(v) for c, v in zip(self.all_columns, y, strict=True)}

    def _table(self, windows: np.ndarray, source: str) -> np.ndarray:
        """Raw windows [B, W, F] -> [B, C]: the forecast and every interval bound, in the order of
        :attr:`all_columns` (the forecast alone when the model has no intervals)."""
        outs = self._run(windows, [self.output_name, *self.bound_outputs], source)  # one pass: [B, (L,) ...] each
        return np.concatenate([o.reshape(len(o), int(np.prod(o.shape[1:]))) for o in outs], axis=1)  # 0 rows too

    def predict_rolling(
        self, history: pd.DataFrame | np.ndarray, columns: Sequence[str] | None = None, source: str = "history",
        online: bool = False,
    ) -> pd.DataFrame:  # fmt: skip
        """One forecast per window of one series: row i forecasts the step after rows ``i .. i + window - 1``.

        The result has ``rows - window + 1`` rows, indexed by the position (DataFrame input: the index label) of
        each window's last row; the last one forecasts beyond the data. The rows must be one gap-free series in time
        order (windows are taken as given); ``forecast --rolling`` sorts and splits links at gaps first.
        ``online``: every interval bound recalibrated from the outcomes realised earlier in ``history``
        (:func:`recalibrate_online`).
        """
        if online:
            check_online(self, source)
        x = self._series_array(history, columns, source)  # [rows, F]
        if len(x) < self.window:
            raise DataError(f"{source}: {len(x)} rows given, the model needs at least {self.window} (window_size)")
        y = self._rolling(x, source)  # [rows - W + 1, T]
        if online:
            last = np.arange(self.window - 1, len(x))
            y = recalibrate_online(self, y, x, last, np.full(len(last), len(x)), np.zeros(len(last)), source)
        index = history.index[self.window - 1 :] if isinstance(history, pd.DataFrame) else None
        return self._frame(y, index)

    def _rolling(self, x: np.ndarray, source: str) -> np.ndarray:
        """Every window of a [rows, F] array -> [rows - W + 1, T], a chunk at a time (the views copy on demand)."""
        views = np.lib.stride_tricks.sliding_window_view(x, self.window, axis=0)  # [N, F, W], no copy
        out = [self._table(views[i : i + CHUNK].transpose(0, 2, 1), source) for i in range(0, len(views), CHUNK)]
        return np.concatenate(out)  # [N, C]

    # -- input checks ---------------------------------------------------------------------------------------------
    def _series_array(
        self, history: pd.DataFrame | np.ndarray, columns: Sequence[str] | None, source: str
    ) -> np.ndarray:
        """One series -> float32 [rows, F] in the model's feature order, with the training data's value checks."""
        if isinstance(history, pd.DataFrame):
            if isinstance(history.columns, pd.MultiIndex):  # a TypeError traceback (found by fuzzing)
                raise DataError(f"{source}: the columns have {history.columns.nlevels} levels; give one level of "
                                f"column names (the model needs {self.features})")  # fmt: skip
            missing = [c for c in self.features if c not in history.columns]
            if missing:
                raise DataError(f"{source}: missing required column {missing[0]!r} (the model needs {self.features})")
            check_once(history, self.features, source)
            self._check_one_link(history, source)
            frame = history[self.features].copy()  # check_numeric converts in place: never touch the caller's frame
        elif isinstance(history, np.ndarray):
            if history.ndim != 2 or history.shape[1] != len(self.features):
                raise DataError(
                    f"{source}: expected an array [rows, {len(self.features)}] or [batch, {self.window}, "
                    f"{len(self.features)}], got shape {history.shape}"
                )
            self._check_columns(columns, source)
            frame = pd.DataFrame(self._as_float32(history, source), columns=self.features)
        else:
            raise DataError(f"{source}: expected a pandas DataFrame or a numpy array, got {type(history).__name__}")
        check_numeric(frame, self.features, source)  # non-numeric, NaN/inf, out-of-range: column and row named
        return frame.to_numpy(np.float32)

    def _check_one_link(self, history: pd.DataFrame, source: str) -> None:
        """A frame that carries the training data's link id or time columns (or index levels) holds one gap-free
        link in time order at the training cadence, as every training window did: windows are taken as the rows
        come, and rows of several links, out of order, repeated, across a gap or at another cadence gave a confident
        forecast of nothing (found by fuzzing). ``forecast_table`` sorts, de-duplicates and splits a table of links."""
        trained = self.metadata["series"]
        time, keys = trained["time_column"], [*trained["columns"], trained["time_column"]]
        levels = [n for n in history.index.names if n in keys and n not in history.columns]
        frame = history.reset_index(level=levels) if levels else history
        check_once(frame, keys, source)
        ids = [c for c in trained["columns"] if c in frame.columns]
        n = len(frame[ids].drop_duplicates()) if ids else 1
        if n > 1:
            raise DataError(f"{source}: rows of {n} links ({'/'.join(ids)}); predict one link at a time, or use "
                            "forecast_table for a table of links")  # fmt: skip
        if time not in frame.columns or len(frame) < 2:
            return
        t = frame[[time]].copy()
        check_numeric(t, [time], source, is_time=True)
        steps = time_steps(t[time].to_numpy())
        for bad, what in ((steps < 0, "earlier than the row before; sort the rows by time"),
                          (steps == 0, "the same time as the row before (a repeated row); forecast_table reads "
                                       "repeated rows as the model was trained to")):  # fmt: skip
            if bad.any():
                raise DataError(f"{source}: column {time!r} row {int(np.flatnonzero(bad)[0]) + 2}: {what} "
                                "(windows are taken in row order)")  # fmt: skip
        max_gap, median = float(trained.get("max_gap") or 0), float(np.median(steps))
        gap = is_gap(steps, median, max_gap)
        if gap.any():
            i = int(np.flatnonzero(gap)[0])
            raise DataError(f"{source}: column {time!r} row {i + 2}: a gap of {steps[i]:g} (over {max_gap:g} x the "
                            "median step): a window must not cross a gap; pass the rows since the gap")  # fmt: skip
        plain = t.assign(**{c: frame[c].to_numpy() for c in ids}).reset_index(drop=True)
        check_cadence_matches(plain, ids, time, np.array([[0, len(plain)]]), self.cadence_s, source, self.window)

    def _check_columns(self, columns: Sequence[str] | None, source: str) -> None:
        if columns is None:
            return
        columns = list(columns)
        if columns == self.features:
            return
        if sorted(columns) == sorted(self.features):
            raise DataError(f"{source}: reordered columns {columns}; the model expects {self.features}")
        missing = [c for c in self.features if c not in columns]
        what = f"missing column {missing[0]!r}" if missing else f"unexpected columns {columns}"
        raise DataError(f"{source}: {what}; the model expects exactly {self.features}")

    @staticmethod
    def _as_float32(x: np.ndarray, source: str) -> np.ndarray:
        if not isinstance(x, np.ndarray):
            raise DataError(f"{source}: expected a numpy array, got {type(x).__name__}")
        # complex would lose its imaginary part, timedelta its unit; bool is refused as a table's bool column is
        if x.dtype.kind not in "iuf":
            raise DataError(f"{source}: array of {x.dtype} is not real numbers (integer or float)")
        if x.dtype.kind == "f" and x.dtype.itemsize > 4:  # the model works in float32: 1e300 would become inf
            huge = np.isfinite(x) & (np.abs(x) > FLOAT32_MAX)
            if huge.any():
                at = [int(i) for i in np.argwhere(huge)[0]]
                raise DataError(f"{source}: value {x[tuple(at)]:g} at index {at} is beyond float32 range")
        return x.astype(np.float32, copy=False)

    def _frame(self, y: np.ndarray, index: pd.Index | None = None) -> pd.DataFrame:
        df = pd.DataFrame(y.reshape(len(y), len(self.all_columns)), columns=self.all_columns, index=index)
        df.attrs["units"] = {c: next(u for t, u in self.units.items() if c == t or c.startswith(t + "_"))
                             for c in self.all_columns}  # fmt: skip
        return df


def check_once(frame: pd.DataFrame, names: Sequence[str], source: str | Path) -> None:
    """Each of ``names`` is at most one column of ``frame``: a repeated name made ``frame[name]`` a frame, and the
    reader took either copy (or raised an AttributeError)."""
    twice = [c for c in names if list(frame.columns).count(c) > 1]
    if twice:
        raise DataError(f"{source}: column {twice[0]!r} appears more than once; which one is meant?")


def range_limits(train_ranges: np.ndarray) -> np.ndarray:
    """[F, 2] the inputs a model reads without ``--extrapolate``, from its features' training ranges [F, 2]: each
    range widened by its width (or its size, for a narrow one); unbounded for a feature without one. A feature
    constant in training (retransmits always 0) has no width: any other value is one the network never saw (its
    scaler cannot say how far off it is), so only the constant itself passes, as float32 reads it (0.1 is not
    0.1 in float32)."""
    lo, hi = np.asarray(train_ranges, dtype=np.float64).T
    known = np.isfinite(lo) & np.isfinite(hi)
    with np.errstate(invalid="ignore"):
        margin = np.where(known, np.maximum.reduce([hi - lo, np.abs(lo), np.abs(hi)]), np.inf)
        margin = np.where(known & (hi == lo), 0.0, margin)
        limits = np.stack([lo - margin, hi + margin], axis=1)
    constant = known & (hi == lo)
    limits[constant] = lo[constant].astype(np.float32).astype(np.float64)[:, None]
    return limits


def add_reading_flags(p) -> None:
    """``--duplicates`` and ``--fill-missing`` of ``forecast`` and ``plan``: how to read the telemetry's repeated rows
    and empty cells; by default as the training data was read (the contract's ``series.duplicates`` /
    ``series.fill_missing``)."""
    import argparse

    p.add_argument("--duplicates", choices=DUPLICATE_POLICIES, default=None,
                   help="repeated (link, time) rows: error, keep the first, or mean; default: as trained")  # fmt: skip
    p.add_argument("--fill-missing", action=argparse.BooleanOptionalAction, default=None,
                   help="fill empty cells with the link's last known value; default: as trained")  # fmt: skip


# -- the `forecast` subcommand ------------------------------------------------------------------------------------
def forecast_table(
    predictor: Predictor,
    df: pd.DataFrame,
    series: Sequence[str],
    time: str,
    path: str | Path,
    rolling: bool = False,
    duplicates: str | None = None,
    max_gap: float = 3.0,
    online: bool = False,
    fill_missing: bool | None = None,
) -> pd.DataFrame:
    """Per link, the forecast of the step after its last row (``rolling``: after every window; with ``online``
    the interval bounds recalibrated from the outcomes realised earlier in the input, :func:`recalibrate_online`).

    Columns: the series columns, ``time`` (of the last input row of the window; the forecast is for the next step),
    one column per target. Links are split at gaps longer than ``max_gap`` x their cadence, as in training. Without
    ``rolling`` each link is forecast from its latest segment only (an earlier one ends at a gap: its forecast is
    of a past step); a link whose latest segment is shorter than a window is skipped with a warning. With
    ``rolling`` every window of every segment is forecast.
    """
    df, series = _check_frame(predictor, df, series, time, path)
    w = predictor.window
    time_dtype = df[time].dtype  # read as seconds below; written back as it came
    df = predictor.ordered(df, series, time, path, duplicates, fill_missing)
    x = df[predictor.features].to_numpy(np.float32)  # [rows, F]
    every = segment_bounds(df, series, time, 1, max_gap, path)  # [S, 2]: the links split at gaps, as in training
    latest = latest_segments(df, series, every)  # [links, 2]
    short = (latest[:, 1] - latest[:, 0]) < w
    if short.all() and not rolling:
        n = int((latest[:, 1] - latest[:, 0]).max())
        raise DataError(f"{path}: no link has {w} rows since its last gap (the model's window); the most is {n}")
    if not rolling:
        for a, b in latest[short]:
            log.warning("%s: link %s: %d rows since its last gap, the model needs %d: not forecast", path,
                        link_name(df, series, a), b - a, w)  # fmt: skip
    latest = latest[~short]
    # Rolling / online: every segment at least a window long, as training read them (the others skipped, warned).
    bounds = long_segments(every, w, path) if rolling or online else latest  # [S, 2] row ranges
    check_cadence_matches(df, series, time, bounds, predictor.cadence_s, path, w)
    if rolling or online:  # online: every window, so that each link learns from its own past outcomes
        predictor.check_rows(x, df, series, time, bounds, str(path))  # the offending row named by link and time
        ys = [predictor._rolling(x[a:b], str(path)) for a, b in bounds]  # [n_i, T] each
        last_rows = np.concatenate([np.arange(a + w - 1, b) for a, b in bounds])
        y = np.concatenate(ys)
        if online:
            keys = df.groupby(series, sort=False, observed=True).ngroup().to_numpy() if series else np.zeros(len(df))
            seg_end = np.concatenate([np.full(b - a - w + 1, b) for a, b in bounds])
            y = recalibrate_online(predictor, y, x, last_rows, seg_end, keys[last_rows], str(path))
        if not rolling:  # the latest window of each link, as without --online
            keep = np.isin(last_rows, latest[:, 1] - 1)
            y, last_rows = y[keep], last_rows[keep]
    else:
        last_rows = bounds[:, 1] - 1
        windows = np.stack([x[b - w : b] for _, b in bounds])  # [S, W, F]
        predictor.check_range(windows, str(path), [link_name(df, series, a) for a, _ in bounds])  # links named
        y = predictor._table(windows, str(path))  # [S, C]: forecasts and interval bounds
    out = df.loc[last_rows, [*series, time]].reset_index(drop=True)
    out[time] = as_dtype(out[time], time_dtype)
    values = pd.DataFrame(y.reshape(len(y), -1), columns=predictor.all_columns)  # [S, C]: forecasts, then bounds
    return pd.concat([out, values], axis=1)


def _check_frame(
    predictor: Predictor, df: pd.DataFrame, series: Sequence[str] | str, time: str, path: str | Path
) -> tuple[pd.DataFrame, list[str]]:
    """What :func:`forecast_table` reads from ``df``, refused in one line where it is not there (the API took any
    frame: a missing column was a KeyError, an empty frame a ValueError, a repeated column an AttributeError). A
    series given as one string is that one column (it was read per character); link id or time columns set as
    the index are read as columns."""
    if not isinstance(df, pd.DataFrame):
        raise DataError(f"{path}: expected a pandas DataFrame, got {type(df).__name__}")
    series = [series] if isinstance(series, str) else list(series)
    if len(set(series)) != len(series) or time in series:
        raise DataError(f"{path}: series columns {series} and time column {time!r}: a column may appear only once")
    if isinstance(df.columns, pd.MultiIndex):
        raise DataError(f"{path}: the columns have {df.columns.nlevels} levels; give one level of column names")
    needed = list(dict.fromkeys([*series, time, *predictor.file_features]))
    levels = [n for n in df.index.names if n in needed and n not in df.columns]
    df = df.reset_index(level=levels) if levels else df
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing required column {missing[0]!r} (needs {needed})")
    check_once(df, needed, path)
    if df.empty:
        raise DataError(f"{path}: no rows")
    return df, series


def as_dtype(seconds: pd.Series, dtype) -> pd.Series:
    """Times in seconds (as :func:`~dwcp_lstm.tables.as_seconds` reads a datetime or timedelta column) back in the
    input's own dtype, so that a forecast's time column matches its input's (was: epoch seconds in the output of a
    Parquet timestamp input). Rounded to the microsecond: float seconds near 2026 hold about 0.2 us. Built in the
    dtype's own unit, so that a time that only microseconds can hold (after 2262) is written back, not refused."""
    is_time = pd.api.types.is_datetime64_any_dtype(dtype)
    if not (is_time or pd.api.types.is_timedelta64_dtype(dtype)):
        return seconds
    unit = getattr(dtype, "unit", None) or np.datetime_data(dtype)[0]
    ticks = np.round(seconds.round(6).to_numpy(np.float64) * TICKS_PER_S[unit]).astype(np.int64)
    t = pd.Series(ticks.astype(f"{'datetime64' if is_time else 'timedelta64'}[{unit}]"), index=seconds.index)
    if getattr(dtype, "tz", None) is not None:
        t = t.dt.tz_localize("UTC").dt.tz_convert(dtype.tz)
    return t.astype(dtype)


def check_online(predictor: Predictor, source: str) -> None:
    """What online recalibration needs: intervals, and every target among the inputs (its realised values)."""
    if not predictor.levels:
        raise ConfigError(f"{predictor.model_path}: --online needs a model with prediction intervals; it has none")
    missing = [t for t in predictor.targets if t not in predictor.features]
    if missing:
        raise ConfigError(f"{source}: --online needs the realised targets among the model's inputs; {missing} are not")


def recalibrate_online(
    predictor: Predictor, table: np.ndarray, x: np.ndarray, last_rows: np.ndarray, seg_end: np.ndarray,
    links: np.ndarray, source: str,
) -> np.ndarray:  # fmt: skip
    """Rolling forecasts ``table`` [N, C] (columns :attr:`Predictor.all_columns`) with every interval bound, per
    step and for the mean over k steps, recalibrated online (:mod:`dwcp_lstm.online`) against the values the input
    ``x`` [rows, F] realised: the window ending at row ``last_rows[i]`` learns its step-k outcome at row
    ``last_rows[i] + k``, if that row lies before ``seg_end[i]`` (its segment's end); one multiplier per link in
    ``links`` [N], carried over gaps."""
    from dwcp_lstm import online as O

    check_online(predictor, source)
    col = {c: i for i, c in enumerate(predictor.all_columns)}
    h = predictor.horizon
    ahead = last_rows[:, None] + np.arange(1, h + 1)[None]  # [N, H] the rows each step forecasts
    pairs, realised, forecasts, steps, alphas, ranges = [], [], [], [], [], []
    for t, r in zip(predictor.targets, target_ranges(predictor.targets).T, strict=True):
        values = x[np.minimum(ahead, len(x) - 1), predictor.features.index(t)].astype(np.float64)
        values[ahead >= seg_end[:, None]] = np.nan  # not in the data (or past a gap): never known
        means = np.cumsum(values, axis=1) / np.arange(1, h + 1)
        steps_f = table[:, [col[t if h == 1 else f"{t}_h{k}"] for k in range(1, h + 1)]].astype(np.float64)
        mean_f = np.cumsum(steps_f, axis=1) / np.arange(1, h + 1)  # the forecast of the mean over k steps
        names = [(t if h == 1 else f"{t}_h{k}", values[:, k - 1], steps_f[:, k - 1], k) for k in range(1, h + 1)]
        names += [(f"{t}_mean{k}", means[:, k - 1], mean_f[:, k - 1], k) for k in range(1, h + 1) if h > 1]
        for name, real, fc, k in names:
            for level in predictor.levels:  # innermost: the levels of one column side by side, for O.nested
                tag = f"{100 * level:g}"
                pairs.append((col[f"{name}_lo{tag}"], col[f"{name}_hi{tag}"]))
                realised.append(real)
                forecasts.append(fc)
                steps.append(k)
                alphas.append(1.0 - level)
                ranges.append(r)
    lo_i, hi_i = (np.array(v) for v in zip(*pairs, strict=True))
    lower, upper = table[:, lo_i].astype(np.float64), table[:, hi_i].astype(np.float64)
    centre = O.centre_of(np.stack(forecasts, axis=1), lower, upper)  # [N, P]
    need = O.needed_scale(np.stack(realised, axis=1), lower, upper, centre)
    s = O.track(need, last_rows, last_rows[:, None] + np.array(steps)[None], links, np.array(alphas))
    n, n_levels = len(table), len(predictor.levels)
    lower, upper = (b.reshape(n, -1, n_levels) for b in O.rescale(lower, upper, s, centre))  # [N, columns, L]
    lower, upper = (b.reshape(n, -1) for b in O.nested(lower, upper, predictor.levels, axis=2))
    out = table.copy()
    pair_ranges = np.array(ranges).T  # [2, P]: widened bounds stay inside the targets' ranges, as the graph's do
    out[:, lo_i], out[:, hi_i] = clip_to(lower, pair_ranges), clip_to(upper, pair_ranges)
    return out


def cmd_forecast(argv: list[str]) -> None:
    """``python -m dwcp_lstm forecast``: forecasts per link (or per window) from an exported model."""
    import argparse
    import sys

    class ArgumentParser(argparse.ArgumentParser):
        """stdlib argparse (a serving install has no jsonargparse); a bad flag is a ConfigError, which the
        CLI prints as one ``error:`` line with exit code 2, instead of argparse's usage text."""

        def error(self, message: str):
            raise ConfigError(" ".join(message.split()))

    p = ArgumentParser(
        prog="python -m dwcp_lstm forecast",
        description="Next-step forecasts per link from model.onnx + model_metadata.json (no torch needed).",
    )
    p.add_argument("--model", required=True, help="model.onnx of a run, or the run directory")
    p.add_argument("--metadata", default=None, help="model_metadata.json; default: beside the model")
    p.add_argument("--input", required=True, help="telemetry CSV or Parquet with the model's feature columns")
    p.add_argument("--output", default=None, help=".csv or .parquet to write (atomically); default: CSV on stdout")
    p.add_argument("--rolling", action="store_true", help="one forecast per window instead of one per link")
    p.add_argument(
        "--extrapolate",
        action="store_true",
        help="forecast inputs far outside the training rows' range too (refused by default: usually another unit)",
    )
    p.add_argument("--online", action="store_true", help="recalibrate the interval bounds from the outcomes realised "
                   "earlier in the input, per link (adaptive conformal; docs/method.md)")  # fmt: skip
    p.add_argument(
        "--series-columns", default=None, help="comma-separated link id columns ('' = one); default: as trained"
    )
    p.add_argument("--time-column", default=None, help="numeric time column that orders each link; default: as trained")
    add_reading_flags(p)
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    a = p.parse_args(argv)

    check_named(a.model, "--model", "a model.onnx or a run directory")
    check_named(a.input, "--input", "a telemetry .csv or .parquet file")
    if a.output is not None and not a.output.strip():  # '' used to mean stdout, silently
        raise ConfigError("--output must name a .csv or .parquet file (leave it out for CSV on stdout), got ''")
    output = Path(a.output) if a.output else None
    if output is not None:
        check_table_suffix(output)
        check_output_file(output)
    model = Path(a.model)
    if model.is_dir():
        model, metadata = model_path_of(model), a.metadata or model / METADATA_NAME
    else:
        metadata = a.metadata
    predictor = Predictor(model, metadata, a.threads)
    predictor.extrapolate = a.extrapolate
    if a.online:
        check_online(predictor, str(predictor.model_path))
    if output is not None:
        for path in [Path(a.input), *predictor.protected_paths()]:
            if same_file(output, path):
                raise ConfigError(f"{output}: --output is the same file as {path}; refusing to overwrite an input")
    trained = predictor.metadata["series"]
    df, series, time = predictor.read_telemetry(a.input, a.series_columns, a.time_column)
    if output is None or output.suffix.lower() not in PARQUET_SUFFIXES:
        check_no_formulas(df, series, a.input)
    out = forecast_table(predictor, df, series, time, a.input, a.rolling, a.duplicates, float(trained["max_gap"]),
                         a.online, a.fill_missing)  # fmt: skip

    units = ", ".join(f"{t} [{u}]" for t, u in predictor.units.items())
    n_links = out.groupby(series, observed=True).ngroups if series else 1
    csv_out = out
    # the 7 digits below are for forecasts, not keys: a time 1762134000.25 stays, and so does a float link id (a
    # Parquet's 1.0000001 beside 1.0 were both written "1": two rows of one name)
    keys = [c for c in (*series, time) if pd.api.types.is_float_dtype(out[c])]
    if keys:
        csv_out = out.assign(**{c: [repr(float(v)) for v in out[c]] for c in keys})
    ahead = "next step" if predictor.horizon == 1 else f"next {predictor.horizon} steps"
    what = f"{len(out)} forecasts ({'every window' if a.rolling else ahead}) for {n_links} links"
    if output is None:
        sys.stdout.write(csv_out.to_csv(index=False, float_format="%.7g", lineterminator="\n"))
        print(f"{what}; units: {units}", file=sys.stderr)  # stdout stays pure CSV
    else:
        parquet = output.suffix.lower() in PARQUET_SUFFIXES  # typed columns: the time stays a number (.pq too)
        write_frame(out if parquet else csv_out, output, float_format="%.7g")  # float32: ~7 digits
        print(f"wrote {what} -> {output}; units: {units}")


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # what spreadsheets read as the start of a formula (OWASP)
PLAIN_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"  # "-7", "+1.5e3": a value, not a formula


def check_no_formulas(df: pd.DataFrame, columns: Sequence[str], source: str | Path) -> None:
    """Refuse a link id that a spreadsheet opening the forecast CSV would run as a formula (``=cmd|' /C calc'!A0``,
    ``@SUM(...)``, ``-2+3+cmd|...``): the ids are copied into every row of the output. Plain numbers (``-1``) are
    safe. Refused rather than escaped: an escaped id (a leading ') is another link's name to whatever joins on it;
    Parquet output keeps every id typed and is not checked."""
    for col in columns:
        if pd.api.types.is_numeric_dtype(df[col]) or pd.api.types.is_bool_dtype(df[col]):
            continue
        text = df[col].astype(str)
        bad = text.str.startswith(FORMULA_START) & ~text.str.fullmatch(PLAIN_NUMBER)
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(
                f"{source}: column {col!r} row {i + 1}: link id {short_repr(text.iloc[i])} starts with "
                f"{text.iloc[i][0]!r}, which a spreadsheet runs as a formula when it opens the forecast CSV; "
                "rename the link or write Parquet (--output FILE.parquet)"
            )


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (links included); by resolved path when either does not exist."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        pass
    try:
        return a.resolve() == b.resolve()
    except (OSError, RuntimeError, ValueError):  # a link loop
        return os.path.abspath(a) == os.path.abspath(b)

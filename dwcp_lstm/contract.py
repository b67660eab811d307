"""The contract between ``model.onnx`` and ``model_metadata.json``, in one place for the exporter and the predictor.

Why: the metadata's ``model_sha256`` proves the graph is the one exported, but not that the JSON beside it still
describes that graph (swap two ``features`` and every forecast is silently wrong). So the export embeds the fields
that decide how inputs are read and outputs meant (:data:`CONTRACT_KEYS`, as canonical JSON) in the graph's
``metadata_props`` under :data:`CONTRACT_KEY`, with the sha256 of any external-data side file. The predictor reads
that copy through onnxruntime and refuses a JSON that differs from it.

The reading side is torch-free and onnx-free (a serving install has numpy, pandas and onnxruntime only); the two
writing helpers at the end import ``onnx`` when called.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np

from dwcp_lstm.errors import ConfigError, ModelFileError, not_a_regular_file
from dwcp_lstm.intervals import SCALES
from dwcp_lstm.tables import DUPLICATE_POLICIES, atomic_write, check_clock, first_line, sha256_of, short_repr

MODEL_NAME = "model.onnx"
METADATA_NAME = "model_metadata.json"
FORMAT_PREFIX = "dwcp_lstm.onnx/"
FORMAT = FORMAT_PREFIX + "2"  # 2: the contract is embedded in the graph
INPUT_NAME, OUTPUT_NAME = "metrics", "forecast"
CONTRACT_KEY = "dwcp_lstm.contract"
CONTRACT_KEYS = (
    "format", "window_size", "features", "targets", "target_mode", "input", "output", "series", "external_data",
    "intervals",
)  # fmt: skip
TARGET_MODES = ("delta", "level")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MISSING = object()


# -- model_metadata.json -------------------------------------------------------------------------------------------
def model_path_of(run_dir: str | Path) -> Path:
    """The model file of a run directory: the name its metadata records (``model_file``; ``--onnx.filename`` may
    differ from model.onnx), else model.onnx. Every reader of a run (Predictor.from_run, report, bench) asks here."""
    run_dir = Path(run_dir)
    name: Any = MODEL_NAME
    meta_path = run_dir / METADATA_NAME
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (ValueError, OSError, RecursionError):
            meta = None  # load_metadata names the problem when the predictor reads it
        if isinstance(meta, dict):
            name = meta.get("model_file", MODEL_NAME)
    _check_model_file(name, meta_path)
    return run_dir / name


def _check_model_file(name: Any, path: str | Path) -> None:
    if not isinstance(name, str) or Path(name).name != name or not name.endswith(".onnx") or name.startswith("."):
        what = f"a plain file name ending in .onnx, got {short_repr(name)}"
        raise ModelFileError(f"{path}: key 'model_file' must be {what}")


def load_metadata(path: str | Path) -> dict[str, Any]:
    """Read and validate ``model_metadata.json``; every problem is a :class:`ModelFileError` naming the file and key."""
    path = Path(path)
    if path.is_dir():
        raise ModelFileError(f"{path}: is a directory, expected the model_metadata.json file")
    problem = not_a_regular_file(path)
    if problem == "file not found":
        raise ModelFileError(f"{path}: file not found (the metadata is written beside model.onnx at fit end)")
    if problem:
        raise ModelFileError(f"{path}: {problem}")
    try:
        meta = json.loads(path.read_bytes())
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # ValueError: bad JSON, or an int too long
        raise ModelFileError(f"{path}: not valid JSON ({first_line(exc)})") from None
    if not isinstance(meta, dict):
        raise ModelFileError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    validate_metadata(meta, path)
    return meta


def validate_metadata(meta: Mapping[str, Any], path: str | Path) -> None:
    """Check every key the predictor and ``forecast`` use: presence, types, ranges, and that the shapes agree with
    the column lists (a wrong type must be a one-line error, never a traceback further down)."""

    def need(key: str, kind: type | tuple[type, ...], where: Mapping[str, Any] = meta, prefix: str = "") -> Any:
        if key not in where:
            raise ModelFileError(f"{path}: missing key {prefix + key!r}")
        value = where[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int subclass: a JSON true must not pass as a window size or a gap
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = "number" if float in kinds else " or ".join(_json_type(k) for k in kinds)
            raise ModelFileError(f"{path}: key {prefix + key!r} must be {names}, got {_json_type(type(value))}")
        return value

    def name_list(key: str, value: list, allow_empty: bool) -> list[str]:
        if not value and not allow_empty:
            raise ModelFileError(f"{path}: key {key!r} must not be empty")
        if not all(isinstance(c, str) and c for c in value):
            raise ModelFileError(f"{path}: key {key!r} must list non-empty strings, got {short_repr(value)}")
        if len(set(value)) != len(value):
            raise ModelFileError(f"{path}: key {key!r} lists a column twice: {short_repr(value)}")
        return value

    fmt = need("format", str)
    if not fmt.startswith(FORMAT_PREFIX):
        raise ModelFileError(f"{path}: key 'format' is {fmt!r}, expected {FORMAT_PREFIX}<n> (not a dwcp_lstm model?)")
    if fmt != FORMAT:
        raise ModelFileError(
            f"{path}: key 'format' is {fmt!r}, this version reads {FORMAT!r} only (the model and metadata carry no "
            "matching contract): export the model again with this version (python -m dwcp_lstm export --run RUN_DIR)"
        )
    window = need("window_size", int)
    if window <= 0:
        raise ModelFileError(f"{path}: key 'window_size' must be > 0, got {window}")
    names: dict[str, list[str]] = {}
    for key in ("features", "targets"):
        cols = need(key, list)
        if not cols:
            raise ModelFileError(f"{path}: key {key!r} must not be empty")
        for i, c in enumerate(cols):
            if not isinstance(c, dict) or not isinstance(c.get("name"), str) or not c["name"]:
                raise ModelFileError(f"{path}: key '{key}[{i}]' must be an object with a non-empty string 'name'")
            if "unit" in c and not isinstance(c["unit"], str):
                raise ModelFileError(f"{path}: key '{key}[{i}].unit' must be str, got {type(c['unit']).__name__}")
            if "range" in c and key == "targets":  # what the graph clips its forecasts into (optional)
                _check_range(c["range"], f"{path}: key '{key}[{i}].range'")
            if "train_range" in c and key == "features":  # the training rows' min and max (optional)
                _check_range(c["train_range"], f"{path}: key '{key}[{i}].train_range'", finite=True)
        names[key] = name_list(key, [c["name"] for c in cols], allow_empty=False)
    mode = need("target_mode", str)
    if mode not in TARGET_MODES:
        raise ModelFileError(f"{path}: key 'target_mode' must be one of {', '.join(TARGET_MODES)}, got {mode!r}")
    if mode == "delta" and not set(names["targets"]) <= set(names["features"]):
        missing = [t for t in names["targets"] if t not in names["features"]]
        raise ModelFileError(f"{path}: key 'target_mode' is delta but targets {missing} are not among the features")
    series = need("series", dict)
    columns = name_list("series.columns", need("columns", list, series, "series."), allow_empty=True)
    time = need("time_column", str, series, "series.")
    if not time or time in columns:
        raise ModelFileError(
            f"{path}: key 'series.time_column' must be a non-empty name not in series.columns, got {time!r}"
        )
    max_gap = need("max_gap", (int, float), series, "series.")
    if not math.isfinite(max_gap):
        raise ModelFileError(f"{path}: key 'series.max_gap' must be a finite number, got {max_gap}")
    if "cadence_s" in series:  # the training data's cadence (optional: exports before it lack it)
        cadence = series["cadence_s"]
        if isinstance(cadence, bool) or not isinstance(cadence, int | float) or not 0 < cadence < math.inf:
            raise ModelFileError(f"{path}: key 'series.cadence_s' must be a number of seconds > 0, got "
                                 f"{short_repr(cadence)}")  # fmt: skip
    if series.get("duplicates", "error") not in DUPLICATE_POLICIES:  # how training read its rows (optional keys)
        raise ModelFileError(f"{path}: key 'series.duplicates' must be one of {', '.join(DUPLICATE_POLICIES)}, got "
                             f"{short_repr(series['duplicates'])}")  # fmt: skip
    if not isinstance(series.get("fill_missing", False), bool):
        raise ModelFileError(f"{path}: key 'series.fill_missing' must be true or false, got "
                             f"{short_repr(series['fill_missing'])}")  # fmt: skip
    if "clock" in series or "start_format" in series:  # wall-clock inputs (tables.add_clock), optional
        try:
            check_clock(series.get("clock"), series.get("start_format"), names["features"], names["targets"],
                        columns, where="key series.")  # fmt: skip
        except ConfigError as exc:
            raise ModelFileError(f"{path}: {exc}") from None
    external = need("external_data", dict)
    for location, digest in external.items():
        if not location or not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise ModelFileError(
                f"{path}: key 'external_data' must map file names to 64 lowercase hex digits, got "
                f"{short_repr(location)}: {short_repr(digest)}"
            )
    if "model_file" in meta:
        _check_model_file(meta["model_file"], path)
    sha = need("model_sha256", str)
    if not _SHA256.fullmatch(sha):
        raise ModelFileError(f"{path}: key 'model_sha256' must be 64 lowercase hex digits, got {sha!r}")
    out_shape = meta.get("output", {}).get("shape") if isinstance(meta.get("output"), dict) else None
    horizon = out_shape[1] if isinstance(out_shape, list) and len(out_shape) == 3 else 1
    three = isinstance(out_shape, list) and len(out_shape) == 3  # a scalar shape is refused below, by type
    if three and (isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 2):
        what = f"an integer >= 2 (the horizon), got {short_repr(horizon)}"
        raise ModelFileError(f"{path}: key 'output.shape[1]' must be {what}")
    for key, expected in (
        ("input", ["batch", window, len(names["features"])]),
        ("output", output_shape(horizon, len(names["targets"]))),
    ):
        io = need(key, dict)
        if not need("name", str, io, f"{key}."):
            raise ModelFileError(f"{path}: key '{key}.name' must not be empty")
        shape = need("shape", list, io, f"{key}.")
        if shape[1:] != expected[1:] or len(shape) != len(expected):
            raise ModelFileError(
                f"{path}: key '{key}.shape' is {short_repr(shape)}, expected {expected} (from window_size/{key}s)"
            )
        dtype = need("dtype", str, io, f"{key}.")
        if dtype != "float32":
            raise ModelFileError(f"{path}: key '{key}.dtype' is {dtype!r}, only float32 is supported")
    intervals = meta.get("intervals")
    if intervals is not None:
        levels = need("levels", list, need("intervals", dict), "intervals.")
        numbers = all(not isinstance(v, bool) and isinstance(v, int | float) and 0 < v < 1 for v in levels)
        if not levels or not numbers or len(set(levels)) != len(levels):
            what = f"distinct numbers in (0, 1), got {short_repr(levels)}"
            raise ModelFileError(f"{path}: key 'intervals.levels' must be {what}")
        expected = interval_contract(levels, horizon, len(names["targets"]))["outputs"]
        if intervals.get("outputs") != expected:
            raise ModelFileError(
                f"{path}: key 'intervals.outputs' is {short_repr(intervals.get('outputs'))}, expected {expected}"
            )
        scales = intervals.get("scales")
        if scales is not None and (
            not isinstance(scales, list) or len(scales) != len(names["targets"]) or not set(scales) <= set(SCALES)
        ):
            raise ModelFileError(
                f"{path}: key 'intervals.scales' must list one of {list(SCALES)} per target, got {short_repr(scales)}"
            )
        if intervals.get("beyond_horizon") is not None:
            check_beyond_horizon(intervals["beyond_horizon"], len(levels), horizon, len(names["targets"]), path)


def _check_range(value: Any, where: str, finite: bool = False) -> None:
    """``[low, high]``, each a finite number or (unless ``finite``) null, unbounded; low < high (``finite``: <=)."""
    edges = value if isinstance(value, list) and len(value) == 2 else None
    ok = edges is not None and all(
        (v is None and not finite) or (not isinstance(v, bool) and isinstance(v, int | float) and math.isfinite(v))
        for v in edges
    )
    if ok and edges[0] is not None and edges[1] is not None:
        ok = edges[0] <= edges[1] if finite else edges[0] < edges[1]
    if not ok:
        what = "two numbers, low <= high" if finite else "numbers or null, low < high"
        raise ModelFileError(f"{where} must be [low, high] ({what}), got {short_repr(value)}")


def check_beyond_horizon(beyond: Any, n_levels: int, horizon: int, n_targets: int, path: str | Path) -> None:
    """``intervals.beyond_horizon``: the tail calibration the planner applies (``dwcp_lstm.intervals``)."""
    key = "intervals.beyond_horizon"
    steps = beyond.get("steps") if isinstance(beyond, dict) else None
    if not isinstance(steps, int) or isinstance(steps, bool) or steps <= horizon:
        raise ModelFileError(f"{path}: key '{key}.steps' must be an integer > the horizon {horizon}")
    shapes = [("lo", (n_levels, steps - horizon, n_targets)), ("hi", (n_levels, steps - horizon, n_targets)),
              ("floor", (n_targets,)), ("adaptive", (n_targets,))]  # fmt: skip
    if "fitted" in beyond:  # the fitted scale (intervals.fit_spread); absent in metadata written before it
        shapes += [("fitted", (n_targets,)), ("spread", (1 + 3 * n_targets, n_targets)),
                   ("spread_floor", (3, n_targets))]  # fmt: skip
    if "centre" in beyond:  # the tail's centre (intervals.calibrate_tail); absent before 2026-12-02: the held mean
        shapes += [("centre", (steps - horizon, 2, n_targets))]
    for name, shape in shapes:
        flags = name in ("adaptive", "fitted")
        try:
            arr = np.asarray(beyond.get(name), dtype=object if flags else np.float64)
            ok = arr.shape == shape and (
                all(isinstance(v, bool) for v in arr.ravel()) if flags else bool(np.isfinite(arr).all())
            )
            ok = ok and (name != "spread_floor" or bool((arr > 0).all()))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            what = "true/false values" if flags else "finite numbers" + (" > 0" if name == "spread_floor" else "")
            raise ModelFileError(f"{path}: key '{key}.{name}' must be {what} of shape {list(shape)}")


# -- the contract --------------------------------------------------------------------------------------------------
def output_shape(horizon: int, n_targets: int) -> list:
    """``["batch", T]`` for a one-step model (the original contract), ``["batch", H, T]`` for H steps."""
    return ["batch", n_targets] if horizon == 1 else ["batch", horizon, n_targets]


def horizon_of(meta: Mapping[str, Any]) -> int:
    """The number of steps a (validated) model forecasts, from its output shape."""
    shape = meta["output"]["shape"]
    return shape[1] if len(shape) == 3 else 1


def make_contract(
    window_size: int,
    features: list[dict[str, str]],
    targets: list[dict[str, str]],
    target_mode: str,
    series: dict[str, Any],
    external_data: dict[str, str],
    horizon: int = 1,
    interval_levels: list[float] | None = None,
    beyond_horizon: dict[str, Any] | None = None,
    interval_scales: list[str] | None = None,
) -> dict[str, Any]:
    """The contract of an export; the metadata JSON carries the same keys with the same values."""
    return {
        "format": FORMAT,
        "window_size": window_size,
        "features": features,
        "targets": targets,
        "target_mode": target_mode,
        "input": {"name": INPUT_NAME, "shape": ["batch", window_size, len(features)], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": output_shape(horizon, len(targets)), "dtype": "float32"},
        "series": series,
        "external_data": external_data,
        "intervals": interval_contract(interval_levels, horizon, len(targets), beyond_horizon, interval_scales),
    }


def interval_contract(
    levels: list[float] | None, horizon: int, n_targets: int, beyond_horizon: dict[str, Any] | None = None,
    scales: list[str] | None = None,
) -> dict[str, Any] | None:  # fmt: skip
    """The interval outputs: their nominal levels and, per output, its shape (None: a graph without intervals); with
    ``beyond_horizon`` (``Calibration.beyond_horizon``) the calibration of the mean beyond the forecast, which the
    planner applies (in the contract, so that it is as tamper-evident as the graph's own bounds).

    ``lower``/``upper`` are ``[batch, L, T]`` for a one-step model and ``[batch, L, H, T]`` otherwise; a multi-step
    model adds ``mean_lower``/``mean_upper`` ``[batch, L, H, T]`` for the mean over the first k steps (axis 2 is k - 1).
    """
    if not levels:
        return None
    shape = ["batch", len(levels), *output_shape(horizon, n_targets)[1:]]
    names = ["lower", "upper", "mean_lower", "mean_upper"] if horizon > 1 else ["lower", "upper"]
    out = {"levels": [float(v) for v in levels], "outputs": {n: shape for n in names}}
    if scales is not None:  # per target, which scale the graph's bounds use (intervals.SCALES): for the reader
        out["scales"] = list(scales)
    return out if beyond_horizon is None else {**out, "beyond_horizon": beyond_horizon}


def contract_of(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The contract part of a metadata dict (keys it lacks stay absent, so a comparison names them)."""
    return {k: meta[k] for k in CONTRACT_KEYS if k in meta}


def canonical(value: Any) -> str:
    """One spelling per value (sorted keys, ASCII, no spaces): what is embedded and what is compared.

    Compared as text, so 20 and 20.0 or 1 and true differ, as an edit of the file should."""
    return json.dumps(value, sort_keys=True, ensure_ascii=True, separators=(",", ":"), allow_nan=True)


def parse_embedded(props: Mapping[str, str], model_path: str | Path) -> dict[str, Any]:
    """The contract from a graph's ``metadata_props`` (onnxruntime's ``custom_metadata_map``)."""
    text = props.get(CONTRACT_KEY)
    if text is None:
        raise ModelFileError(
            f"{model_path}: no embedded contract ({CONTRACT_KEY!r}): exported before {FORMAT} or by another tool; "
            "export the model again with this version (python -m dwcp_lstm export --run RUN_DIR)"
        )
    try:
        contract = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ModelFileError(f"{model_path}: embedded contract is not valid JSON ({first_line(exc)})") from None
    if not isinstance(contract, dict):
        raise ModelFileError(f"{model_path}: embedded contract must be a JSON object, got {type(contract).__name__}")
    return contract


def compare_contract(
    declared: Mapping[str, Any], embedded: Mapping[str, Any], metadata_path: str | Path, model_path: str | Path
) -> None:
    """Refuse metadata whose contract keys differ from the graph's copy, naming the first key path that differs."""
    for key in CONTRACT_KEYS:
        a, b = declared.get(key, _MISSING), embedded.get(key, _MISSING)
        if a is _MISSING and b is _MISSING:  # an optional key (e.g. intervals) that neither has
            continue
        if a is _MISSING or b is _MISSING or canonical(a) != canonical(b):
            where, x, y = _first_difference(a, b, key)
            raise ModelFileError(
                f"{metadata_path}: key {where!r} is {_show(x)} but the contract embedded in {Path(model_path).name} "
                f"says {_show(y)}: the metadata was edited or belongs to another model"
            )


# -- external data -------------------------------------------------------------------------------------------------
def external_path(folder: str | Path, location: str, source: str | Path) -> Path:
    """The side file at ``location``, refused when it is absolute or leaves ``folder`` (``..``, a link outside).

    A backslash is refused too: onnxruntime reads it as part of a file name on POSIX and as a separator on Windows,
    so the file checked here might not be the one loaded."""
    if (
        not location
        or "\x00" in location
        or "\\" in location
        or PurePosixPath(location).is_absolute()
        or PureWindowsPath(location).drive
        or ".." in PurePosixPath(location).parts
    ):
        raise ModelFileError(
            f"{source}: external-data location {location!r} escapes the model's folder (absolute, '..' or a backslash)"
        )
    folder = Path(folder)
    path = folder / location
    try:
        inside = path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError):  # a link loop
        inside = False
    if not inside:
        where = f"external-data location {location!r}"
        raise ModelFileError(f"{source}: {where} escapes the model's folder (a link outside)")
    return path


def check_external_data(
    external: Mapping[str, str], folder: str | Path, metadata_path: str | Path, copy_to: Path | None = None
) -> None:  # fmt: skip
    """Every side file inside ``folder``, present, with the sha256 the metadata lists; with ``copy_to``, the very
    bytes checked are written there (the folder onnxruntime then loads from: it can read no side file the metadata
    does not list, and none that changed after its check)."""
    for location, digest in external.items():
        path = external_path(folder, location, metadata_path)
        if not path.is_file():
            raise ModelFileError(f"{path}: external-data file not found (listed in {Path(metadata_path).name})")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelFileError(f"{path}: cannot read ({exc.strerror or exc})") from None
        sha = hashlib.sha256(data).hexdigest()
        if sha != digest:
            raise ModelFileError(
                f"{path}: sha256 {sha[:12]}... does not match {Path(metadata_path).name} key 'external_data' "
                f"({digest[:12]}...): the side file was altered or belongs to another model"
            )
        if copy_to is not None:
            (copy_to / location).parent.mkdir(parents=True, exist_ok=True)
            (copy_to / location).write_bytes(data)


# -- writing side (training only: imports onnx) ----------------------------------------------------------------------
def external_data_hashes(model_path: str | Path) -> dict[str, str]:
    """``{location: sha256}`` of the external-data files the graph references (none for this project's exports)."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    model_path = Path(model_path)
    model = onnx.load(str(model_path), load_external_data=False)
    locations = sorted({ExternalDataInfo(t).location for t in _get_all_tensors(model) if uses_external_data(t)})
    return {loc: sha256_of(external_path(model_path.parent, loc, model_path)) for loc in locations}


def embed_contract(model_path: str | Path, contract: Mapping[str, Any]) -> None:
    """Write ``contract`` into the graph's ``metadata_props`` (other props kept), atomically; no-op when present."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)  # side files stay as they are
    props = {p.key: p.value for p in model.metadata_props}
    text = canonical(dict(contract))
    if props.get(CONTRACT_KEY) == text:
        return
    props[CONTRACT_KEY] = text
    onnx.helper.set_model_props(model, props)
    atomic_write(model_path, model.SerializeToString())


# -- messages ------------------------------------------------------------------------------------------------------
def _first_difference(a: Any, b: Any, where: str) -> tuple[str, Any, Any]:
    """The deepest key path at which two JSON values first differ, with the two values there."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            x, y = a.get(k, _MISSING), b.get(k, _MISSING)
            if x is _MISSING or y is _MISSING or canonical(x) != canonical(y):
                return _first_difference(x, y, f"{where}.{k}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if canonical(x) != canonical(y):
                return _first_difference(x, y, f"{where}[{i}]")
    return where, a, b


def _show(value: Any) -> str:
    return "absent" if value is _MISSING else short_repr(value)


def _json_type(kind: type) -> str:
    return {dict: "object", type(None): "null"}.get(kind, kind.__name__)

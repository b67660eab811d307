"""Leak-free windowed splits of per-link telemetry.

Split semantics (per link, across its segments; see :mod:`dwcp_lstm.tables` for how gaps make segments): the link's
rows are cut chronologically into train / val / test by the split fractions, whatever gaps lie between them; windows
stay within one segment. A window of ``window_size`` rows forecasts the row right after it, and belongs to the split
of that *target* row. Validation and test inputs may reach back into the previous split: at forecast time the past is
known, and dropping those windows would waste ``window_size`` targets per split boundary. So every val target is later
than every train target of its link, every test target later than every val target, and no window spans two series.
Scalers see exactly the training rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.utilities import rank_zero_info
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader, Dataset, Sampler

from dwcp_lstm import synthetic
from dwcp_lstm.errors import check_seed
from dwcp_lstm.model import CyclicEncoding
from dwcp_lstm.runtime import MAX_THREADS
from dwcp_lstm.tables import (
    CADENCE_TOLERANCE,
    DUPLICATE_POLICIES,
    LINK_SEPARATOR,
    ConfigError,
    DataError,
    add_clock,
    cadence_of,
    check_clock,
    check_numeric,
    fill_missing,
    log,
    order_series,
    printable,
    probe_writable,
    read_table,
    segment_bounds,
    series_codes,
    sha256_of,
)

FEATURES = [
    "throughput_mbps", "rtt_ms", "packet_loss", "jitter_ms", "time_of_day", "day_of_week",
    "congestion_window", "queue_depth", "retransmits",
]  # fmt: skip
TARGETS = list(synthetic.TARGETS)
STAGES = ("train", "val", "test")
ORACLE_STEPS = 12  # the built-in dataset's sidecar covers horizons up to this (see DwcpDataModule.oracle_steps)
ORACLE_MC_CAP = 2_200_000  # rows x (steps - 1) of the h-step oracle's Monte Carlo: 200,000 rows x 12 steps, ~1 min


def check_same_data(dm: DwcpDataModule, state: dict | None, what: str) -> None:
    """``dm`` reads the file whose sha256 ``state`` (a checkpoint's data-module state) records; older checkpoints
    record none and pass. Only a regular file is hashed (a FIFO or /dev/zero never ends; its reader refuses it)."""
    saved = (state or {}).get("data_sha256")
    if saved and dm.path.is_file() and dm.data_sha256() != saved:
        raise DataError(f"{dm.path}: the file changed since {what} was trained on it (its bytes: sha256 "
                        f"{dm.data_sha256()[:12]} vs {saved[:12]}): its splits may not be the rows the run held out; "
                        "point data.data_path at the file the run was trained on")  # fmt: skip


LATEST_UNIX_S = 95_617_584_000.0  # 5000-01-01 in Unix seconds: a later time column is in other units


class LeakageError(RuntimeError):
    """The leakage audit found a window or scaler that sees what it must not."""


class WindowDataset(Dataset):
    """Windows by index arithmetic over one contiguous array: item i is ``x[s:s+W], y[s+W]`` with ``s = starts[i]``.

    Memory is O(rows): nothing of shape [N, W, F] is ever built except the batch being served.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, starts: np.ndarray, window: int) -> None:
        self.x, self.y, self.window = x, y, window  # [rows, F], [rows, T]
        self.starts = torch.as_tensor(starts, dtype=torch.int64)  # [N]
        self._offsets = torch.arange(window)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = int(self.starts[i])
        return self.x[s : s + self.window], self.y[s + self.window]

    def __getitems__(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole batch in two gathers (the DataLoader calls this instead of __getitem__ per item)."""
        s = self.starts[torch.as_tensor(idx, dtype=torch.int64)]  # [B]
        return self.x[s[:, None] + self._offsets], self.y[s + self.window]  # [B, W, F], [B, H * T] step-major


def collate_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``__getitems__`` already returns a batch; module-level so that worker processes can pickle it."""
    return batch


class EpochShuffleSampler(Sampler[int]):
    """A permutation drawn from ``seed + epoch``: the order of epoch e never depends on what ran before.

    Lightning calls ``set_epoch`` before each epoch, so a run resumed from a checkpoint sees the same batches.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


@dataclass(frozen=True)
class Scalers:
    """The train-fit standardisation of a dataset: what a model needs to take raw inputs and give raw outputs.

    The DataModule exposes it (:attr:`DwcpDataModule.scalers`), the LightningModule stores it in checkpointed
    buffers (:meth:`~dwcp_lstm.module.DwcpForecaster.set_scalers`); this object is the whole hand-off between them.
    In ``delta`` mode the target statistics are those of the one-step changes.
    """

    features: tuple[str, ...]
    targets: tuple[str, ...]
    target_mode: str
    feature_mean: np.ndarray  # [F]
    feature_scale: np.ndarray  # [F]
    target_mean: np.ndarray  # [H * T], step-major
    target_scale: np.ndarray  # [H * T]
    horizon: int = 1


@dataclass(frozen=True)
class SyntheticSpec:
    """The built-in generated dataset, used when ``data_path`` is null.

    Args:
        samples: total rows (see :func:`dwcp_lstm.synthetic.generate`).
        seed: generator seed.
        profile: ``dynamic`` or ``seed``.
        links: number of links; null = samples / 3000.
        noise: relative measurement noise of the targets.
    """

    samples: int = 15_000
    seed: int = 42
    profile: str = "dynamic"
    links: int | None = None
    noise: float = 0.02


class DwcpDataModule(L.LightningDataModule):
    """Per-link windows of telemetry for next-step forecasting; batches are ``(x [B, W, F], y [B, T])``, scaled."""

    def __init__(
        self,
        data_path: str | None = None,
        window_size: int = 20,
        horizon: int = 1,
        batch_size: int = 64,
        split: tuple[float, float, float] = (0.70, 0.15, 0.15),
        features: list[str] = FEATURES,  # noqa: B006 (jsonargparse needs the literal default; never mutated)
        targets: list[str] = TARGETS,  # noqa: B006
        series_columns: list[str] = synthetic.LINK_COLUMNS,  # noqa: B006
        time_column: str = "timestamp",
        target_mode: str = "delta",
        duplicates: str = "error",
        max_gap: float = 3.0,
        fill_missing: bool = False,
        num_workers: int = 0,
        seed: int = 42,
        synthetic: SyntheticSpec = SyntheticSpec(),  # noqa: B008 (frozen, so sharing the default is safe)
        data_dir: str = "data",
        cyclic: dict[str, float] | None = None,
        clock: dict[str, float] | None = None,
        series_start: str | None = None,
    ) -> None:
        """
        Args:
            data_path: CSV or Parquet telemetry; null = the built-in synthetic dataset under ``data_dir``, generated
                on first use. A path you name must exist.
            window_size: rows of history per forecast.
            horizon: rows forecast at once (direct multi-output): the targets of the ``horizon`` rows after the
                window. Every one of them lies in the window's split.
            batch_size: windows per batch.
            split: train / val / test fractions of each series, in time order; must sum to 1.
            features: input columns, in order (the model's input width follows).
            targets: forecast columns, taken at the row after the window (the model's output width follows).
            series_columns: columns that identify one series (a link); windows never cross series.
            time_column: numeric time (e.g. Unix seconds) that orders each series.
            target_mode: ``delta`` (default): the network learns the change from the window's last value of each
                target, which must then be among the features; ``level``: the value itself. Forecasts and metrics
                are in original units either way.
            duplicates: repeated (series, time) rows: ``error``, ``first`` (keep it) or ``mean``.
            max_gap: a step larger than this multiple of a series' median cadence splits the series; <= 0: never.
            fill_missing: fill empty cells with the last known value of their series (real traces have gaps in
                slow-changing radio measurements); false: an empty cell is an error.
            num_workers: DataLoader worker processes.
            seed: seed of the training shuffle (epoch e uses seed + e).
            synthetic: parameters of the built-in dataset used when ``data_path`` is null.
            data_dir: where the built-in dataset is written.
            cyclic: calendar features and their periods, e.g. ``{time_of_day: 24, day_of_week: 7}``: the network
                (and the report's ridge and boosted trees, which see the same inputs) read each as the sine and
                cosine of ``2 pi value / period``, so that 23:00 lies next to 00:00. The conversion is part of the
                network, so the exported model still takes the raw column. Linked to ``model.cyclic``.
            clock: wall-clock inputs, e.g. ``{beat_s: 15}``: a new column holding the row's wall-clock time in
                seconds modulo the period, derived from the time column (and ``series_start``) here and, the same
                way, by ``forecast`` and ``plan``, whose input needs only the file's own columns. List it among the
                features, and in ``cyclic`` with the same period to read it as a phase.
            series_start: strptime format of the series column when each series id is its start time and the time
                column counts seconds from it, e.g. ``'%Y-%m-%d-%H-%M-%S'`` (one series column); null: the time
                column is the wall-clock time (Unix seconds). Used by ``clock`` only.
        """
        super().__init__()
        self.save_hyperparameters()
        _check_config(window_size, batch_size, split, features, targets, num_workers, target_mode, seed)
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
            raise ConfigError(f"--data.horizon must be an integer >= 1, got {horizon!r}")
        _check_series_config(series_columns, time_column, duplicates, max_gap, [*features, *targets])
        self.cyclic = check_cyclic(cyclic, features, targets)
        self.clock = check_clock(clock, series_start, features, targets, series_columns)
        self.series_start = series_start
        self.data_path, self.window_size, self.batch_size = data_path, window_size, batch_size
        self.horizon = horizon
        self.split, self.features, self.targets = tuple(split), list(features), list(targets)
        self.series_columns, self.time_column = list(series_columns), time_column
        self.duplicates, self.max_gap, self.num_workers, self.seed = duplicates, max_gap, num_workers, seed
        self.target_mode, self.fill_missing = target_mode, fill_missing
        self.synthetic, self.data_dir = synthetic, data_dir
        self.datasets: dict[str, WindowDataset] = {}
        # set by setup(): the train-fit scalers (sklearn, for the baselines) and their hand-off to the model
        self.feature_scaler: StandardScaler | None = None
        self.target_scaler: StandardScaler | None = None

    @property
    def scalers(self) -> Scalers | None:
        """The scalers this module scales with (None before setup): a model trained on it stores them."""
        if self.feature_scaler is None or self.target_scaler is None:
            return None
        fs, ts = self.feature_scaler, self.target_scaler
        return Scalers(tuple(self.features), tuple(self.targets), self.target_mode,
                       fs.mean_.copy(), fs.scale_.copy(), ts.mean_.copy(), ts.scale_.copy(), self.horizon)  # fmt: skip

    def data_sha256(self) -> str:
        """The sha256 of the file read (computed once)."""
        if getattr(self, "_data_sha256", None) is None:
            self._data_sha256 = sha256_of(self.path)
        return self._data_sha256

    def cadence_s(self) -> float:
        """The data's cadence: the median over its segments of each one's median time step (the model's contract
        records it, and ``forecast`` / ``plan`` refuse input rows at another cadence)."""
        return float(np.nanmedian(cadence_of(self.timestamps, self.bounds)))

    def feature_ranges(self) -> np.ndarray:
        """[F, 2]: each feature's smallest and largest value over the training rows (the contract records them, and
        ``forecast`` / ``plan`` refuse inputs far beyond them: a unit mix-up that would become a confident forecast)."""
        rows = [self.raw_features[a:b] for a, b in self.train_ranges]
        return np.stack([np.min([r.min(axis=0) for r in rows], axis=0), np.max([r.max(axis=0) for r in rows], axis=0)],
                        axis=1).astype(np.float64)  # fmt: skip

    def state_dict(self) -> dict:
        """Saved in every checkpoint: the data file's sha256. ``report`` / ``export`` (``runs.load_run``) and a
        resumed fit refuse a file whose bytes changed: its splits would not be the rows the run held out (a
        truncated file put training rows into the test split)."""
        return {"data_sha256": self.data_sha256()} if self.path.exists() else {}

    def load_state_dict(self, state: dict) -> None:
        """On resume: the data must be the file the checkpoint was trained on. (``test`` / ``validate`` with a
        checkpoint restore this too, and may evaluate a model on other data.)"""
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.state.fn == "fit":
            check_same_data(self, state, "the checkpoint")

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def n_targets(self) -> int:
        return len(self.targets)

    @property
    def path(self) -> Path:
        """The file this module reads."""
        if self.data_path is not None:
            return Path(self.data_path)
        s = self.synthetic
        links = f"_l{s.links}" if s.links is not None else ""  # 0 is no default: it named the default's file
        return Path(self.data_dir) / f"dwcp_{s.profile}_n{s.samples}{links}_seed{s.seed}_noise{s.noise:g}.csv"

    @property
    def oracle_steps(self) -> int:
        """Steps of the oracle sidecar written with the built-in dataset: 12 (or the horizon, if longer), so that
        one file serves the report of every horizon up to 12. The Monte Carlo of steps >= 2 takes about 4 s per
        15,000 rows x 12 steps: where that would pass about a minute (``ORACLE_MC_CAP``), only the run's horizon,
        and where even that would, step 1 only (the report then says that the per-step oracle is not available;
        ``python -m dwcp_lstm generate --oracle-steps`` writes it anyway)."""
        rows = self.synthetic.samples
        for steps in (max(ORACLE_STEPS, self.horizon), self.horizon):
            if rows * (steps - 1) <= ORACLE_MC_CAP:
                return steps
        return 1

    def prepare_data(self) -> None:
        """Generate the built-in dataset and its oracle sidecar when it is missing; never a user's path.

        When the data file exists but its sidecar lacks the oracle columns this run's horizon needs (a file written
        before the h-step oracle existed, or for a shorter horizon), only the sidecar is written again: the same
        arguments give the same data bytes whatever the oracle's steps, so the file in place stays as it is."""
        if self.data_path is not None:
            return
        self._check_builtin_fits()
        s = self.synthetic
        sidecar = synthetic.oracle_path(self.path)
        needs = synthetic.oracle_columns(synthetic.TARGETS, min(self.horizon, self.oracle_steps))
        if self.path.exists() and _has_columns(sidecar, needs):
            return
        folder = Path(self.data_dir)
        try:  # before the generator runs: a folder that cannot be made was an OSError (exit 1) naming no flag
            folder.mkdir(parents=True, exist_ok=True)
            probe_writable(folder)
        except OSError as exc:
            raise ConfigError(f"--data.data_dir {folder}: cannot create or write the folder of the built-in dataset "
                              f"({exc.strerror or exc})") from None  # fmt: skip
        try:
            df, oracle = synthetic.generate_with_oracle(
                s.samples, s.seed, s.profile, s.links, s.noise, oracle_steps=self.oracle_steps
            )
        except ValueError as exc:  # the generator's own argument checks
            raise ConfigError(f"--data.synthetic: {exc}") from None
        if self.path.exists():
            synthetic.write_oracle(oracle, self.path)
            rank_zero_info(f"Wrote the {self.oracle_steps}-step oracle of {self.path} -> {sidecar}")
            return
        synthetic.write_frame(df, self.path)
        synthetic.write_oracle(oracle, self.path)  # after the data: it records the data file's sha256
        rank_zero_info(f"Generated {len(df)} rows ({s.profile} profile, seed {s.seed}) -> {self.path}")

    def _check_builtin_fits(self) -> None:
        """Refuse, before generating anything, a window and horizon that a split of the built-in dataset's longest
        link cannot hold: ``fit --data.horizon 200`` wrote a 200-step oracle sidecar (a Monte Carlo) and only then
        found no windows. The exact check (:func:`~dwcp_lstm.preflight.check_splits`) follows after setup; the
        generator's own argument checks come first."""
        s, w, h = self.synthetic, self.window_size, self.horizon
        if s.links is not None and (isinstance(s.links, bool) or s.links < 1):  # found by fuzzing: links 0 read the
            # default's cached file (generate --links 0 is refused), a run on other data than its config records
            raise ConfigError(f"--data.synthetic.links must be an integer >= 1 (null: one link per "
                              f"{synthetic.ROWS_PER_LINK} rows), got {s.links}")  # fmt: skip
        links = 1 if s.profile == "seed" else synthetic.link_count(s.samples, s.links)
        if not 2 <= s.samples <= synthetic.MAX_SAMPLES or not 1 <= links <= s.samples // 2:
            return
        n = -(-s.samples // links)  # the longest link's rows
        rows = [int(n * self.split[0]), int(n * self.split[1])]
        rows.append(n - sum(rows))
        for what, have, need in zip(("training", "validation", "test"), rows, (w + h, h, h), strict=True):
            if have < need:
                raise ConfigError(
                    f"no {what} windows: the built-in dataset's longest link has {n} rows, split "
                    f"{' / '.join(map(str, rows))}, and a {what} window needs "
                    + (f"window_size {w} + horizon {h} rows" if what == "training" else f"horizon {h} rows")
                )

    def setup(self, stage: str | None = None) -> None:
        """Read, window, scale and audit the data (once; later calls reuse it). ``fit`` (or None) also refuses a
        target that is constant on the training split: see :meth:`_check_targets_vary`."""
        if self.datasets:  # cached: fit, then test, reuse the same arrays
            return
        if self.data_path is None and not self.path.exists():
            self.prepare_data()  # setup may run without prepare_data (e.g. a notebook calling it directly)
        self._load()
        self._split_windows()
        if stage in (None, "fit"):  # evaluating a trained model on other data scales with the model's own scalers
            self._check_targets_vary()
            self._check_cyclic_periods()
        self._fit_scalers()
        self._make_datasets()
        self.audit()

    # -- private steps, in the order setup runs them ------------------------------------------------------------
    def _load(self) -> None:
        path = self.path
        numeric = list(dict.fromkeys([*self.features, *self.targets]))
        keys = [*self.series_columns, self.time_column]
        in_file = [c for c in dict.fromkeys([*keys, *numeric]) if c not in self.clock]  # clock columns: derived
        df = read_table(path, in_file, text_columns=self.series_columns, derived=list(self.clock))
        check_numeric(df, [self.time_column], path, is_time=True)
        df = add_clock(df, self.clock, self.series_start, self.series_columns, self.time_column, path)
        check_numeric(df, numeric, path, allow_nan=self.fill_missing)
        df = order_series(df, self.series_columns, self.time_column, path, self.duplicates)
        if self.fill_missing:
            df = fill_missing(df, numeric, self.series_columns, path)
        self.bounds = segment_bounds(
            df, self.series_columns, self.time_column, self.window_size + 1, self.max_gap, path
        )
        keep = np.zeros(len(df), dtype=bool)
        for a, b in self.bounds:
            keep[a:b] = True
        if not keep.all():  # drop skipped short segments so that row indices stay contiguous
            offsets = np.cumsum(~keep)
            self.bounds = self.bounds - offsets[self.bounds[:, 0]][:, None]
            df = df.loc[keep].reset_index(drop=True)
        self.frame_keys = df[keys].copy()  # series ids and time per row, for reports and the oracle join
        self.timestamps = df[self.time_column].to_numpy()
        self.raw_features = np.empty((len(df), self.n_features), dtype=np.float32)
        for j, c in enumerate(self.features):
            self.raw_features[:, j] = df[c].to_numpy(np.float32)
        self.raw_targets = np.empty((len(df), self.n_targets), dtype=np.float64)
        for j, c in enumerate(self.targets):
            self.raw_targets[:, j] = df[c].to_numpy(np.float64)
        self.link_of_segment = series_codes(df, self.series_columns)[self.bounds[:, 0]]  # [S]
        lengths = self.bounds[:, 1] - self.bounds[:, 0]
        self.segment_of_row = np.repeat(np.arange(len(self.bounds), dtype=np.int32), lengths)  # int32: 40 MB at 10M

    def _split_windows(self) -> None:
        """Per link: the split cuts of its rows (all its segments together, in time order), then per segment the
        target-row ranges of each split and the training rows the scalers may see. Cutting each segment on its own
        put an earlier segment's test rows before a later segment's training rows of the same link (found by
        fuzzing: 17,728 of Starlink's 21,768 test windows)."""
        w = self.window_size
        starts: dict[str, list[np.ndarray]] = {s: [] for s in STAGES}
        train_ranges = []
        first = np.r_[True, self.link_of_segment[1:] != self.link_of_segment[:-1]]  # a link's segments are adjacent
        link_rows = np.split(self.bounds, np.flatnonzero(first)[1:])  # [segments of one link, 2] each
        for segments in link_rows:
            a0, n = segments[0, 0], int((segments[:, 1] - segments[:, 0]).sum())  # rows are contiguous per link
            n_train, n_val = int(n * self.split[0]), int(n * self.split[1])
            cuts = [a0, a0 + n_train, a0 + n_train + n_val, a0 + n]
            for a, b in segments:
                for i, stage in enumerate(STAGES):
                    lo = max(cuts[i], a + w)  # the first target of a segment needs w rows before it
                    hi = min(cuts[i + 1], b) - (self.horizon - 1)  # and its last target lies in the same split
                    starts[stage].append(np.arange(lo, max(lo, hi), dtype=np.int64) - w)
                if a < cuts[1]:  # a segment after the training cut has no training rows
                    train_ranges.append((a, min(b, cuts[1])))
        self.starts = {s: np.concatenate(v) for s, v in starts.items()}
        self.train_ranges = np.array(train_ranges, dtype=np.int64).reshape(-1, 2)  # [R, 2], each from a segment start
        if len(self.starts["train"]) == 0:
            raise DataError(
                f"{self.path}: no training windows (series too short for window {w}, horizon {self.horizon} and "
                f"split {list(self.split)})"
            )

    def _check_targets_vary(self) -> None:
        """Refuse a target that takes one value on every training row (a clean link's loss, a column of zeros): the
        model could learn nothing about it, and finding that after the training compute wastes it. A target constant
        on the *test* split only is fine: the report marks the figures that are undefined there (null). A constant
        *feature* is only warned about (:meth:`_fit_scalers`): the other inputs still carry the signal."""
        ranges = [(a, b) for a, b in self.train_ranges if b > a]
        if not ranges:
            return  # no training rows at all: _split_windows has refused that already
        lo = np.min([self.raw_targets[a:b].min(axis=0) for a, b in ranges], axis=0)  # [T], per-range: no copy
        hi = np.max([self.raw_targets[a:b].max(axis=0) for a, b in ranges], axis=0)
        # compared as the model sees them, in float32: 0.02 + 1e-12 noise is one value there, and the scaler divided
        # the noise by its own tiny spread (it trained, and the report said +30,855 % vs persistence)
        constant = np.flatnonzero(lo.astype(np.float32) == hi.astype(np.float32))
        if len(constant):  # the first one named: one line, as every data error
            j, rows = int(constant[0]), sum(b - a for a, b in ranges)
            within = "" if lo[j] == hi[j] else f" to float32 precision, spanning {hi[j] - lo[j]:.3g}"
            raise DataError(
                f"{self.path}: column {self.targets[j]!r}: target is constant on the training split (all {rows} "
                f"training rows are {lo[j]:g}{within}): there is nothing to learn; drop it from --data.targets"
            )
        self._check_time_units()
        self._warn_other_cadences()
        val = self.raw_targets[self.target_rows("val")] if len(self.starts["val"]) else None  # step 1's targets
        flat = val.min(axis=0).astype(np.float32) == val.max(axis=0).astype(np.float32) if val is not None else []
        for j in np.flatnonzero(flat):
            # the intervals and the mix with ridge are fitted there: bounds about zero wide (test coverage 0.7 %)
            log.warning("%s: column %r is constant on the validation split (all %d validation targets are %g): its "
                        "prediction intervals and its mix with ridge are calibrated there and will not hold",
                        self.path, self.targets[j], len(val), val[0, j])  # fmt: skip

    def _check_time_units(self) -> None:
        """The time column counts seconds (since 1970, or since each series' start): a column in milliseconds or
        microseconds trained, but the report replayed migrations with steps of 3e+08 s, lost its seasonal baseline
        without a word, and ``plan`` refused the shipped model. Refused here when the cadence is outside what
        ``plan`` takes or the latest time lies after the year 5000 as Unix seconds."""
        from dwcp_lstm.planner import MAX_STEP_S, MIN_STEP_S

        cadence, latest = self.cadence_s(), float(np.nanmax(self.timestamps))
        if not MIN_STEP_S <= cadence <= MAX_STEP_S or latest > LATEST_UNIX_S:
            raise DataError(
                f"{self.path}: column {self.time_column!r} has a row every {cadence:g} and reaches {latest:g}: it is "
                f"read as seconds, which needs a cadence from {MIN_STEP_S:g} to {MAX_STEP_S:g} and times before "
                f"{LATEST_UNIX_S:g} (the year 5000); milliseconds or microseconds? convert the column to seconds"
            )

    def _warn_other_cadences(self) -> None:
        """Name the segments whose cadence is not the data's (the contract's) within the tolerance ``forecast`` and
        ``plan`` apply: a link every 5 s among links every 300 s trained silently, and ``forecast`` then refused the
        model's own training file for it."""
        cadence = self.cadence_s()
        steps = cadence_of(self.timestamps, self.bounds) / cadence
        with np.errstate(invalid="ignore"):
            other = np.flatnonzero((steps < 1 / CADENCE_TOLERANCE) | (steps > CADENCE_TOLERANCE))
        if len(other):
            i = int(other[0])
            first = printable(self.series_names(self.bounds[i : i + 1, 0])[0])  # ids escaped, as in every message
            log.warning("%s: %d of %d series segments (the first: %s, a row every %g s) are not at the data's "
                        "cadence of a row every %g s: the model reads rows, not seconds, and forecast / plan refuse "
                        "such input",
                        self.path, len(other), len(self.bounds), first,
                        steps[i] * cadence, cadence)  # fmt: skip

    def _check_cyclic_periods(self) -> None:
        """A cyclic column's period is in the column's own unit: shorter than two of its steps between rows, its
        phase is noise (``{time_of_day: 1e-30}`` trained as if it were fine; found by fuzzing), so it is refused; a
        period far longer than the column's span on the training rows (86400 for an hours column) is warned about."""
        for j, period in self.cyclic:  # (feature index, period)
            name = self.features[j]
            steps, lo, hi = [], np.inf, -np.inf
            for a, b in self.train_ranges:
                col = self.raw_features[a:b, j].astype(np.float64)
                if len(col):
                    steps.append(np.abs(np.diff(col)))
                    lo, hi = min(lo, col.min()), max(hi, col.max())
            moves = np.concatenate(steps) if steps else np.empty(0)
            moves = moves[moves > 0]
            if len(moves) and period < 2 * np.median(moves):
                raise ConfigError(f"--data.cyclic: the period {period:g} of {name!r} is shorter than two of its "
                                  f"steps between rows (median {np.median(moves):g}): its phase would be noise; give "
                                  "the period in the column's own unit")  # fmt: skip
            if np.isfinite(hi) and hi - lo < period / 10:
                log.warning("%s: column %r spans %g to %g on the training rows, under a tenth of its cyclic period "
                            "%g (another unit?)", self.path, name, lo, hi, period)  # fmt: skip

    def _fit_scalers(self) -> None:
        """StandardScalers on the training rows only; kept on the module for the export and the report.

        In ``delta`` mode the target scaler sees the one-step changes at the training rows (a segment's first row
        has no change and is left out), so the loss weighs each target by how much it moves, not by its level.
        """
        self.target_values = self.raw_targets
        self.target_fit_ranges = self.train_ranges
        if self.target_mode == "delta":
            self.target_values = np.empty_like(self.raw_targets)
            np.subtract(self.raw_targets[1:], self.raw_targets[:-1], out=self.target_values[1:])  # no temporaries
            self.target_values[self.bounds[:, 0]] = 0.0  # no previous row in the segment; never a target
            self.target_fit_ranges = self.train_ranges + np.array([1, 0])
        if self.horizon > 1:
            self.target_values = self._step_targets()
            self.target_fit_ranges = self.target_fit_ranges - np.array([0, self.horizon - 1])
        # partial_fit over each segment's contiguous slice: views, never a copy of all training rows
        self.feature_scaler = _fit_on_ranges(self.raw_features, self.train_ranges)
        self.target_scaler = _fit_on_ranges(self.target_values, self.target_fit_ranges)
        for scaler, names in ((self.feature_scaler, self.features), (self.target_scaler, self.step_names)):
            for name in np.asarray(names)[scaler.var_ == 0]:  # sklearn leaves them unscaled (scale 1): harmless
                log.warning("%s: column %r is constant on the training rows; the model cannot learn from it",
                            self.path, str(name))  # fmt: skip

    def _step_targets(self) -> np.ndarray:
        """[rows, H * T]: for the first target row t of a window, the targets of rows t .. t + H - 1, each as the
        change from the window's last row t - 1 (delta) or as the value (level), step-major (h0 t0, h0 t1, ...).
        Rows whose steps leave their segment are never a window's first target row; they hold 0."""
        v, n, h_max = self.raw_targets, len(self.raw_targets), self.horizon
        out = np.zeros((n, h_max * self.n_targets), dtype=np.float64)
        seg = self.segment_of_row
        for h in range(h_max):
            block = out[:, h * self.n_targets : (h + 1) * self.n_targets]
            if self.target_mode == "delta":
                rows = np.arange(1, n - h)
                ok = seg[rows + h] == seg[rows - 1]  # the window's last row and the target in one segment
                block[rows[ok]] = v[rows[ok] + h] - v[rows[ok] - 1]
            else:
                rows = np.arange(0, n - h)
                ok = seg[rows + h] == seg[rows]
                block[rows[ok]] = v[rows[ok] + h]
        return out

    @property
    def step_names(self) -> list[str]:
        """Names of the target columns in the step-major order the network predicts: ``rtt_ms`` for H = 1,
        ``rtt_ms_h1`` .. ``rtt_ms_hH`` otherwise."""
        if self.horizon == 1:
            return list(self.targets)
        return [f"{t}_h{h + 1}" for h in range(self.horizon) for t in self.targets]

    def _make_datasets(self) -> None:
        x, y = self._scaled_tensors()
        self.datasets = {s: WindowDataset(x, y, self.starts[s], self.window_size) for s in STAGES}

    def _scaled_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Features [rows, F] and targets [rows, T], standardised with the current scalers, float32."""
        x = torch.from_numpy(_standardize(self.raw_features, self.feature_scaler))
        y = torch.from_numpy(_standardize(self.target_values, self.target_scaler))
        return x, y

    def use_scalers(self, scalers: Scalers) -> None:
        """Scale with a trained model's scalers instead of this data's own (evaluating a checkpoint on other data).
        A no-op when they are the ones fitted here, as during and after fit."""
        if (list(scalers.features), list(scalers.targets), scalers.target_mode, scalers.horizon) != (
            self.features,
            self.targets,
            self.target_mode,
            self.horizon,
        ):
            raise ConfigError(f"{self.path}: the model's features/targets/target_mode/horizon differ from this data's")
        fs, ts = self.feature_scaler, self.target_scaler
        new = (scalers.feature_mean, scalers.feature_scale, scalers.target_mean, scalers.target_scale)
        own = (fs.mean_, fs.scale_, ts.mean_, ts.scale_)
        if all(np.allclose(a, b, rtol=1e-6, atol=0) for a, b in zip(new, own, strict=True)):
            return
        log.warning("%s: scaling with the checkpoint's training scalers, not this data's", self.path)
        fs.mean_, fs.scale_, ts.mean_, ts.scale_ = (np.asarray(v, dtype=np.float64) for v in new)
        # In place: the loaders already hold these dataset objects. (No audit: these scalers saw none of this data.)
        x, y = self._scaled_tensors()
        for ds in self.datasets.values():
            ds.x, ds.y = x, y

    def audit(self) -> None:
        """Fail loudly if any window or scaler could leak: run at the end of every setup."""
        for name, scaler, raw, ranges in (
            ("feature", self.feature_scaler, self.raw_features, self.train_ranges),
            ("target", self.target_scaler, self.target_values, self.target_fit_ranges),
        ):
            count = int(np.maximum(ranges[:, 1] - ranges[:, 0], 0).sum())
            total = sum((raw[a:b].sum(axis=0, dtype=np.float64) for a, b in ranges if b > a), np.zeros(raw.shape[1]))
            if scaler.n_samples_seen_ != count or not np.allclose(scaler.mean_, total / count, rtol=1e-5, atol=1e-6):
                raise LeakageError(f"{name} scaler was not fitted on exactly the {count} training rows")
        seg = self.segment_of_row
        reach = self.window_size + self.horizon - 1  # a window's last target row, from its start
        for stage, s in self.starts.items():
            if np.any(seg[s] != seg[s + reach]):
                raise LeakageError(f"a {stage} window spans two series")
        # Split order per link (across its segments): the last target of every train window < the first target of
        # any val window, and the same for val before test (in time): no target of an earlier split lies in a later one.
        link = self.link_of_segment[seg]
        t = self.timestamps
        targets = {stage: self.starts[stage] + self.window_size for stage in STAGES}
        for earlier, later in (("train", "val"), ("val", "test"), ("train", "test")):
            a, b = targets[earlier], targets[later]
            if len(a) == 0 or len(b) == 0:
                continue
            last = pd.Series(t[a + self.horizon - 1]).groupby(link[a]).max()
            first = pd.Series(t[b]).groupby(link[b]).min()
            both = last.index.intersection(first.index)
            if np.any(last[both].to_numpy() >= first[both].to_numpy()):
                raise LeakageError(f"a {later} target is not later than every {earlier} target of its series")

    def encoder(self) -> CyclicEncoding:
        """The network's input encoding of this data's cyclic columns, with this data's scalers (for the baselines:
        they see exactly what the network sees)."""
        enc = CyclicEncoding(self.n_features, self.cyclic)
        enc.use_scaler(self.feature_scaler.mean_, self.feature_scaler.scale_)
        return enc

    def windows(self, values: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """Rows of ``values`` under each window, [N, W, ...] (materialised: callers keep N small or subsample)."""
        return values[starts[:, None] + np.arange(self.window_size)]

    @property
    def train_rows(self) -> np.ndarray:
        """Indices of the training rows (materialised on demand; the module itself works on ranges)."""
        return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in self.train_ranges])

    # -- loaders -------------------------------------------------------------------------------------------------
    def loader(self, stage: str) -> DataLoader:
        """The DataLoader of ``train``, ``val`` or ``test`` (only train is shuffled)."""
        ds = self.datasets[stage]
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(ds), self.seed) if stage == "train" else None,
            # a last training batch of one window would stop training in batch norm; drop it (one window an epoch)
            drop_last=stage == "train" and len(ds) % self.batch_size == 1,
            collate_fn=collate_batch,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self.loader("train")

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self.loader("test")

    # -- helpers for evaluation ----------------------------------------------------------------------------------
    def target_rows(self, stage: str) -> np.ndarray:
        """Row index of each window's target, in loader order (unshuffled)."""
        return self.starts[stage] + self.window_size

    def split_stop(self, stage: str) -> np.ndarray:
        """[N] per window of a split (loader order): one past the split's last target row in the window's segment.
        What reads the rows after a window (the tail calibration, the planner's replay) stops there and never
        enters the next split; the test split runs to its segment's end."""
        first = self.target_rows(stage)
        seg = self.segment_of_row[first]
        last = np.full(len(self.bounds), -1, np.int64)
        np.maximum.at(last, seg, first + self.horizon)
        return last[seg]

    def series_names(self, rows: np.ndarray) -> np.ndarray:
        """``node_id->peer_id`` style name of the series each row belongs to (``"all"``: no series columns, the file
        is one series; the report's per-link sections raised an IndexError after training)."""
        if not self.series_columns:
            return np.full(len(rows), "all", dtype=object)
        keys = self.frame_keys.iloc[rows][self.series_columns].astype(str)
        if len(self.series_columns) == 1:
            return keys.iloc[:, 0].to_numpy()
        return keys.agg(LINK_SEPARATOR.join, axis=1).to_numpy()


def _has_columns(path: Path, columns: list[str]) -> bool:
    """Whether a CSV file exists and has every one of ``columns`` (reads its header only)."""
    try:
        return set(columns) <= set(pd.read_csv(path, nrows=0).columns)
    except (OSError, ValueError):  # missing, empty or unreadable: written again
        return False


def _fit_on_ranges(values: np.ndarray, ranges: np.ndarray) -> StandardScaler:
    scaler = StandardScaler()
    for a, b in ranges:
        if b > a:
            scaler.partial_fit(values[a:b])
    return scaler


def _standardize(values: np.ndarray, scaler: StandardScaler) -> np.ndarray:
    """(values - mean) / scale in float32, computed in place on one output array (no float64 temporary)."""
    out = np.subtract(values, scaler.mean_.astype(np.float32), dtype=np.float32)
    out /= scaler.scale_.astype(np.float32)
    return out


def _check_config(
    window: int,
    batch: int,
    split: Sequence[float],
    features: Sequence[str],
    targets: Sequence[str],
    workers: int,
    target_mode: str,
    seed: int,
) -> None:
    if target_mode not in ("delta", "level"):
        raise ConfigError(f"--data.target_mode must be delta or level, got {target_mode!r}")
    if target_mode == "delta" and not set(targets) <= set(features):
        missing = [t for t in targets if t not in features]
        raise ConfigError(f"--data.target_mode delta needs every target among the features; missing {missing}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ConfigError(f"--data.window_size must be >= 2 (a change needs two rows), got {window}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 2:
        raise ConfigError(f"--data.batch_size must be >= 2 (batch norm needs two windows per batch), got {batch}")
    # written as "not >=" so that NaN fails too
    if len(split) != 3 or any(not f >= 0 for f in split) or not abs(sum(split) - 1.0) <= 1e-6:
        raise ConfigError(f"--data.split must be three non-negative fractions that sum to 1, got {list(split)}")
    if not features or not targets:
        raise ConfigError("--data.features and --data.targets must not be empty")
    for name, cols in (("features", features), ("targets", targets)):
        if len(set(cols)) != len(cols):
            raise ConfigError(f"--data.{name} lists a column twice: {list(cols)}")
    if not 0 <= workers <= MAX_THREADS:  # 100000 forked worker after worker until the machine ran out of memory
        raise ConfigError(f"--data.num_workers must be from 0 to {MAX_THREADS} (worker processes), got {workers}")
    check_seed(seed, "--data.seed")


def check_cyclic(
    cyclic: dict[str, float] | None, features: Sequence[str], targets: Sequence[str]
) -> tuple[tuple[int, float], ...]:
    """``{column: period}`` -> ``((feature index, period), ...)`` in feature order; refuses what cannot work."""
    if not cyclic:
        return ()
    if not isinstance(cyclic, dict):
        raise ConfigError(f"--data.cyclic must map feature names to periods, got {cyclic!r}")
    out = []
    for name, period in cyclic.items():
        if name not in features:
            raise ConfigError(f"--data.cyclic: {name!r} is not among the features {list(features)}")
        if name in targets:
            raise ConfigError(f"--data.cyclic: {name!r} is a target; only inputs can be read as a phase")
        if isinstance(period, bool) or not isinstance(period, int | float) or not (0 < period < math.inf):
            raise ConfigError(f"--data.cyclic: the period of {name!r} must be a number > 0, got {period!r}")
        out.append((list(features).index(name), float(period)))
    return tuple(sorted(out))


def _check_series_config(
    series: Sequence[str], time: str, duplicates: str, max_gap: float, columns: Sequence[str] = ()
) -> None:
    if len(set(series)) != len(series):
        raise ConfigError(f"--data.series_columns lists a column twice: {list(series)}")
    if not time or time in series:
        raise ConfigError(f"--data.time_column must be a column other than the series columns, got {time!r}")
    # the time column as an input trained on raw epoch seconds (its serving range check could never fire), and a
    # series id is a name, not a measurement: the time of day comes in through --data.clock
    for name in columns:
        if name == time:
            raise ConfigError(f"--data.features / --data.targets: {name!r} is the time column (--data.time_column), "
                              "not a measurement; to give the model the time of day use --data.clock, e.g. "
                              "{beat_s: 86400}, and list that column among the features")  # fmt: skip
        if name in series:
            raise ConfigError(f"--data.features / --data.targets: {name!r} is a series id column "
                              "(--data.series_columns), not a measurement")  # fmt: skip
    if duplicates not in DUPLICATE_POLICIES:
        raise ConfigError(f"duplicates policy must be one of {', '.join(DUPLICATE_POLICIES)}, got {duplicates!r}")
    if not np.isfinite(max_gap):
        raise ConfigError(f"--data.max_gap must be a finite number (<= 0 turns gap splitting off), got {max_gap}")

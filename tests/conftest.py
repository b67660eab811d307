"""Shared fixtures: a small seeded dataset and one smoke fit reused by every test that needs a finished run."""

from __future__ import annotations

import os
from pathlib import Path

# One thread per process: the suite runs subprocesses beside the main one on 2 cores, and oversubscribed OpenMP
# threads make torch up to 50x slower. Set before torch is imported; subprocesses inherit it.
os.environ["OMP_NUM_THREADS"] = "1"

import lightning.pytorch  # noqa: E402,F401  (its log handlers bind to the session's stderr, not one test's capsys)
import pytest  # noqa: E402
import torch  # noqa: E402

from dwcp_lstm import synthetic  # noqa: E402
from dwcp_lstm.cli import cli_main  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "smoke.yaml"
REAL_DATA = ROOT.parent / "shared" / "data" / "real"

os.environ.setdefault("PYTHONHASHSEED", "0")


def scale_by_hand(hist, recorded: dict, j: int):
    """Target ``j``'s interval scale for raw windows ``hist`` [N, W, T], from a calibration as the metadata records
    it, written out here apart from ``dwcp_lstm.intervals``: exp(bias + coefficients x the log of every target's
    floored volatility, |mean| and |last value|) if fitted, the floored volatility if adaptive, else 1."""
    import numpy as np

    hist = np.asarray(hist, dtype=np.float64)
    vol = np.diff(hist, axis=1).std(axis=1)  # [N, T]
    if (recorded.get("fitted") or [False] * hist.shape[2])[j]:
        floor, coef = np.asarray(recorded["spread_floor"]), np.asarray(recorded["spread"])
        parts = (vol, np.abs(hist.mean(axis=1)), np.abs(hist[:, -1]))
        logs = np.concatenate([np.log(np.maximum(v, f)) for v, f in zip(parts, floor, strict=True)], axis=1)
        return np.exp(coef[0, j] + logs @ coef[1:, j])
    return np.maximum(vol[:, j], recorded["floor"][j]) if recorded["adaptive"][j] else np.ones(len(hist))


def terms_by_hand(pred, hist, recorded: dict, j: int, step: int = 0):
    """Target ``j``'s interval centre offset and scale at ``step`` for windows with that step's forecast of every
    target ``pred`` [N, T] and raw history ``hist`` [N, W, T], from a recorded calibration, apart from
    ``dwcp_lstm.intervals``: for a quantile target [1, pred] @ centre and max([1, pred] @ width, width_floor), else
    0 and :func:`scale_by_hand`. Bounds are ``pred + shift + scale x [lo, hi]``."""
    import numpy as np

    if (recorded.get("quantile") or [False] * hist.shape[2])[j]:
        x = np.concatenate([np.ones((len(pred), 1)), np.asarray(pred, dtype=np.float64)], axis=1)
        centre, width = (np.asarray(recorded[k])[step][:, j] for k in ("centre", "width"))
        return x @ centre, np.maximum(x @ width, recorded["width_floor"][step][j])
    return 0.0, scale_by_hand(hist, recorded, j)


def fit_args(tmp: Path, *extra: str) -> list[str]:
    """CPU-safe overrides of the smoke config that keep every artifact inside ``tmp``."""
    return [
        "fit",
        "--config",
        str(SMOKE),
        f"--trainer.default_root_dir={tmp}",
        f"--trainer.logger.init_args.save_dir={tmp}",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--data.data_dir={tmp / 'data'}",
        # a test fit trains a few batches: the network stays far behind ridge, a blend would be ridge alone and hide
        # the network from every parity check made on the run; the fits that test the blend turn it back on
        "--model.blend_ridge=false",
        *extra,
    ]


def run_dir_of(tmp: Path) -> Path:
    runs = sorted((tmp / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    assert runs, f"no run directory under {tmp}"
    return runs[-1]


@pytest.fixture(scope="session")
def small_csv(tmp_path_factory) -> Path:
    """2,000 rows of the dynamic profile over 4 links (500 rows each), with its oracle sidecar."""
    path = tmp_path_factory.mktemp("data") / "small.csv"
    df, oracle = synthetic.generate_with_oracle(samples=2000, seed=7, links=4)
    synthetic.write_frame(df, path)
    synthetic.write_oracle(oracle, path)
    return path


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """One smoke fit (2 short epochs) shared by the tests that inspect a finished run."""
    tmp = tmp_path_factory.mktemp("smoke")
    cli_main(fit_args(tmp))
    return run_dir_of(tmp)

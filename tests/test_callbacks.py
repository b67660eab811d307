"""Callbacks and export pieces: the export writes a pair the predictor accepts, parity is measured on real windows,
settings are checked when the callback is built, per-step reseeding repeats dropout draws."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dwcp_lstm.callbacks import EMA, OnnxExport, StepSeed, export_run, onnx_parity, raw_windows, unit_of
from dwcp_lstm.data import DwcpDataModule
from dwcp_lstm.errors import ConfigError, ModelFileError
from dwcp_lstm.module import DwcpForecaster
from dwcp_lstm.serve import Predictor


@pytest.fixture(scope="module")
def small_module(small_csv):
    dm = DwcpDataModule(data_path=str(small_csv), batch_size=32)
    dm.setup("fit")
    torch.manual_seed(0)
    module = DwcpForecaster(lstm_sizes=(16,), head_sizes=(8,), head_dropouts=())
    module.set_scalers(dm.scalers)
    return module.eval(), dm


def test_export_run_writes_a_pair_the_predictor_accepts(small_module, tmp_path):
    module, dm = small_module
    meta = export_run(module, dm, tmp_path, parity_windows=64)
    assert json.loads((tmp_path / "model_metadata.json").read_text()) == meta
    assert meta["parity"]["windows"] == 64 and meta["parity"]["max_rel_diff"] < 1e-4
    x = raw_windows(dm, "test", 16)  # [16, W, F]
    with torch.no_grad():
        expected = module.raw_forecaster()(torch.from_numpy(x)).numpy()
    got = Predictor.from_run(tmp_path).predict_windows(x)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("taken", ["model.onnx", "model_metadata.json"])
def test_export_run_refuses_a_folder_in_place_of_either_file_before_writing(small_module, tmp_path, taken):
    """Found by fuzzing: a folder named model_metadata.json failed the export only after model.onnx had been
    replaced (a new model beside the old metadata, exit 1); a folder named model.onnx named the staging file."""
    module, dm = small_module
    export_run(module, dm, tmp_path, parity_windows=8)
    (tmp_path / taken).unlink()
    (tmp_path / taken).mkdir()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(ModelFileError, match=rf"{taken}: is a directory, expected a file; nothing exported"):
        export_run(module, dm, tmp_path, parity_windows=8)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert not list(tmp_path.glob(".export-*"))


def test_onnx_parity_reports_the_largest_difference(small_module, tmp_path):
    module, dm = small_module
    export_run(module, dm, tmp_path, parity_windows=8)
    x = raw_windows(dm, "test", 32)
    parity = onnx_parity(tmp_path / "model.onnx", module, x)
    assert parity["windows"] == 32 and 0 <= parity["max_abs_diff"] < 1e-2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"opset": 16}, "--onnx.opset must be an integer from 17 to"),
        ({"opset": 99}, "--onnx.opset must be an integer from 17 to"),
        ({"filename": "sub/model.onnx"}, "--onnx.filename must be a plain file name"),
        ({"filename": "model.pt"}, "--onnx.filename must be a plain file name"),
        ({"parity_windows": 0}, "--onnx.parity_windows must be >= 1"),
    ],
)
def test_onnx_export_settings_are_checked_when_built(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        OnnxExport(**kwargs)


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5])
def test_ema_decay_must_be_inside_0_1(decay):
    with pytest.raises(ConfigError, match="EMA decay must be in"):
        EMA(decay)


def test_step_seed_repeats_the_draws_of_a_step():
    cb = StepSeed(seed=7)
    trainer = SimpleNamespace(global_rank=0, global_step=5)
    cb.on_train_batch_start(trainer, None, None, 0)
    a = torch.rand(3)
    torch.rand(10)  # whatever ran in between
    cb.on_train_batch_start(trainer, None, None, 0)
    assert torch.equal(a, torch.rand(3))
    trainer.global_step = 6
    cb.on_train_batch_start(trainer, None, None, 0)
    assert not torch.equal(a, torch.rand(3))


def test_units_by_name_and_suffix():
    assert unit_of("rtt_ms") == "ms" and unit_of("dl_mbps") == "Mbit/s" and unit_of("rsrp_dbm") == "dBm"
    assert unit_of("mystery") == "as in the training data"
    assert unit_of("loss_rate") == "fraction of pings dropped (0-1)"  # Starlink: no suffix says it


def test_the_contracts_data_parts_are_built_before_training(small_module, monkeypatch):
    """An empty training range made the contract's feature ranges raise at the export, after a 10-minute fit: the
    data-derived parts are now computed when the fit starts, before the first training step."""
    _, dm = small_module
    trainer = SimpleNamespace(datamodule=dm)
    OnnxExport().on_fit_start(trainer, None)  # a sound data module: nothing to say

    def broken():
        raise ValueError("zero-size array to reduction operation minimum which has no identity")

    monkeypatch.setattr(dm, "feature_ranges", broken)
    with pytest.raises(ValueError, match="zero-size"):
        OnnxExport().on_fit_start(trainer, None)

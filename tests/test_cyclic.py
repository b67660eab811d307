"""Cyclic calendar inputs (``--data.cyclic``): the network reads an hour or a weekday as the sine and cosine of its
phase, computed inside the graph from the raw column; and the skip's cross products (``--model.skip_cross``). Checked
against numpy; the baselines and the skip's ridge start see the same encoded windows. A fit with both through export
parity, the predictor and the planner is tests/test_horizon.py's ``horizon_run``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dwcp_lstm import evaluate as E
from dwcp_lstm.baselines import RidgeBaseline, _even_subset
from dwcp_lstm.data import FEATURES, DwcpDataModule
from dwcp_lstm.errors import ConfigError
from dwcp_lstm.model import CyclicEncoding, StackedLSTM, count_parameters
from dwcp_lstm.module import DwcpForecaster

CYCLIC = {"time_of_day": 24, "day_of_week": 7}
SMALL = dict(lstm_sizes=(8,), head_sizes=(4,), head_dropouts=())


@pytest.fixture(scope="module")
def dm(small_csv) -> DwcpDataModule:
    dm = DwcpDataModule(data_path=str(small_csv), horizon=3, batch_size=16, cyclic=CYCLIC)
    dm.setup("fit")
    return dm


def test_the_encoding_is_the_phase_of_the_raw_value():
    """Scaled in, the raw value's sine and cosine out: 23:00 and 00:00 end up next to each other, 12:00 opposite."""
    enc = CyclicEncoding(3, ((1, 24.0),))
    enc.mean.fill_(11.5)
    enc.scale.fill_(6.9)
    hours = np.array([23.0, 0.0, 12.0])
    x = torch.zeros(1, 3, 3)
    x[0, :, 1] = torch.as_tensor((hours - 11.5) / 6.9)
    x[0, :, 0], x[0, :, 2] = 5.0, -2.0
    out = enc(x)[0].numpy()  # [3, 4]: column 0, column 2, sin, cos
    np.testing.assert_allclose(out[:, :2], [[5, -2]] * 3)
    np.testing.assert_allclose(out[:, 2], np.sin(2 * np.pi * hours / 24), atol=1e-6)
    np.testing.assert_allclose(out[:, 3], np.cos(2 * np.pi * hours / 24), atol=1e-6)
    assert np.linalg.norm(out[0, 2:] - out[1, 2:]) < 0.3 < 1.9 < np.linalg.norm(out[0, 2:] - out[2, 2:])


def test_the_network_widens_by_one_input_per_cyclic_column():
    net = StackedLSTM(cyclic=((4, 24.0), (5, 7.0)), linear_skip=True, window=20)
    assert net.lstms[0].input_size == 11 and net.skip.in_features == 20 * 11
    assert count_parameters(StackedLSTM(cyclic=((4, 24.0),))) - count_parameters(StackedLSTM()) == 4 * 256
    assert not [k for k in StackedLSTM().state_dict() if k.startswith("encode")]  # old checkpoints keep their keys
    assert {"encode.mean", "encode.scale", "encode.omega"} <= set(net.state_dict())


def test_the_model_takes_the_columns_scalers_from_the_data(dm):
    module = DwcpForecaster(horizon=3, cyclic=CYCLIC, **SMALL)
    module.set_scalers(dm.scalers)
    j = [FEATURES.index("time_of_day"), FEATURES.index("day_of_week")]
    enc = module.net.encode
    assert enc.index == j
    np.testing.assert_allclose(enc.mean.numpy(), dm.feature_scaler.mean_[j], rtol=1e-6)
    np.testing.assert_allclose(enc.scale.numpy(), dm.feature_scaler.scale_[j], rtol=1e-6)
    torch.testing.assert_close(enc.omega, torch.tensor([2 * np.pi / 24, 2 * np.pi / 7]))


def test_the_cross_inputs_are_levels_times_phase_squares_and_the_last_changes():
    net = StackedLSTM(cyclic=((4, 24.0), (5, 7.0)), linear_skip=True, window=20, cross=(0, 1, 2, 3))
    assert net.skip.in_features == 20 * 11 + 8 * 4 + 8 + 7
    x = torch.randn(3, 20, 11)  # encoded: 7 kept columns (targets first), 2 sines, 2 cosines
    got = net.skip_inputs(x).numpy()
    xn = x.numpy()
    levels = np.hstack([xn[:, -1, :4], xn[:, :, :4].mean(1)])  # [3, 8]
    phase = xn[:, -1, 7:]  # [3, 4]
    moved = np.abs(xn[:, -1, :7] - xn[:, -2, :7])  # the size of each non-calendar input's last change
    products = (levels[:, :, None] * phase[:, None, :]).reshape(3, -1)
    expected = np.hstack([xn.reshape(3, -1), products, levels**2, moved])
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="need linear_skip"):
        StackedLSTM(cross=(0,))


@pytest.mark.parametrize("cross", [False, True])
def test_baselines_and_the_skip_see_the_encoded_windows(dm, cross):
    """The report's ridge fits on what the network reads, and the skip starts exactly at that ridge (with
    ``skip_cross``, at ridge on the window plus the products)."""
    starts = dm.starts["train"][_even_subset(len(dm.starts["train"]), 100_000)]
    x = E.scaled_windows(dm, starts)
    assert x.shape[1:] == (dm.window_size, dm.n_features + 2)
    hours = dm.windows(dm.raw_features, starts)[..., FEATURES.index("time_of_day")]
    np.testing.assert_allclose(x[..., -4], np.sin(2 * np.pi * hours / 24), atol=1e-5)  # the first sine
    module = DwcpForecaster(horizon=3, cyclic=CYCLIC, linear_skip=True, skip_cross=cross, **SMALL)
    module.set_scalers(dm.scalers)
    module.init_skip_from_ridge(dm)
    y = dm.datasets["train"].y.numpy()[starts + dm.window_size].astype(np.float64)
    inputs = module.net.skip_inputs(torch.from_numpy(x)).double().numpy()
    assert inputs.shape[1] == x[0].size + (47 if cross else 0)
    ridge = RidgeBaseline().fit(inputs, y)
    with torch.no_grad():
        got = module.eval()(torch.from_numpy(dm.windows(dm.datasets["train"].x.numpy(), starts))).numpy()
    np.testing.assert_allclose(got, ridge.predict(inputs), atol=2e-4 * np.abs(y).max())


@pytest.mark.parametrize(
    ("cyclic", "message"),
    [
        ({"hour": 24}, "'hour' is not among the features"),
        ({"rtt_ms": 10}, "'rtt_ms' is a target"),
        ({"time_of_day": 0}, "the period of 'time_of_day' must be a number > 0"),
        ({"time_of_day": float("nan")}, "must be a number > 0"),
        ({"time_of_day": float("inf")}, "must be a number > 0"),
        ({"time_of_day": True}, "must be a number > 0"),
    ],
)
def test_bad_cyclic_settings_are_refused(small_csv, cyclic, message):
    with pytest.raises(ConfigError, match=message):
        DwcpDataModule(data_path=str(small_csv), cyclic=cyclic)
    with pytest.raises(ConfigError, match=message):
        DwcpForecaster(cyclic=cyclic)


def test_a_period_the_data_cannot_resolve_is_refused_before_training(small_csv, caplog):
    """``{time_of_day: 1e-30}`` trained as if it were fine, its phase float32 noise (found by fuzzing): a period
    under two of the column's steps is refused when the data is read; one far beyond its span is warned about."""
    dm = DwcpDataModule(data_path=str(small_csv), cyclic={"time_of_day": 1e-30})
    with pytest.raises(ConfigError, match=r"the period 1e-30 of 'time_of_day' is shorter than two of its steps"):
        dm.setup("fit")
    dm = DwcpDataModule(data_path=str(small_csv), cyclic={"time_of_day": 86400})  # seconds for an hours column
    dm.setup("fit")
    assert "column 'time_of_day' spans 0 to" in caplog.text and "cyclic period 86400 (another unit?)" in caplog.text
    caplog.clear()
    DwcpDataModule(data_path=str(small_csv), cyclic=CYCLIC).setup("fit")
    assert "another unit" not in caplog.text


def test_cross_products_need_the_skip_and_the_targets_among_the_features():
    with pytest.raises(ConfigError, match="--model.skip_cross needs --model.linear_skip true"):
        DwcpForecaster(skip_cross=True)
    with pytest.raises(ConfigError, match="--model.skip_cross needs every target among the features"):
        DwcpForecaster(linear_skip=True, skip_cross=True, target_mode="level", feature_names=["time_of_day"])


def test_head_init_scales_the_output_layers_start():
    """0: the network starts exactly at the skip; 1: the head's output layer has PyTorch's default start, so the LSTM
    gets a gradient from the first batch."""
    torch.manual_seed(3)
    zero = DwcpForecaster(linear_skip=True, **SMALL).net
    torch.manual_seed(3)
    one = DwcpForecaster(linear_skip=True, head_init=1.0, **SMALL).net
    torch.manual_seed(3)
    half = DwcpForecaster(linear_skip=True, head_init=0.5, **SMALL).net
    assert not zero.head[-1].weight.any() and one.head[-1].weight.abs().sum() > 0
    torch.testing.assert_close(half.head[-1].weight, 0.5 * one.head[-1].weight)
    x = torch.randn(4, 20, 9)
    torch.testing.assert_close(zero.eval()(x), zero.skip(x.flatten(1)))
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="--model.head_init must be a number >= 0"):
            DwcpForecaster(linear_skip=True, head_init=bad)
    with pytest.raises(ConfigError, match="it needs --model.linear_skip"):
        DwcpForecaster(head_init=1.0)

import numpy as np
import pytest
import torch

from dwcp_lstm.model import StackedLSTM, count_parameters


def test_default_architecture_has_the_specified_parameter_count():
    assert count_parameters(StackedLSTM()) == 540_516


@pytest.mark.parametrize("batch", [1, 64])
def test_forward_shapes(batch):
    model = StackedLSTM().eval()
    assert model(torch.randn(batch, 20, 9)).shape == (batch, 4)


def test_each_lstm_gets_the_full_sequence_of_the_previous_one():
    model = StackedLSTM().eval()
    seen = []
    for lstm in model.lstms:
        lstm.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape))
    model(torch.randn(3, 20, 9))
    assert seen == [(3, 20, 9), (3, 20, 256), (3, 20, 128)]


def test_sizes_are_constructor_arguments():
    model = StackedLSTM(n_features=5, n_targets=1, lstm_sizes=(16, 8), head_sizes=(8, 4), head_dropouts=(0.1,))
    assert model(torch.randn(2, 7, 5)).shape == (2, 1)
    with pytest.raises(ValueError, match="head_dropouts"):
        StackedLSTM(head_dropouts=(0.1,))


def test_windows_are_independent():
    """No hidden state is carried between calls: the same window gives the same forecast after another one."""
    model = StackedLSTM().eval()
    x = torch.randn(1, 20, 9)
    first = model(x)
    model(torch.randn(1, 20, 9))
    assert torch.equal(model(x), first)


@pytest.mark.parametrize("loss", ["mse", "huber", "l1"])
def test_loss_choice_matches_its_definition(loss):
    from dwcp_lstm.module import DwcpForecaster

    m = DwcpForecaster(loss=loss, huber_delta=0.5)
    rng = np.random.default_rng(3)
    p, y = rng.normal(size=(64, 4)), rng.standard_t(2, size=(64, 4))  # heavy-tailed errors: the regimes differ
    e = np.abs(p - y)
    ref = {"mse": e**2, "l1": e, "huber": np.where(e <= 0.5, 0.5 * e**2, 0.5 * (e - 0.25))}[loss]
    got = m._elementwise_loss(torch.tensor(p), torch.tensor(y)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-12)


@pytest.mark.parametrize(
    ("given", "expected"),
    [([3e38] * 4, [1.0] * 4), ([1.5e-45, 0, 0, 0], [4.0, 0, 0, 0]), ([1, 3, 0, 0], [1.0, 3.0, 0, 0])],
)
def test_loss_weights_are_normalised_without_overflow(given, expected):
    """Loss weights are relative: normalised to mean 1 in float64. In float32 the mean of four 3e38s overflowed to
    inf and every weight became 0 (nothing trained, exit 0), and that of 1.5e-45 underflowed to 0 (a NaN loss)."""
    from dwcp_lstm.module import DwcpForecaster

    m = DwcpForecaster(lstm_sizes=(4,), head_sizes=(), head_dropouts=(), loss_weights=given)
    torch.testing.assert_close(m.loss_weights, torch.tensor(expected, dtype=torch.float32))

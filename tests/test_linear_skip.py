"""The linear skip (``--model.linear_skip``): a linear map of the whole window added to the LSTM's output, started at
the ridge regression of the training windows. Checked against ridge solved by hand in numpy; a killed and resumed run
with the skip (its restored weights, not a fresh ridge, run on) is in tests/test_resume.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dwcp_lstm.data import DwcpDataModule
from dwcp_lstm.model import StackedLSTM, count_parameters
from dwcp_lstm.module import DwcpForecaster


def test_the_skip_adds_window_times_features_inputs_and_starts_as_the_linear_map_alone():
    plain, skip = StackedLSTM(), StackedLSTM(linear_skip=True, window=20)
    assert count_parameters(skip) - count_parameters(plain) == 20 * 9 * 4 + 4
    skip.eval()
    x = torch.randn(5, 20, 9)
    torch.testing.assert_close(skip(x), skip.skip(x.flatten(1)))  # the head's last layer starts at zero
    assert StackedLSTM().skip is None and count_parameters(StackedLSTM()) == 540_516  # the specified model unchanged


@pytest.mark.parametrize("horizon", [1, 3])
def test_the_skip_starts_at_ridge_solved_by_hand(small_csv, horizon):
    """Forecasts of the fresh module on training windows = ridge's normal equations in numpy (centred data, the
    alpha leave-one-out CV chose), i.e. the report's ridge baseline in the network's target space."""
    dm = DwcpDataModule(data_path=str(small_csv), horizon=horizon, batch_size=16)
    dm.setup("fit")
    torch.manual_seed(0)
    module = DwcpForecaster(horizon=horizon, lstm_sizes=(8,), head_sizes=(4,), head_dropouts=(), linear_skip=True)
    module.set_scalers(dm.scalers)
    alpha = module.init_skip_from_ridge(dm)
    ds = dm.datasets["train"]
    idx = ds.starts.numpy()[:, None] + np.arange(ds.window)
    x = ds.x.double().numpy()[idx]  # [N, W, F]
    y = ds.y.double().numpy()[ds.starts.numpy() + ds.window]  # [N, H * T]
    a = x.reshape(len(x), -1)
    am, ym = a.mean(0), y.mean(0)
    coef = np.linalg.solve((a - am).T @ (a - am) + alpha * np.eye(a.shape[1]), (a - am).T @ (y - ym))
    expected = (a - am) @ coef + ym
    with torch.no_grad():
        got = module.eval()(torch.from_numpy(x).float()).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-4 * np.abs(expected).max())
    assert 1e-3 <= alpha <= 1e3


def test_weight_decay_spares_the_skip():
    """AdamW's decoupled decay would pull the skip from ridge's solution towards zero: one step with zero gradients
    decays the LSTM's weights and leaves the skip exactly where it was."""
    from functools import partial

    module = DwcpForecaster(lstm_sizes=(8,), head_sizes=(4,), head_dropouts=(), linear_skip=True,
                            optimizer=partial(torch.optim.AdamW, lr=0.1, weight_decay=0.5))  # fmt: skip
    optimizer = module.configure_optimizers()
    skip, lstm = module.net.skip.weight.detach().clone(), module.net.lstms[0].weight_ih_l0.detach().clone()
    for p in module.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    assert torch.equal(module.net.skip.weight, skip)
    torch.testing.assert_close(module.net.lstms[0].weight_ih_l0, lstm * (1 - 0.1 * 0.5))
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.5, 0.0]


def test_a_frozen_skip_stays_at_ridge_while_the_network_trains(small_csv):
    """``skip_frozen`` (the default config): the specified network keeps its 540,516 trainable parameters, the skip
    is out of the optimizer, and training steps move the LSTM but leave the skip at ridge's solution."""

    dm = DwcpDataModule(data_path=str(small_csv), batch_size=16)
    dm.setup("fit")
    torch.manual_seed(0)
    module = DwcpForecaster(linear_skip=True, skip_frozen=True, head_init=1.0)
    assert count_parameters(module.net) == 540_516
    module.set_scalers(dm.scalers)
    module.init_skip_from_ridge(dm)
    ridge = module.net.skip.weight.detach().clone()
    optimizer = module.configure_optimizers()
    assert all(p is not module.net.skip.weight for g in optimizer.param_groups for p in g["params"])
    lstm = module.net.lstms[0].weight_ih_l0.detach().clone()
    module.train()
    for step, (x, y) in enumerate(dm.train_dataloader()):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(module(x), y).backward()
        optimizer.step()
        if step == 2:
            break
    assert torch.equal(module.net.skip.weight, ridge) and module.net.skip.weight.grad is None
    assert not torch.equal(module.net.lstms[0].weight_ih_l0, lstm)


def test_turning_the_skip_off_names_the_flags_that_go_with_it():
    from dwcp_lstm.errors import ConfigError

    with pytest.raises(ConfigError, match="--model.head_init 0 --model.skip_frozen false"):
        DwcpForecaster(linear_skip=False, skip_frozen=True, head_init=1.0)
    assert DwcpForecaster(linear_skip=False, skip_frozen=False, head_init=0.0).net.skip is None
    with pytest.raises(ConfigError, match="--model.skip_frozen must be true or false, got 'no'"):
        DwcpForecaster(linear_skip=True, skip_frozen="no")


@pytest.mark.parametrize("linear_skip", [False, True])
@pytest.mark.parametrize("skip_frozen", [False, True])
@pytest.mark.parametrize("head_init", [0.0, 0.5, 1.0])
def test_skip_settings_without_the_skip_are_refused_and_with_it_taken(linear_skip, skip_frozen, head_init):
    """Every combination: a skip setting (frozen, or a non-zero head start) without the skip is one refusal that
    names how to turn it off; with the skip, the skip is frozen exactly when asked."""
    from dwcp_lstm.errors import ConfigError

    kwargs = dict(lstm_sizes=(8,), head_sizes=(4,), head_dropouts=(), linear_skip=linear_skip,
                  skip_frozen=skip_frozen, head_init=head_init)  # fmt: skip
    if not linear_skip and (skip_frozen or head_init):
        with pytest.raises(ConfigError, match="--model.head_init 0 --model.skip_frozen false"):
            DwcpForecaster(**kwargs)
        return
    module = DwcpForecaster(**kwargs)
    if not linear_skip:
        assert module.net.skip is None
        return
    assert module.net.skip.weight.requires_grad is (not skip_frozen)
    trained = [p for g in module.param_groups() for p in g["params"]]
    assert any(p is module.net.skip.weight for p in trained) is (not skip_frozen)

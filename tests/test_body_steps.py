"""``--model.body_steps``: only the first steps' losses train the LSTM and the head's hidden layers; the later steps
are read from the same hidden state by the output layer alone. Checked by the gradients each output sends, and by
forecasts that do not change with the setting."""

from __future__ import annotations

import pytest
import torch

from dwcp_lstm.errors import ConfigError
from dwcp_lstm.model import StackedLSTM
from dwcp_lstm.module import DwcpForecaster

T, H = 4, 3


def nets(body: int) -> tuple[StackedLSTM, StackedLSTM]:
    """The same weights twice: every output trains the body / only the first ``body`` outputs do."""
    torch.manual_seed(0)
    plain = StackedLSTM(9, T * H, (8, 6), (5,), (), linear_skip=True, window=20)
    split = StackedLSTM(9, T * H, (8, 6), (5,), (), linear_skip=True, window=20, body_outputs=body)
    split.load_state_dict(plain.state_dict())
    torch.nn.init.normal_(plain.head[-1].weight)  # the skip's zero start would hide what the head passes on
    split.head[-1].weight.data.copy_(plain.head[-1].weight)
    return plain, split


def grads(net: StackedLSTM, x: torch.Tensor, outputs: slice) -> dict[str, torch.Tensor]:
    net.zero_grad()
    net(x)[:, outputs].pow(2).sum().backward()
    return {n: (torch.zeros_like(p) if p.grad is None else p.grad.clone()) for n, p in net.named_parameters()}


@pytest.mark.parametrize("train", [True, False])
def test_forecasts_do_not_depend_on_the_setting(train):
    plain, split = nets(T)
    x = torch.randn(6, 20, 9)
    plain.train(train), split.train(train)  # no dropout here: train mode differs only in BatchNorm's statistics
    torch.testing.assert_close(split(x), plain(x), rtol=0, atol=0)


def test_late_steps_train_only_the_output_layer_and_the_skip():
    plain, split = nets(T)  # step 1 (outputs 0..3) trains the body
    x = torch.randn(6, 20, 9)
    late, first = grads(split, x, slice(T, None)), grads(split, x, slice(0, T))
    reference = grads(plain, x, slice(T, None))
    output_layer = f"head.{len(split.head) - 1}."
    for name, g in late.items():
        if name.startswith((output_layer, "skip.")):
            torch.testing.assert_close(g, reference[name])  # the same gradient as without the split
            assert g.abs().sum() > 0, name
        else:
            assert g.abs().sum() == 0, name  # the LSTM and the hidden layer see nothing of the late steps
            assert reference[name].abs().sum() > 0, name  # ... which without the split they would
    assert all(g.abs().sum() > 0 for n, g in first.items() if n.startswith("lstms.")), "step 1 trains the LSTM"
    both = grads(split, x, slice(None))  # all outputs: the body's gradient is step 1's alone
    for name in late:
        torch.testing.assert_close(both[name], late[name] + first[name])


def test_the_late_head_trains_on_the_late_steps_alone_and_never_the_body():
    torch.manual_seed(0)
    net = StackedLSTM(9, T * H, (8, 6), (5,), (), linear_skip=True, window=20, body_outputs=T, late_head_size=7)
    torch.nn.init.normal_(net.late[-1].weight)  # its zero start would hide what reaches the first layer
    assert sum(p.numel() for p in net.late.parameters()) == 6 * 7 + 7 + 7 * (T * H - T) + (T * H - T)
    x = torch.randn(6, 20, 9)
    late, first = grads(net, x, slice(T, None)), grads(net, x, slice(0, T))
    for name, g in late.items():
        if name.startswith("late."):
            assert g.abs().sum() > 0, name
            assert first[name].abs().sum() == 0, name  # step 1 does not read the late head
        elif not name.startswith(("head.3.", "skip.")):
            assert g.abs().sum() == 0, name  # the LSTM and the hidden layer see nothing of the late steps
    net.eval()
    with torch.no_grad():  # in inference the late head adds to the later outputs, reading the LSTM's last output
        h = x
        for k, lstm in enumerate(net.lstms):
            h = lstm(h)[0]
            h = net.norms[k](h) if k < len(net.norms) else h
        plain = net.head(h[:, -1]) + net.skip(x.flatten(1))
        torch.testing.assert_close(net(x)[:, :T], plain[:, :T])
        torch.testing.assert_close(net(x)[:, T:], plain[:, T:] + net.late(h[:, -1]))


@pytest.mark.parametrize(("body", "late"), [(None, 8), (H, 8), (2, 0), (2, True)])
def test_a_late_head_without_late_steps_or_of_no_width_is_refused(body, late):
    with pytest.raises(ConfigError, match=r"--model.late_head_size must be null or an integer >= 1 with"):
        DwcpForecaster(horizon=H, lstm_sizes=(8,), head_sizes=(4,), head_dropouts=(), body_steps=body,
                       late_head_size=late)  # fmt: skip


@pytest.mark.parametrize("bad", [0, H + 1, 1.5, True, -1])
def test_body_steps_outside_one_to_the_horizon_are_refused(bad):
    with pytest.raises(ConfigError, match=r"--model.body_steps must be null or an integer from 1 to the horizon"):
        DwcpForecaster(horizon=H, lstm_sizes=(8,), head_sizes=(4,), head_dropouts=(), body_steps=bad)


def test_the_module_passes_whole_steps_to_the_network():
    module = DwcpForecaster(horizon=H, lstm_sizes=(8,), head_sizes=(4,), head_dropouts=(), body_steps=2)
    assert module.net.body_outputs == 2 * T
    assert DwcpForecaster(horizon=H, lstm_sizes=(8,), head_sizes=(4,), head_dropouts=()).net.body_outputs is None


def test_the_horizon_config_resolves_to_the_specified_body_with_the_split(capsys):
    """``configs/horizon.yaml`` through the CLI: 12 steps, step 1 trains the specified LSTM body (sizes as the
    default), the skip with its products on, the head without dropout, the hour and weekday read as a phase."""
    import yaml
    from conftest import ROOT

    from dwcp_lstm.cli import cli_main

    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "--config", str(ROOT / "configs" / "horizon.yaml"), "--print_config"])
    assert exc.value.code in (0, None)
    cfg = yaml.safe_load(capsys.readouterr().out)
    default = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    model = cfg["model"]
    assert cfg["data"]["horizon"] == 12  # linked into the model
    assert (model["body_steps"], model["linear_skip"], model["head_dropouts"]) == (1, True, [0.0, 0.0])
    assert (model["skip_cross"], model["head_init"], model["late_head_size"]) == (True, 1.0, None)
    assert cfg["data"]["cyclic"] == {"time_of_day": 24, "day_of_week": 7}
    assert all(model[k] == default["model"][k] for k in ("lstm_sizes", "head_sizes"))

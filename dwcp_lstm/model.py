"""The stacked LSTM forecaster as a pure ``nn.Module`` (no Lightning): scaled window in, scaled next step out."""

from __future__ import annotations

import math

import torch
from torch import nn


class CyclicEncoding(nn.Module):
    """Replace calendar columns of a scaled window by the sine and cosine of their phase: [B, W, F] -> [B, W, F + C].

    A standardised hour is a line with a jump at midnight: no affine map of it gives the load an hour ahead, which
    follows a daily sine. The phase ``2 pi value / period`` of the *raw* value (unscaled with the column's train-fit
    statistics, held as buffers that travel in the checkpoint) wraps around. Output columns: the other features in
    order, then the sines, then the cosines. Inside the network, so the exported graph still takes the raw column.

    Args:
        n_features: input width F.
        cyclic: ``(column, period)`` per cyclic feature, the period in the column's own unit (24 for an hour of the
            day, 7 for a weekday), as :func:`dwcp_lstm.data.check_cyclic` returns them.
    """

    def __init__(self, n_features: int, cyclic: tuple[tuple[int, float], ...] = ()) -> None:
        super().__init__()
        self.index = [j for j, _ in cyclic]
        self.keep = [j for j in range(n_features) if j not in set(self.index)]
        keep = bool(cyclic)  # only then in the state dict: checkpoints without cyclic columns keep their keys
        omega = torch.tensor([2 * math.pi / p for _, p in cyclic], dtype=torch.float32)
        self.register_buffer("omega", omega, persistent=keep)
        self.register_buffer("mean", torch.zeros(len(cyclic)), persistent=keep)  # the columns' scalers: set with
        self.register_buffer("scale", torch.ones(len(cyclic)), persistent=keep)  # the model's (set_scalers)

    @property
    def width(self) -> int:
        return len(self.keep) + 2 * len(self.index)

    @torch.no_grad()
    def use_scaler(self, mean, scale) -> None:
        """Take the cyclic columns' train-fit statistics from the whole feature scaler's ``mean`` / ``scale`` [F]."""
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32)[self.index])
        self.scale.copy_(torch.as_tensor(scale, dtype=torch.float32)[self.index])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.index:
            return x
        phase = (x[..., self.index] * self.scale + self.mean) * self.omega  # [B, W, C], radians
        return torch.cat([x[..., self.keep], torch.sin(phase), torch.cos(phase)], dim=-1)  # [B, W, F + C]


class SequenceBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over the feature axis of a [B, T, H] sequence (statistics pooled over batch and time)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)  # [B, T, H] -> [B, H, T] -> [B, T, H]


class StackedLSTM(nn.Module):
    """LSTM(F->256) -> BN -> LSTM(256->128) -> BN -> LSTM(128->64) -> last step -> MLP head (64->128->64->32->T).

    Each LSTM passes its *full* output sequence to the next one. With the defaults (F = 9, T = 4) the model has
    exactly 540,516 trainable parameters. The hidden state starts at zero for every window: windows are independent.

    Args:
        n_features: input width F (linked to the data's feature list).
        n_targets: output width T (linked to the data's target list).
        lstm_sizes: hidden sizes of the stacked LSTM layers.
        head_sizes: widths of the dense head's hidden layers.
        head_dropouts: dropout after each head layer but the last (one per entry of ``head_sizes`` minus one).
        linear_skip: add a linear map of the whole flattened window (``window`` x F -> T) to the output, as LSTNet's
            autoregressive highway (Lai et al., SIGIR 2018): the LSTM then learns what a linear model on the lags
            misses. The head's last layer starts at zero, so the network starts as the linear map alone.
        window: rows per window (the linear map's input is ``window x n_features``; used only with ``linear_skip``).
        body_outputs: how many leading outputs train the LSTM and the head's hidden layers; the later ones are read
            from the same last hidden layer by the output layer alone, their gradient stopped there (in training
            only: forecasts are the same either way). None = every output trains everything.
        late_head_size: with ``body_outputs``, the width of a hidden layer of the later outputs' own head, which
            reads the LSTM's last output (detached in training, so it cannot train the body either) and adds to
            them; its output layer starts at zero. None = no such head.
        cyclic: ``(column, period)`` pairs of calendar inputs that enter the LSTM (and the skip) as the sine and
            cosine of their phase (:class:`CyclicEncoding`); empty = every column as it comes.
        cross: input columns (of the raw feature list) whose last value and window mean the skip also reads as
            products: with each sine and cosine of the last row and with themselves (the "wide" part of Wide & Deep,
            Cheng et al. 2016), and the size of every non-calendar input's last change. A link's level times the
            coming hour's load factor is a product that a linear map of the window cannot form and that the late
            steps, read linearly from a body trained on the first steps, do not learn. Empty = the plain skip.
    """

    def __init__(
        self,
        n_features: int = 9,
        n_targets: int = 4,
        lstm_sizes: tuple[int, ...] = (256, 128, 64),
        head_sizes: tuple[int, ...] = (128, 64, 32),
        head_dropouts: tuple[float, ...] = (0.3, 0.21),
        linear_skip: bool = False,
        window: int = 20,
        body_outputs: int | None = None,
        late_head_size: int | None = None,
        cyclic: tuple[tuple[int, float], ...] = (),
        cross: tuple[int, ...] = (),
        head_init: float = 0.0,
    ) -> None:
        super().__init__()
        if len(head_dropouts) != max(len(head_sizes) - 1, 0):
            raise ValueError(f"head_dropouts needs {max(len(head_sizes) - 1, 0)} entries, got {len(head_dropouts)}")
        self.encode = CyclicEncoding(n_features, cyclic)
        sizes = (self.encode.width, *lstm_sizes)
        self.lstms = nn.ModuleList(nn.LSTM(i, o, batch_first=True) for i, o in zip(sizes[:-1], sizes[1:], strict=True))
        self.norms = nn.ModuleList(SequenceBatchNorm(o) for o in lstm_sizes[:-1])
        layers: list[nn.Module] = []
        widths = (lstm_sizes[-1], *head_sizes)
        for k, (i, o) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            layers += [nn.Linear(i, o), nn.ReLU()]
            if k < len(head_dropouts):
                layers.append(nn.Dropout(head_dropouts[k]))
            if k == 0:
                layers.append(nn.BatchNorm1d(o))  # the specified head: Linear -> ReLU -> Dropout -> BN after layer 1
        layers.append(nn.Linear(widths[-1], n_targets))
        self.head = nn.Sequential(*layers)
        self.n_outputs, self.body_outputs = n_targets, body_outputs
        self.late = None
        if late_head_size:
            if body_outputs is None or body_outputs >= n_targets:
                raise ValueError("late_head_size needs body_outputs below the number of outputs")
            late = n_targets - body_outputs
            self.late = nn.Sequential(
                nn.Linear(lstm_sizes[-1], late_head_size), nn.ReLU(), nn.Linear(late_head_size, late)
            )
            nn.init.zeros_(self.late[-1].weight)  # starts as the split network without it
            nn.init.zeros_(self.late[-1].bias)
        if cross and not linear_skip:
            raise ValueError("cross features are inputs of the linear skip: they need linear_skip")
        self.cross = [self.encode.keep.index(j) for j in cross]  # their columns after the encoding
        n_cross = 2 * len(cross) * (2 * len(cyclic) + 1) + len(self.encode.keep) if cross else 0
        self.skip = nn.Linear(window * self.encode.width + n_cross, n_targets) if linear_skip else None
        if linear_skip:
            with torch.no_grad():  # start as (or near) the linear map: the LSTM adds to it only what it learns
                layers[-1].weight.mul_(head_init)
            nn.init.zeros_(layers[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.encode(x)  # [B, T, F] -> [B, T, F + C] (the identity without cyclic columns)
        h = x
        for k, lstm in enumerate(self.lstms):
            h, _ = lstm(h)  # [B, T, H_k]
            if k < len(self.norms):
                h = self.norms[k](h)
        m = self.body_outputs
        if self.training and m is not None and m < self.n_outputs:
            z = self.head[:-1](h[:, -1])  # [B, head_last]: what every output reads
            out_layer = self.head[-1]
            out = torch.cat([out_layer(z)[:, :m], out_layer(z.detach())[:, m:]], dim=1)  # [B, targets]
        else:
            out = self.head(h[:, -1])  # [B, T, H_last] -> [B, H_last] -> [B, targets]
        if self.late is not None:
            last = h[:, -1].detach() if self.training else h[:, -1]  # [B, H_last]
            out = torch.cat([out[:, :m], out[:, m:] + self.late(last)], dim=1)  # [B, targets]
        if self.skip is not None:
            out = out + self.skip(self.skip_inputs(x))  # [B, W, F + C] -> [B, W * (F + C) + cross] -> [B, targets]
        return out

    def skip_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """What the linear skip reads from an encoded window [B, W, F + C]: the flattened window, then the cross
        products (see ``cross``): levels = last values and window means of the cross columns [B, 2K], times the
        last row's sines and cosines [B, 2C], then the levels squared, then the size of the last change of every
        non-calendar input (a jitter measure reads |change|: RFC 3550's interarrival jitter is a running mean of it;
        the next jitter here moves with the queue's last |change|, which no linear map of the window gives)."""
        flat = x.flatten(1)  # [B, W * (F + C)]
        if not self.cross:
            return flat
        keep = len(self.encode.keep)  # the non-calendar columns come first, then the sines, then the cosines
        levels = torch.cat([x[:, -1, self.cross], x[:, :, self.cross].mean(1)], dim=1)  # [B, 2K]
        phase = x[:, -1, keep:]  # [B, 2C]
        products = (levels[:, :, None] * phase[:, None, :]).flatten(1)  # [B, 2K * 2C]
        moved = (x[:, -1, :keep] - x[:, -2, :keep]).abs()  # [B, F - C]: |last change| of each non-calendar input
        return torch.cat([flat, products, levels * levels, moved], dim=1)


class RidgeBlend(nn.Module):
    """The forecast as ``w x network + (1 - w) x ridge``, per step and target, in raw units: [B, (H,) T] -> same.

    Ridge is the report's ridge baseline (a linear map of the encoded, flattened window); ``w`` is chosen on the
    validation split after training (:mod:`dwcp_lstm.blend`). Folded at construction into one weight per output and
    one affine map, so that the graph gains one Gemm, one Mul and one Add (and a Reshape for H > 1).

    Args:
        weight: ``w`` [H, T] in [0, 1] (1 = the network alone).
        coef: ridge's weights in raw target units [H * T, D], D = window x encoded features.
        intercept: ridge's intercepts in raw target units [H * T].
    """

    def __init__(self, weight, coef, intercept) -> None:
        super().__init__()
        w = torch.as_tensor(weight, dtype=torch.float64)
        rest = (1 - w).reshape(-1)  # [H * T]: ridge's share of each output
        coef, intercept = torch.as_tensor(coef, dtype=torch.float64), torch.as_tensor(intercept, dtype=torch.float64)
        # not in the state dict: a blend is fitted after training from the checkpoint and the data, like the
        # interval calibration, so checkpoints keep their keys
        self.register_buffer("w", w.float(), persistent=False)  # [H, T]: broadcasts over [B, H, T] and [B, T] (H = 1)
        self.register_buffer("a", (rest[:, None] * coef).float(), persistent=False)  # [H * T, D]
        self.register_buffer("b", (rest * intercept).float(), persistent=False)  # [H * T]

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        lin = nn.functional.linear(x.flatten(1), self.a, self.b)  # [B, W, F + C] -> [B, H * T]
        if lin.dim() != out.dim():
            lin = lin.reshape(out.shape)  # [B, H, T]
        return out * self.w + lin


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

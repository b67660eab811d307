"""The LightningModule: MSE (or Huber/L1) on scaled targets, metrics per target in original units, injectable
optimizer/scheduler."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torch.nn import functional as F
from torchmetrics import MeanMetric

from dwcp_lstm.data import FEATURES, TARGETS, DwcpDataModule, Scalers, check_cyclic
from dwcp_lstm.errors import ConfigError
from dwcp_lstm.intervals import check_levels
from dwcp_lstm.metrics import ForecastMetrics, summarize
from dwcp_lstm.model import RidgeBlend, StackedLSTM
from dwcp_lstm.tables import target_ranges

LOSSES = ("mse", "huber", "l1")


class RawForecaster(nn.Module):
    """Raw metrics [B, W, F] -> raw forecasts [B, H, T] ([B, T] for H = 1): the train-fit scalers baked in on both
    sides (what ONNX ships).

    With ``target_index`` (delta mode) the network's output is the change from the window's last raw value of each
    target, which is added back inside the graph. ``blend`` (:class:`~dwcp_lstm.model.RidgeBlend`) mixes the result
    with ridge's forecast. ``ranges`` [2, T] (``tables.target_ranges``) then clips the forecasts into the targets'
    physical ranges (None, or no finite edge: no clipping op in the graph).
    """

    def __init__(
        self,
        net: nn.Module,
        fmean,
        fscale,
        tmean,
        tscale,
        target_index=None,
        horizon: int = 1,
        ranges=None,
        blend: RidgeBlend | None = None,
    ) -> None:
        super().__init__()
        self.net, self.blend = net, blend
        for name, v in (("fmean", fmean), ("fscale", fscale), ("tmean", tmean), ("tscale", tscale)):
            self.register_buffer(name, torch.as_tensor(v, dtype=torch.float32).clone())
        self.target_index = None if target_index is None else [int(i) for i in target_index]
        self.horizon = horizon
        self.clips = ranges is not None and bool(np.isfinite(np.asarray(ranges)).any())
        if self.clips:
            self.register_buffer("low", torch.as_tensor(np.asarray(ranges)[0], dtype=torch.float32))
            self.register_buffer("high", torch.as_tensor(np.asarray(ranges)[1], dtype=torch.float32))

    def clip(self, y: torch.Tensor) -> torch.Tensor:
        """[..., T] clipped into the targets' ranges."""
        return torch.minimum(torch.maximum(y, self.low), self.high) if self.clips else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scaled = (x - self.fmean) / self.fscale  # [B, W, F]
        out = self.net(scaled) * self.tscale + self.tmean  # [B, W, F] -> [B, H * T]
        if self.horizon > 1:  # H = 1 stays [B, T], the one-step contract, without a reshape in the graph
            out = out.reshape(out.shape[0], self.horizon, -1)  # [B, H, T], step-major
        if self.target_index is not None:
            last = x[:, -1, self.target_index]  # [B, T]: the last raw value of each target
            out = out + (last if self.horizon == 1 else last.unsqueeze(1))
        if self.blend is not None:
            out = self.blend(self.net.encode(scaled), out)
        return self.clip(out)


class IntervalForecaster(nn.Module):
    """:class:`RawForecaster` plus calibrated prediction intervals, in one graph: raw windows [B, W, F] in;
    ``forecast`` [B, (H,) T], ``lower`` / ``upper`` [B, L, (H,) T] per level and step, and for H > 1 ``mean_lower``
    / ``mean_upper`` [B, L, H, T] for the mean over the first k steps (the H axis is k - 1). The scale of a target's
    interval is 1, for adaptive targets the standard deviation of its one-step changes inside the window (floored),
    for fitted ones the exp of a linear map of the log window summaries of every target, computed in the graph from
    the raw input, exactly as :mod:`dwcp_lstm.intervals` does in numpy; quantile targets centre and scale each
    step's interval by linear maps of that step's forecast (two MatMuls on the output).
    """

    def __init__(self, raw: RawForecaster, calibration, target_index: list[int] | None) -> None:
        super().__init__()
        self.raw, self.horizon = raw, raw.horizon
        adaptive = np.asarray(calibration.adaptive, dtype=bool)
        fitted = np.zeros_like(adaptive) if calibration.fitted is None else np.asarray(calibration.fitted, dtype=bool)
        quantile = np.zeros_like(adaptive) if calibration.quantile is None else np.asarray(calibration.quantile, bool)
        fitted = fitted & ~quantile  # a quantile target's fitted spread serves beyond the horizon only (the planner)
        if (adaptive.any() or fitted.any()) and target_index is None:
            raise ConfigError("adaptive intervals need every target among the features (delta mode)")
        self.target_index = list(target_index) if target_index is not None else []
        self.levels = len(calibration.levels)
        # Lower and upper quantiles stacked [2L, H, T] ([2L, T] for H = 1, like the forecast), so that both bounds
        # take one Add and one clip: at batch 1 the graph's time goes to the number of operators, not to their
        # arithmetic (docs/benchmarks.md)
        pairs = {"q": ("lo", "hi"), "mean_q": ("mean_lo", "mean_hi")} if self.horizon > 1 else {"q": ("lo", "hi")}
        for name, parts in pairs.items():
            stacked = np.concatenate([np.asarray(getattr(calibration, p)) for p in parts])
            stacked = stacked[:, 0] if self.horizon == 1 else stacked
            self.register_buffer(name, torch.as_tensor(stacked, dtype=torch.float32))
        self.register_buffer("floor", torch.as_tensor(np.asarray(calibration.floor), dtype=torch.float32))
        self.register_buffer("adaptive", torch.as_tensor(adaptive))
        self.register_buffer("one", torch.ones(len(adaptive)))
        self.scaled = bool(adaptive.any() or fitted.any())  # a plain calibration adds no scale to the graph at all
        self.any_fitted, self.all_fitted = bool(fitted.any()), bool(fitted.all())  # all: no Where in the graph
        if self.any_fitted:  # exp(log summaries [B, 3 T] @ weight [3 T, T] + bias [T]), see intervals.fit_spread
            spread = np.asarray(calibration.spread, dtype=np.float64)
            self.register_buffer("fitted", torch.as_tensor(fitted))
            self.register_buffer("spread_bias", torch.as_tensor(spread[0], dtype=torch.float32))
            self.register_buffer("spread_weight", torch.as_tensor(spread[1:], dtype=torch.float32))
            floor = np.asarray(calibration.spread_floor, dtype=np.float64)[None]  # [1, 3, T]
            self.register_buffer("spread_floor", torch.as_tensor(floor, dtype=torch.float32))
        self.register_buffer("steps", torch.arange(1, self.horizon + 1, dtype=torch.float32).view(1, -1, 1))
        self.any_quantile, self.all_quantile = bool(quantile.any()), bool(quantile.all())
        if self.any_quantile:  # [H, 1 + T, T] maps of the step's forecast: bias [H, T] and weight [H, T, T]
            self.register_buffer("quantile", torch.as_tensor(quantile))
            self.register_buffer("zero", torch.zeros(len(quantile)))
            for key, value in calibration.qr.items():
                value = torch.as_tensor(np.asarray(value), dtype=torch.float32)
                if key.endswith("floor"):
                    self.register_buffer(f"qr_{key}", value)
                else:
                    self.register_buffer(f"qr_{key}_bias", value[:, 0].contiguous())
                    self.register_buffer(f"qr_{key}_weight", value[:, 1:].contiguous())
            for name in ("q", "mean_q") if self.horizon > 1 else ("q",):  # [2L, H, T] here, also for H = 1
                setattr(self, name, getattr(self, name).view(2 * self.levels, self.horizon, -1))

    def _linear(self, v: torch.Tensor, key: str) -> torch.Tensor:
        """[B, H, T] -> [B, H, T]: the quantile scale's map ``key`` of each step's forecast (intervals._linear)."""
        weight, bias = getattr(self, f"qr_{key}_weight"), getattr(self, f"qr_{key}_bias")
        return (v.unsqueeze(2) @ weight).squeeze(2) + bias  # [B, H, 1, T] @ [H, T, T]

    def _quantile_bounds(
        self, v: torch.Tensor, scale: torch.Tensor | None, q: torch.Tensor, key: str = ""
    ) -> torch.Tensor:
        """Bounds [B, 2L, H, T] around ``v`` [B, H, T] with quantile targets (intervals.interval_terms)."""
        centre = self._linear(v, key + "centre")
        width = torch.maximum(self._linear(v, key + "width"), getattr(self, f"qr_{key}width_floor"))
        if not self.all_quantile:
            centre = torch.where(self.quantile, centre, self.zero)
            width = torch.where(self.quantile, width, self.one if scale is None else scale)
        return self.raw.clip((v + centre)[:, None] + width[:, None] * q)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        f = self.raw(x)  # [B, T] (H = 1) or [B, H, T]
        clip, n = self.raw.clip, self.levels  # bounds stay inside the targets' ranges, like the forecast
        scale = None
        if self.scaled:
            target = x[:, :, self.target_index]  # [B, W, T]
            vol = (target[:, 1:] - target[:, :-1]).std(dim=1, unbiased=False, keepdim=True)  # [B, 1, T]
            scale = None if self.all_fitted else torch.where(self.adaptive, torch.maximum(vol, self.floor), self.one)
            if self.any_fitted:
                level = torch.cat([vol, target.mean(dim=1, keepdim=True).abs(), target[:, -1:].abs()], dim=1)
                logs = torch.log(torch.maximum(level, self.spread_floor)).flatten(1)  # [B, 3 T]: as numpy orders it
                spread = torch.exp(logs @ self.spread_weight + self.spread_bias).unsqueeze(1)  # [B, 1, T]
                scale = spread if self.all_fitted else torch.where(self.fitted, spread, scale)
            if self.any_quantile:
                return self._forward_quantile(f, scale)
            scale = scale if self.horizon == 1 else scale.unsqueeze(1)  # [B, 1, (1,) T]
        elif self.any_quantile:
            return self._forward_quantile(f, None)
        bounds = clip(f[:, None] + (self.q if scale is None else scale * self.q))  # [B, 2L, (H,) T]: lower, upper
        lower, upper = bounds.split(n, dim=1)
        if self.horizon == 1:
            return f, lower, upper  # the one-step contract: [B, T], [B, L, T] each
        mean = torch.cumsum(f, dim=1) / self.steps  # [B, H, T], entry k - 1: the mean of steps 1..k
        means = clip(mean[:, None] + (self.mean_q if scale is None else scale * self.mean_q))
        return f, lower, upper, *means.split(n, dim=1)

    def _forward_quantile(self, f: torch.Tensor, scale: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """:meth:`forward` with quantile targets; ``scale`` [B, 1, T]: the other targets' window scale (or None)."""
        n = self.levels
        steps = f.unsqueeze(1) if self.horizon == 1 else f  # [B, H, T]
        bounds = self._quantile_bounds(steps, scale, self.q)  # [B, 2L, H, T]
        lower, upper = (b.squeeze(2) if self.horizon == 1 else b for b in bounds.split(n, dim=1))
        if self.horizon == 1:
            return f, lower, upper
        mean = torch.cumsum(f, dim=1) / self.steps
        return f, lower, upper, *self._quantile_bounds(mean, scale, self.mean_q, "mean_").split(n, dim=1)


def _check_sizes(window: int, lstm_sizes, head_sizes, head_dropouts, mape_floor: float) -> None:
    """Architecture values that would otherwise reach PyTorch unchecked (and fail there, or mid-training)."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ConfigError(f"--data.window_size must be >= 2 (a change needs two rows), got {window!r}")  # linked
    for flag, sizes, allow_empty in (("lstm_sizes", lstm_sizes, False), ("head_sizes", head_sizes, True)):
        if not allow_empty and len(sizes) == 0:
            raise ConfigError(f"--model.{flag} must list at least one layer size, got {list(sizes)}")
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
            raise ConfigError(f"--model.{flag} must be positive integers, got {list(sizes)}")
    need = max(len(head_sizes) - 1, 0)
    if len(head_dropouts) != need:
        raise ConfigError(
            f"--model.head_dropouts needs {need} entries (one per head layer but the last), got {list(head_dropouts)}"
        )
    if any(not (0.0 <= float(p) < 1.0) for p in head_dropouts):
        raise ConfigError(f"--model.head_dropouts must be in [0, 1), got {list(head_dropouts)}")
    if not (mape_floor >= 0.0 and math.isfinite(mape_floor)):
        raise ConfigError(f"--model.mape_floor must be a finite number >= 0, got {mape_floor}")


class DwcpForecaster(L.LightningModule):
    """Next-step forecaster of link metrics around :class:`~dwcp_lstm.model.StackedLSTM`.

    Args:
        feature_names: input columns in order (linked from ``data.features``; sets the input width).
        target_names: forecast columns in order (linked from ``data.targets``; sets the output width).
        window_size: rows per window (linked from ``data.window_size``; fixes the exported input shape).
        horizon: rows forecast at once (linked from ``data.horizon``): the head has ``horizon x targets`` outputs.
        target_mode: ``delta`` or ``level`` (linked from ``data.target_mode``): what the network's output means.
        lstm_sizes: hidden sizes of the stacked LSTM layers.
        head_sizes: widths of the dense head's hidden layers.
        head_dropouts: dropout after each head layer but the last.
        linear_skip: add a linear map of the whole scaled window to the output (LSTNet's autoregressive highway),
            started at the ridge regression fit on the training windows (the report's ``ridge`` baseline, in the
            network's own target space), with the LSTM's contribution started at zero: training starts from ridge's
            forecast and the LSTM learns what it misses. The real-trace recipe; see docs/real_traces.md.
        body_steps: with ``horizon`` > 1, how many leading steps' losses train the LSTM and the head's hidden
            layers; each later step is read from the same hidden state by the output layer alone (its gradient stops
            there). The late steps, mostly noise, otherwise overfit the shared body within a few epochs, and early
            stopping then ends the run before step 1 has learnt what boosted trees find (see docs/method.md,
            "Which steps train the body"). null = every step; forecasts and the exported graph are the same either way.
        late_head_size: with ``body_steps`` below the horizon, the later steps also get a head of their own (one
            hidden layer of this width) on the LSTM's last output, detached so it does not train the body either:
            the later steps then read the state non-linearly. null = the output layer alone.
        skip_frozen: with ``linear_skip``, the skip stays at ridge's solution (its weights are not trained, so the
            network keeps exactly its own trainable parameters, 540,516 for the specified one): the LSTM learns the
            residual of ridge, as delta mode makes it learn the residual of persistence. The default config's
            choice; trained, the skip drifts from ridge with the LSTM.
        skip_cross: with ``linear_skip``, the skip also reads the products of each target's last value and window
            mean with the last row's cyclic sines and cosines (``data.cyclic``) and with themselves, and the size
            of every other input's last change, started at ridge like the rest of the skip (see
            :class:`~dwcp_lstm.model.StackedLSTM`, ``cross``).
        head_init: with ``linear_skip``, the scale of the head's output layer's first weights against PyTorch's
            default: 0 starts the network exactly at the skip (ridge), but then no gradient reaches the LSTM until
            the output layer has grown, and where ridge already explains most of the targets that can take longer
            than early stopping waits (one seed of two never learnt jitter's first step); 1 starts it near ridge,
            the LSTM learning from the first batch.
        cyclic: calendar features (linked from ``data.cyclic``) that the network reads as the sine and cosine of
            ``2 pi value / period`` (see :class:`~dwcp_lstm.model.CyclicEncoding`); null = none.
        loss: ``mse`` (the specified loss), ``huber`` or ``l1``, on scaled targets. MSE fits the conditional mean
            (best RMSE); L1 the median (best MAE); Huber is quadratic within ``huber_delta`` and linear beyond, so
            heavy-tailed errors (throughput bursts on real traces) pull less. See README "Real network traces".
        huber_delta: where Huber turns from quadratic to linear, in target standard deviations.
        loss_weights: per-target weights of the loss on scaled targets; null = equal.
        mape_floor: MAPE skips targets with ``|y| <= mape_floor`` (see :mod:`dwcp_lstm.metrics`).
        interval_levels: nominal coverage of the prediction intervals, calibrated on the validation split after
            training (see :mod:`dwcp_lstm.intervals`); the validation split must hold enough windows for the widest.
        blend_ridge: after training, each step and target's forecast becomes ``w x network + (1 - w) x ridge``
            (the report's ridge baseline, fit on the training windows), ``w`` from 0, 0.05, .., 1 chosen on the
            validation split (see :mod:`dwcp_lstm.blend`); ridge is linear in the window, so the exported graph
            carries it. Where ridge adds nothing ``w`` is 1. false = the network alone.
        optimizer: optimizer factory (Adam, lr 1e-3 by default).
        scheduler: LR scheduler factory; null = ReduceLROnPlateau(factor 0.5, patience 5) on val_loss.
    """

    def __init__(
        self,
        feature_names: list[str] = FEATURES,  # noqa: B006 (literal defaults for the CLI; never mutated)
        target_names: list[str] = TARGETS,  # noqa: B006
        window_size: int = 20,
        horizon: int = 1,
        target_mode: str = "delta",
        lstm_sizes: tuple[int, ...] = (256, 128, 64),
        head_sizes: tuple[int, ...] = (128, 64, 32),
        head_dropouts: tuple[float, ...] = (0.3, 0.21),
        linear_skip: bool = False,
        skip_cross: bool = False,
        skip_frozen: bool = False,
        head_init: float = 0.0,
        body_steps: int | None = None,
        late_head_size: int | None = None,
        cyclic: dict[str, float] | None = None,
        loss: str = "mse",
        huber_delta: float = 1.0,
        loss_weights: list[float] | None = None,
        mape_floor: float = 0.0,
        interval_levels: list[float] = [0.8, 0.95],  # noqa: B006 (literal default for the CLI; never mutated)
        blend_ridge: bool = True,
        optimizer: OptimizerCallable = torch.optim.Adam,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        if not feature_names or not target_names:
            raise ConfigError("--data.features and --data.targets must not be empty")
        _check_sizes(window_size, lstm_sizes, head_sizes, head_dropouts, mape_floor)
        check_levels(interval_levels)
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
            raise ConfigError(f"--data.horizon must be an integer >= 1, got {horizon!r}")
        self.horizon = horizon
        if body_steps is not None and (isinstance(body_steps, bool) or not isinstance(body_steps, int)
                                       or not 1 <= body_steps <= horizon):  # fmt: skip
            raise ConfigError(f"--model.body_steps must be null or an integer from 1 to the horizon ({horizon}), "
                              f"got {body_steps!r}")  # fmt: skip
        bad_late = isinstance(late_head_size, bool) or not isinstance(late_head_size, int) or late_head_size < 1
        if late_head_size is not None and (bad_late or body_steps is None or body_steps >= horizon):
            raise ConfigError(
                f"--model.late_head_size must be null or an integer >= 1 with --model.body_steps below the horizon "
                f"({horizon}), got {late_head_size!r} with body_steps {body_steps!r}"
            )
        n_out = len(target_names) * horizon  # step-major: all targets of step 1, then of step 2, ...
        sizes = (lstm_sizes, head_sizes, head_dropouts)
        body = None if body_steps is None else body_steps * len(target_names)
        if skip_cross and not linear_skip:
            raise ConfigError("--model.skip_cross needs --model.linear_skip true (the products are inputs of the skip)")
        if skip_cross and not set(target_names) <= set(feature_names):
            raise ConfigError("--model.skip_cross needs every target among the features (it multiplies their levels)")
        cross = tuple(list(feature_names).index(t) for t in target_names) if skip_cross else ()
        if isinstance(head_init, bool) or not isinstance(head_init, int | float) or not 0 <= head_init < math.inf:
            raise ConfigError(f"--model.head_init must be a number >= 0, got {head_init!r}")
        if not isinstance(skip_frozen, bool):  # a string such as "no" is truthy: it would freeze the skip
            raise ConfigError(f"--model.skip_frozen must be true or false, got {skip_frozen!r}")
        if (head_init or skip_frozen) and not linear_skip:  # the default config sets both: say how to turn them off
            raise ConfigError(
                f"--model.linear_skip false: --model.head_init {head_init:g} and --model.skip_frozen "
                f"{str(skip_frozen).lower()} set the skip's start and it needs --model.linear_skip; for the network "
                "alone also give --model.head_init 0 --model.skip_frozen false"
            )
        self.net = StackedLSTM(len(feature_names), n_out, *sizes, linear_skip=linear_skip, window=window_size,
                               body_outputs=body, late_head_size=late_head_size, cross=cross, head_init=head_init,
                               cyclic=check_cyclic(cyclic, feature_names, target_names))  # fmt: skip
        if skip_frozen:
            self.net.skip.requires_grad_(False)  # ridge's solution, set in setup(), travels as a fixed weight
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        n_f, n_t = len(feature_names), len(target_names)
        w = torch.ones(n_t) if loss_weights is None else torch.as_tensor(loss_weights, dtype=torch.float64)
        ok = w.shape == (n_t,) and bool((w >= 0).all() and torch.isfinite(w).all() and w.sum() > 0)
        w = (w / w.mean()).float() if ok else w  # normalised in float64: a float32 mean of 3e38s overflowed (all 0)
        if not ok or not torch.isfinite(w).all() or not (w.sum() > 0):  # and of 1e-45s underflowed to 0 (NaN loss)
            raise ConfigError(f"--model.loss_weights needs {n_t} finite numbers >= 0, not all 0, whose mean is a "
                              f"float32 number, got {loss_weights}")  # fmt: skip
        self.register_buffer("loss_weights", w.repeat(horizon))  # the same weight at every step
        if loss not in LOSSES:
            raise ConfigError(f"--model.loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        if not (huber_delta > 0 and math.isfinite(huber_delta)):
            raise ConfigError(f"--model.huber_delta must be > 0, got {huber_delta}")
        self.loss_name, self.huber_delta = loss, float(huber_delta)
        if target_mode not in ("delta", "level"):
            raise ConfigError(f"--data.target_mode must be delta or level, got {target_mode!r}")  # linked from data
        self.delta = target_mode == "delta"
        if self.delta and not set(target_names) <= set(feature_names):
            raise ConfigError("--data.target_mode delta needs every target among the features")
        idx = [list(feature_names).index(t) for t in target_names] if self.delta else []
        self.target_index = idx  # feature column of each target (delta mode)
        # Scaler parameters: copied from the DataModule in setup(), saved in every checkpoint.
        self.register_buffer("fmean", torch.zeros(n_f))
        self.register_buffer("fscale", torch.ones(n_f))
        self.register_buffer("tmean", torch.zeros(n_t * horizon))
        self.register_buffer("tscale", torch.ones(n_t * horizon))
        # The targets' physical ranges (tables.RANGES, by name): forecasts are clipped into them. Not buffers: they
        # follow from the names (old checkpoints load unchanged), and weight averaging (callbacks.EMA) lerps buffers,
        # which turns an infinite edge into NaN (inf + w * (inf - inf)).
        self.ranges = target_ranges(target_names)
        # keys are "<stage>_metrics": a bare "train" would shadow nn.Module.train
        self.metrics = nn.ModuleDict(
            {f"{s}_metrics": ForecastMetrics(target_names, mape_floor) for s in ("train", "val", "test")}
        )
        self.example_input_array = torch.zeros(1, window_size, n_f)
        self.val_loss_mean = MeanMetric()  # drives the LR scheduler (see configure_optimizers)
        self.scheduler = None
        self._scheduler_state: dict | None = None
        if not isinstance(blend_ridge, bool):
            raise ConfigError(f"--model.blend_ridge must be true or false, got {blend_ridge!r}")
        self.blend: RidgeBlend | None = None  # fitted after training (blend.fit_blend), never in the state dict
        self.blend_summary: dict | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # scaled [B, W, F] -> scaled [B, T]

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        if isinstance(dm, DwcpDataModule) and dm.scalers is not None:
            self.set_scalers(dm.scalers)  # a restored checkpoint overwrites them with its own (after setup)
            if stage == "fit" and self.net.skip is not None:
                self.init_skip_from_ridge(dm)  # on resume, the checkpoint then overwrites this start with its weights

    @torch.no_grad()
    def init_skip_from_ridge(self, dm: DwcpDataModule) -> float:
        """Set the linear skip to the ridge regression of the scaled targets on the flattened scaled window, fit on
        (at most 100,000 evenly spaced) training windows with the alpha chosen by leave-one-out CV, exactly as the
        report's ridge baseline chooses it. Returns that alpha."""
        from dwcp_lstm.baselines import RidgeBaseline, _even_subset

        ds, starts = dm.datasets["train"], dm.starts["train"]
        starts = starts[_even_subset(len(starts), 100_000)]
        x = self.net.encode(torch.from_numpy(dm.windows(ds.x.numpy(), starts)))  # [N, W, F + C], scaled
        x = self.net.skip_inputs(x).double().numpy()  # [N, skip inputs]
        y = ds.y.numpy()[starts + dm.window_size].astype(np.float64)  # [N, H * T], the network's own targets
        ridge = RidgeBaseline().fit(x, y).model
        self.net.skip.weight.copy_(torch.as_tensor(ridge.coef_.reshape(y.shape[1], -1)))
        self.net.skip.bias.copy_(torch.as_tensor(np.broadcast_to(ridge.intercept_, (y.shape[1],)).copy()))
        return float(ridge.alpha_)

    def on_validation_start(self) -> None:
        self._lend_scalers()
        if self.trainer.state.fn == "validate":  # the validate command scores the forecast (during fit: the network)
            self._fit_blend()

    def on_test_start(self) -> None:
        self._lend_scalers()
        self._fit_blend()  # test figures are the forecast's, as the report and the export make it

    def on_predict_start(self) -> None:
        self._lend_scalers()
        self._fit_blend()  # forecasts as the exported graph makes them

    def _fit_blend(self) -> None:
        """Fit the mix with ridge on the loop's data (again on every call: the weights may have been restored
        since); nothing without a DwcpDataModule."""
        dm = self.trainer.datamodule
        if isinstance(dm, DwcpDataModule) and dm.scalers is not None:
            from dwcp_lstm.blend import fit_blend

            fit_blend(self, dm)

    def _lend_scalers(self) -> None:
        """A restored checkpoint brings the scalers of the data it was trained on: evaluating it on other data must
        scale that data the same way. Checkpoints are restored after setup(), so this runs at loop start."""
        dm = self.trainer.datamodule
        if isinstance(dm, DwcpDataModule) and dm.scalers is not None:
            dm.use_scalers(self.scalers)

    @property
    def scalers(self) -> Scalers:
        """The scalers in the buffers (those of the training data once fitted or restored)."""
        h = self.hparams
        values = (getattr(self, n).double().cpu().numpy() for n in ("fmean", "fscale", "tmean", "tscale"))
        return Scalers(tuple(h.feature_names), tuple(h.target_names), h.target_mode, *values, self.horizon)

    def set_scalers(self, scalers: Scalers) -> None:
        """Copy a dataset's train-fit scalers into the buffers (they travel in every checkpoint and the export)."""
        h = self.hparams
        if (list(scalers.features), list(scalers.targets), scalers.target_mode, scalers.horizon) != (
            list(h.feature_names),
            list(h.target_names),
            h.target_mode,
            self.horizon,
        ):
            raise ConfigError("the model's features/targets/target_mode/horizon differ from the data's (link them)")
        values = (scalers.feature_mean, scalers.feature_scale, scalers.target_mean, scalers.target_scale)
        for name, v in zip(("fmean", "fscale", "tmean", "tscale"), values, strict=True):
            getattr(self, name).copy_(torch.as_tensor(v, dtype=torch.float32))
        self.net.encode.use_scaler(self.fmean, self.fscale)

    def raw_forecaster(self) -> RawForecaster:
        """The network with its scalers baked in, for export and raw-unit inference."""
        index = self.target_index if self.delta else None
        return RawForecaster(self.net, self.fmean, self.fscale, self.tmean, self.tscale, index, self.horizon,
                             self.ranges, self.blend)  # fmt: skip

    def interval_forecaster(self, calibration) -> IntervalForecaster:
        """:meth:`raw_forecaster` with the calibrated intervals of ``calibration`` (see :mod:`dwcp_lstm.intervals`)."""
        index = self.target_index if self.delta else None
        return IntervalForecaster(self.raw_forecaster(), calibration, index)

    def unscale(self, y: torch.Tensor, x: torch.Tensor, clip: bool = True) -> torch.Tensor:
        """Scaled network output (or target) [B, H * T] of scaled windows x [B, W, F] -> original units [B, H, T],
        clipped into the targets' ranges as the graph clips (a no-op on actual targets, which the reader checked)."""
        out = (y * self.tscale + self.tmean).reshape(len(y), self.horizon, -1)  # [B, H, T]
        if self.delta:
            i = self.target_index
            out = out + (x[:, -1, i] * self.fscale[i] + self.fmean[i]).unsqueeze(1)  # + the window's last raw value
        return self._clip(out) if clip else out

    def _clip(self, out: torch.Tensor) -> torch.Tensor:
        low, high = (torch.as_tensor(r, dtype=out.dtype, device=out.device) for r in self.ranges)
        return torch.minimum(torch.maximum(out, low), high)

    def forecast(self, x: torch.Tensor, clip: bool = True, blend: bool = True) -> torch.Tensor:
        """Raw forecasts [B, H, T] of scaled windows x [B, W, F], as the exported graph makes them: the network's
        output in original units, mixed with ridge's where a blend was fitted (unless ``blend`` is false), then
        clipped into the targets' ranges (unless ``clip`` is false)."""
        out = self.unscale(self(x), x, clip=False)
        if blend and self.blend is not None:
            out = self.blend(self.net.encode(x), out)
        return self._clip(out) if clip else out

    # -- steps ---------------------------------------------------------------------------------------------------
    def _common_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch  # [B, W, F], [B, H * T] (scaled, step-major)
        pred = self(x)
        loss = (self._elementwise_loss(pred, y) * self.loss_weights).mean()
        if stage == "train" and not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at epoch {self.current_epoch}, step {self.global_step}; "
                "lower the learning rate or set trainer.gradient_clip_val"
            )
        n_t = len(self.hparams.target_names)  # metrics pooled over the horizon's steps: [B * H, T]
        # the test (and validate command's) metrics judge the forecast as shipped: mixed with ridge where a blend was
        # fitted (on_test_start; never during fit, where validation judges the network); the loss stays the network's
        raw = self.forecast(x) if stage != "train" and self.blend is not None else self.unscale(pred.detach(), x)
        self.metrics[f"{stage}_metrics"].update(raw.reshape(-1, n_t), self.unscale(y, x).reshape(-1, n_t))
        # val/test losses are averaged over ranks under DDP: checkpointing and early stopping must agree on them
        self.log(f"{stage}_loss", loss, on_step=stage == "train", on_epoch=True, prog_bar=True, batch_size=len(x),
                 sync_dist=stage != "train")  # fmt: skip
        return loss

    def _elementwise_loss(self, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.loss_name == "huber":
            return F.huber_loss(pred, y, reduction="none", delta=self.huber_delta)  # [B, T]
        if self.loss_name == "l1":
            return (pred - y).abs()
        return (pred - y) ** 2

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._common_step(batch, "train")

    def on_train_start(self) -> None:
        self.metrics["val_metrics"].reset()  # the sanity check's batches must not leak into epoch 0

    def on_train_epoch_end(self) -> None:
        self._log_metrics("train")

    def validation_step(self, batch, batch_idx: int) -> None:
        loss = self._common_step(batch, "val")
        self.val_loss_mean.update(loss, weight=len(batch[0]))

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")
        val_loss = self.val_loss_mean.compute()  # synced across ranks
        self.val_loss_mean.reset()
        if self.scheduler is not None and not self.trainer.sanity_checking:
            if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                self.scheduler.step(float(val_loss))
            else:
                self.scheduler.step()

    def test_step(self, batch, batch_idx: int) -> None:
        self._common_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, list | tuple) else batch
        out = self.forecast(x)  # raw units [B, H, T]
        return out[:, 0] if self.horizon == 1 else out

    def _log_metrics(self, stage: str) -> None:
        per_target = self.metrics[f"{stage}_metrics"].compute()  # syncs across ranks under DDP
        self.metrics[f"{stage}_metrics"].reset()
        flat = {f"{stage}/{t}/{k}": v for t, m in per_target.items() for k, v in m.items()}
        flat.update({f"{stage}/mean/{k.removeprefix('average_')}": v for k, v in summarize(per_target).items()
                     if k.startswith("average_")})  # fmt: skip
        flat = {k: float(v) for k, v in flat.items() if not (isinstance(v, float) and math.isnan(v))}
        self.log_dict(flat, rank_zero_only=True)  # already global (torchmetrics synced them): no second reduction

    # -- optimisation --------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        """The optimizer goes to Lightning; the scheduler is stepped here, at the end of every validation epoch.

        Why not Lightning's scheduler loop: it steps epoch schedulers *after* the epoch's last checkpoint is written,
        and skips ReduceLROnPlateau on the epoch it resumes from, so a resumed run's learning-rate schedule would
        drift from an uninterrupted run's. Stepping in on_validation_epoch_end puts the step inside the checkpoint.
        """
        optimizer = self.optimizer_factory(self.param_groups())
        if self.scheduler_factory is None:
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=5)
        else:
            self.scheduler = self.scheduler_factory(optimizer)
        if self._scheduler_state is not None:
            self.scheduler.load_state_dict(self._scheduler_state)
        return optimizer

    def param_groups(self) -> list[dict]:
        """The parameters for the optimizer: the linear skip in a group of its own without weight decay (ridge's
        alpha already regularised it; decay would pull it from ridge's solution towards zero), the rest as
        configured."""
        if self.net.skip is None:
            return [{"params": list(self.parameters())}]
        skip = list(self.net.skip.parameters())
        rest = [p for p in self.parameters() if all(p is not q for q in skip)]
        if not self.net.skip.weight.requires_grad:  # skip_frozen
            return [{"params": rest}]
        return [{"params": rest}, {"params": skip, "weight_decay": 0.0}]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.scheduler is not None:
            checkpoint["dwcp_lr_scheduler"] = self.scheduler.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._scheduler_state = checkpoint.get("dwcp_lr_scheduler")  # applied when configure_optimizers runs

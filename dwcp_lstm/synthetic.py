"""Synthetic DWCP link telemetry whose accuracy ceiling is known (numpy/pandas/scipy only, no torch).

Data card, ``dynamic`` profile (the default)
--------------------------------------------
A *link* is a ``node_id -> peer_id`` pair with a fixed region, az, link_type, network_tier and transport_type.
Every link is a regular series over the same date range: ``samples`` rows are spread over
``links = round(samples / 3000)`` links (at least one) of 3000 rows at a 5-minute cadence by default, i.e.
2025-11-03T00:00Z to about 2025-11-13T10:00Z. More rows mean more links, never a longer range.

Per link, ``link_type`` fixes the capacity ``C`` (Mbit/s), base RTT ``R0`` (ms), mean utilisation, loss floor, jitter
floor and maximum queueing delay; each link draws its own values within +-10 % of its type's.

At each step ``k`` the latent state is:

* utilisation ``rho_k = u0 * diurnal(hour) * weekly(dow) * exp(z_k) + e_k``, clipped to [0.05, 1.25], where ``z`` is
  an AR(1) load fluctuation (phi 0.9, innovation sd 0.07) and ``e`` a congestion episode: onsets arrive at random
  (about one per 12 h), each kick builds up through a second-order filter over ~5 steps and decays over ~10;
* queue occupancy ``h_k = rho^4 / (rho^4 + 0.9^4)``, queueing delay ``d_k = Dmax * h_k`` (ms),
  queue_depth ``q_k = d_k * C / 12`` packets (1500-byte packets);
* loss intensity ``l_k = l0 + 0.09 * h_k^3`` (queue overflow), carried throughput
  ``g_k = min(rho_k, 1) * C * (1 - l_k)``, path RTT ``r_k = R0 + d_k``,
  jitter ``j_k = J0 + 0.25 d_k + 0.6 |d_k - d_{k-1}|``;
* the sender's congestion window (per stream, 8 DWCP streams) is the bandwidth-delay product ``g_k * r_k / (8 * 12000)``
  and retransmits (packets/s) are ``l_k * g_k / 12000``; both are integer counters.

The causal chain: what is measured over the interval that ends at row ``k + 1`` is set by the state at row ``k``:
``throughput_{k+1} = g_k`` (= cwnd_k * streams / RTT_k), ``rtt_{k+1} = r_k`` (queueing delay),
``packet_loss_{k+1} = l_k`` (overflow), ``jitter_{k+1} = j_k``, each times ``(1 + noise * N(0, 1))`` measurement
noise (``noise`` = 0.02 by default). So queue_depth, congestion_window and retransmits at row ``k`` lead the targets.

The **oracle** forecast of row ``k + 1`` given the full latent state at row ``k`` is exactly ``(g_k, r_k, l_k, j_k)``:
the noise has mean one and is independent of the past. It is the accuracy ceiling the evaluation reports; the measured
figures are in the README's data card (``python -m dwcp_lstm generate --card``).

The **h-step oracle** (``oracle_steps`` > 1, for multi-step forecasts) at row ``k`` forecasts row ``k + h``:
``E[state_{k+h-1} | latent state at row k]``, the latent state being ``z_k``, the episode filter's two states and
``d_k`` (jitter reads ``|d - d_prev|``); the calendar of the future rows is known. No closed form exists (the clip,
``rho^4`` and the episode kicks), so it is a seeded Monte Carlo of the generator's own forward dynamics
(:func:`_utilisation` and :func:`_observe` are the generator's), see :func:`_mc_oracle`. The loss clip to
[0, 0.999] is ignored, as for step 1: at ``noise`` <= 0.1 it needs a draw beyond 9 sd to bind.

``seed`` profile
----------------
The earlier attempt's data model, rebuilt from its description: one series, one row per minute, throughput
``clip((500 + 200 sin(2 pi h / 24)) * 1.5[09-17h] * 0.7[weekend] + N(0, 50), 10, 1000)``,
``rtt = clip(50 - (tp - 500) / 20 + N(0, 5), 5, 150)``, ``jitter = clip(0.1 rtt + Exp(2), 0.1, 20)``,
``loss = clip(0.05 (1000 - tp) / 1000 + Exp(0.001), 0, 0.1)``, categorical and counter columns drawn at random per
row. Its oracle is the conditional mean given the next row's hour and weekday (the only state), computed exactly for
throughput and by a fixed-seed Monte-Carlo of 200,000 draws per (hour, weekday/weekend) for the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.signal import lfilter
from scipy.special import ndtr

from dwcp_lstm.tables import write_frame  # noqa: F401 (re-exported: synthetic.write_frame is the public name)

COLUMNS = [
    "timestamp", "region", "az", "link_type", "node_id", "peer_id", "rtt_ms", "jitter_ms", "throughput_mbps",
    "bytes_tx", "bytes_rx", "packet_loss", "retransmits", "congestion_window", "queue_depth", "dwcp_mode",
    "network_tier", "transport_type", "time_of_day", "day_of_week", "bandwidth_mbps", "latency_ms",
]  # fmt: skip
TARGETS = ["throughput_mbps", "rtt_ms", "packet_loss", "jitter_ms"]
LINK_COLUMNS = ["node_id", "peer_id"]
PROFILES = ("dynamic", "seed")
DEFAULT_START = pd.Timestamp("2025-11-03T00:00:00Z")
ROWS_PER_LINK = 3000
DYNAMIC_CADENCE_S = 300
SEED_CADENCE_S = 60
STREAMS = 8  # parallel DWCP streams per link; cwnd is reported per stream
PACKET_BITS = 12_000  # 1500-byte packets
# The dynamic profile's latent dynamics, shared by the generator and the oracle's Monte Carlo.
Z_PHI, Z_SD = 0.9, 0.07  # AR(1) load fluctuation z
KICK_RATE, KICK_LOW, KICK_HIGH = 1 / 144, 0.15, 0.4  # episode onsets: about one per 12 h, size U(0.15, 0.4)
BUILD_POLE, EPISODE_GAIN, EPISODE_POLE = 0.8, 0.2, 0.85  # build_k = 0.8 build + kick; e_k = 0.85 e + 0.2 build_k
RHO_MIN, RHO_MAX = 0.05, 1.25
# Monte-Carlo paths per row of the h-step oracle (antithetic pairs in z). Its error adds at most 1/ORACLE_DRAWS of the
# forecast's own conditional variance to the oracle's MSE (measured: <= 0.06 %), see _mc_oracle.
ORACLE_DRAWS = 1000
_MC_BLOCK = 1 << 14  # (rows x draws) elements per block of the Monte Carlo: stays in cache


@dataclass(frozen=True)
class LinkType:
    """Physical parameters of one class of WAN link (each link draws its own within +-10 %)."""

    name: str
    capacity_mbps: float
    base_rtt_ms: float
    utilisation: float
    loss_floor: float
    jitter_floor_ms: float
    max_queue_delay_ms: float
    network_tier: str
    transport_type: str


LINK_TYPES = (
    LinkType("metro", 1000.0, 27.0, 0.64, 0.016, 3.4, 14.0, "premium", "rdma"),
    LinkType("regional", 800.0, 36.0, 0.68, 0.018, 4.0, 16.0, "standard", "tcp"),
    LinkType("backbone", 1150.0, 42.0, 0.62, 0.014, 3.6, 14.0, "premium", "tcp"),
    LinkType("cross_region", 700.0, 51.0, 0.70, 0.020, 4.4, 18.0, "standard", "quic"),
    LinkType("internet", 550.0, 58.0, 0.72, 0.022, 4.8, 20.0, "economy", "quic"),
)
REGIONS = ("us-east-1", "us-west-2", "eu-west-1", "eu-central-1", "ap-southeast-1")


MAX_SAMPLES = 50_000_000  # 10 GB as a DataFrame; docs/scaling_out.md trains on 10M rows


def generate(
    samples: int = 15_000,
    seed: int = 42,
    profile: str = "dynamic",
    links: int | None = None,
    noise: float = 0.02,
    start: pd.Timestamp = DEFAULT_START,
) -> pd.DataFrame:
    """Generate telemetry with the 22 columns of :data:`COLUMNS`, sorted by link then time.

    Args:
        samples: total rows over all links.
        seed: seed of the only random generator used; the same arguments give the same frame.
        profile: ``dynamic`` (links with a causal chain, the default) or ``seed`` (the earlier attempt's model).
        links: number of links for ``dynamic``; by default ``round(samples / 3000)``, at least 1.
        noise: relative sd of the targets' measurement noise for ``dynamic``.
        start: first timestamp (UTC), fixed by default so that nothing depends on the clock.
    """
    return generate_with_oracle(samples, seed, profile, links, noise, start)[0]


def link_count(samples: int, links: int | None) -> int:
    """Links of the dynamic profile: ``links``, or one per :data:`ROWS_PER_LINK` rows."""
    return links if links is not None else max(1, round(samples / ROWS_PER_LINK))


def generate_with_oracle(
    samples: int = 15_000,
    seed: int = 42,
    profile: str = "dynamic",
    links: int | None = None,
    noise: float = 0.02,
    start: pd.Timestamp = DEFAULT_START,
    oracle_steps: int = 1,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Like :func:`generate`, plus the oracle frame: per row, the Bayes-optimal forecast of the next rows' targets.

    The oracle frame has ``node_id, peer_id, timestamp`` (of the row whose state it uses) and ``oracle_<target>``, the
    exact forecast of the next row; with ``oracle_steps`` = K > 1 also ``oracle_<target>_h<k>`` for k = 2..K, the
    forecast of row + k (exact for ``seed``, a seeded Monte Carlo for ``dynamic``, see the module docstring). A row
    whose row + k lies beyond its link's end is NaN. The data frame is the same for every ``oracle_steps``: the
    Monte Carlo has its own generator, seeded by ``[seed, 1]``.
    """
    if not 2 <= samples <= MAX_SAMPLES:  # beyond, the frame alone outgrows a machine's memory (~200 bytes a row)
        raise ValueError(f"--samples must be from 2 to {MAX_SAMPLES:,}, got {samples:,}")
    if profile not in PROFILES:
        raise ValueError(f"--profile must be one of {', '.join(PROFILES)}, got {profile!r}")
    if noise < 0:
        raise ValueError(f"--noise must be >= 0, got {noise}")
    if isinstance(oracle_steps, bool) or not isinstance(oracle_steps, int | np.integer) or oracle_steps < 1:
        raise ValueError(f"--oracle-steps must be an integer >= 1, got {oracle_steps!r}")
    rng = np.random.default_rng(seed)
    if profile == "seed":
        if links not in (None, 1):  # it would be ignored: the earlier attempt's data is one series
            raise ValueError(f"--links: the seed profile writes one link, got {links}")
        return _seed_profile(samples, rng, start, int(oracle_steps))
    n_links = link_count(samples, links)
    if not 1 <= n_links <= samples // 2:
        raise ValueError(f"--links must be between 1 and samples / 2 = {samples // 2}, got {n_links}")
    mc = np.random.default_rng([seed, 1])  # the oracle's own stream: the data's draws never depend on oracle_steps
    return _dynamic_profile(samples, n_links, rng, noise, start, int(oracle_steps), mc)


def oracle_columns(targets: list[str] | tuple[str, ...], steps: int) -> list[str]:
    """The sidecar's forecast columns for steps 1..``steps``: ``oracle_<t>`` (step 1), then ``oracle_<t>_h<k>``."""
    return [f"oracle_{t}" if k == 1 else f"oracle_{t}_h{k}" for k in range(1, steps + 1) for t in targets]


def _calendar(ts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unix seconds -> (fractional hour, integer hour, weekday with 0 = Monday)."""
    day_s = ts % 86_400
    dow = ((ts // 86_400) + 3) % 7  # 1970-01-01 was a Thursday
    return day_s / 3600.0, (day_s // 3600).astype(np.int64), dow.astype(np.int64)


@dataclass(frozen=True)
class _Links:
    """The dynamic profile's per-link constants, each [L, 1] so that they broadcast over time (or draws)."""

    cap: np.ndarray  # capacity, Mbit/s
    rtt0: np.ndarray  # base RTT, ms
    u0: np.ndarray  # mean utilisation
    loss0: np.ndarray  # loss floor
    jit0: np.ndarray  # jitter floor, ms
    dmax: np.ndarray  # maximum queueing delay, ms

    def take(self, idx: np.ndarray | slice) -> _Links:
        """The constants of the links (or rows) ``idx``, still [n, 1]."""
        return _Links(self.cap[idx], self.rtt0[idx], self.u0[idx], self.loss0[idx], self.jit0[idx], self.dmax[idx])


@dataclass(frozen=True)
class _Observed:
    """What the latent utilisation sets at one step: the queueing delay and the four target means."""

    delay: np.ndarray
    loss: np.ndarray
    carried: np.ndarray
    rtt: np.ndarray
    jitter: np.ndarray

    @property
    def state(self) -> np.ndarray:
        """[..., 4] in TARGETS order: the mean of the next row's measurement."""
        return np.stack([self.carried, self.rtt, self.loss, self.jitter], axis=-1)


def _utilisation(
    links: _Links, diurnal: np.ndarray, weekly: np.ndarray, z: np.ndarray, episode: np.ndarray
) -> np.ndarray:
    """rho from the calendar, the load fluctuation z and the congestion episode (the generator's exact arithmetic)."""
    return np.clip(links.u0 * diurnal * weekly * np.exp(z) + episode, RHO_MIN, RHO_MAX)


def _observe(rho: np.ndarray, links: _Links, prev_delay: np.ndarray | None = None) -> _Observed:
    """The queue and the targets' means from rho. Jitter needs the previous step's delay: ``prev_delay``, or, when
    None, the previous element along the last (time) axis, the first element being its own predecessor."""
    r4 = rho**4
    h = r4 / (r4 + 0.9**4)  # queue occupancy in [0, 1)
    delay = links.dmax * h  # queueing delay, ms
    loss = links.loss0 + 0.09 * h**3  # overflow loss rate
    carried = np.minimum(rho, 1.0) * links.cap * (1.0 - loss)  # Mbit/s that get through
    rtt = links.rtt0 + delay
    if prev_delay is None:
        d_delay = np.abs(np.diff(delay, axis=-1, prepend=delay[..., :1]))
    else:
        d_delay = np.abs(delay - prev_delay)
    jitter = links.jit0 + 0.25 * delay + 0.6 * d_delay
    return _Observed(delay, loss, carried, rtt, jitter)


def _dynamic_profile(
    samples: int,
    n_links: int,
    rng: np.random.Generator,
    noise: float,
    start: pd.Timestamp,
    oracle_steps: int,
    mc: np.random.Generator,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows = np.full(n_links, samples // n_links)
    rows[: samples % n_links] += 1  # links are at most one row apart in length
    steps = int(rows.max())
    burn = 200  # lets the AR and episode filters forget their zero start
    total = steps + burn + 1  # +1: the state at row k - 1 sets the measurement at row k

    # Per-link constants: [L, 1] so they broadcast over time.
    types = [LINK_TYPES[i % len(LINK_TYPES)] for i in range(n_links)]

    def per_link(attr: str) -> np.ndarray:
        base = np.array([getattr(t, attr) for t in types])
        return (base * rng.uniform(0.9, 1.1, n_links))[:, None]

    cap, rtt0, u0 = per_link("capacity_mbps"), per_link("base_rtt_ms"), per_link("utilisation")
    loss0, jit0, dmax = per_link("loss_floor"), per_link("jitter_floor_ms"), per_link("max_queue_delay_ms")
    links = _Links(cap, rtt0, u0, loss0, jit0, dmax)

    ts = int(start.timestamp()) + DYNAMIC_CADENCE_S * np.arange(-burn - 1, steps, dtype=np.int64)  # [T]
    hour_f, hour, dow = _calendar(ts)
    diurnal = 1.0 + 0.28 * np.sin(2 * np.pi * (hour_f - 8.0) / 24.0)  # peak 14:00, trough 02:00
    weekly = np.where(dow >= 5, 0.78, 1.0)

    z = lfilter([1.0], [1.0, -Z_PHI], Z_SD * rng.standard_normal((n_links, total)), axis=1)  # [L, T]
    kicks = (rng.random((n_links, total)) < KICK_RATE) * rng.uniform(KICK_LOW, KICK_HIGH, (n_links, total))
    build = lfilter([1.0], [1.0, -BUILD_POLE], kicks, axis=1)
    episode = lfilter([EPISODE_GAIN], [1.0, -EPISODE_POLE], build, axis=1)
    rho = _utilisation(links, diurnal, weekly, z, episode)
    obs = _observe(rho, links)
    delay, loss, carried, rtt = obs.delay, obs.loss, obs.carried, obs.rtt
    state = obs.state  # [L, T, 4] oracle for the next row

    measured = state[:, :-1] * (1.0 + noise * rng.standard_normal((n_links, total - 1, 4)))  # row k <- state k - 1
    measured[..., 2] = np.clip(measured[..., 2], 0.0, 0.999)
    keep = slice(burn, None)  # rows 0..steps-1 of the state; measured row k uses state index k - 1
    state_k, meas_k = state[:, burn + 1 :], measured[:, keep]
    rho_k, delay_k, loss_k, carried_k, rtt_k = (a[:, burn + 1 :] for a in (rho, delay, loss, carried, rtt))

    cwnd = np.rint(carried_k * 1e6 * rtt_k / 1e3 / (STREAMS * PACKET_BITS)).astype(np.int64)
    queue = np.rint(delay_k * cap * 1e3 / PACKET_BITS).astype(np.int64)
    retrans = np.rint(loss_k * carried_k * 1e6 / PACKET_BITS).astype(np.int64)
    tp_meas = meas_k[..., 0]
    bytes_tx = np.rint(tp_meas * 1e6 / 8 * DYNAMIC_CADENCE_S).astype(np.int64)
    bytes_rx = np.rint(bytes_tx * (0.02 + 0.005 * rng.random(tp_meas.shape))).astype(np.int64)  # ACK stream
    mode = np.where(rho_k < 0.5, "bulk", np.where(rho_k < 0.9, "balanced", "latency"))

    mask = np.arange(steps)[None, :] < rows[:, None]  # ragged links: drop the padding tail
    t_k = np.broadcast_to(ts[burn + 1 :], (n_links, steps))
    _, hour_k, dow_k = _calendar(t_k)
    link_idx = np.broadcast_to(np.arange(n_links)[:, None], (n_links, steps))
    region_i = link_idx % len(REGIONS)
    peer_i = (link_idx + 1 + link_idx // len(REGIONS)) % max(n_links, 2)
    width = len(str(n_links))

    def cat(values: list[str], idx: np.ndarray) -> pd.Categorical:
        return pd.Categorical.from_codes(idx[mask], categories=values)

    node_names = [f"node-{i:0{width}d}" for i in range(max(n_links, 2))]
    df = pd.DataFrame(
        {
            "timestamp": t_k[mask],
            "region": cat(list(REGIONS), region_i),
            "az": cat([f"{r}{s}" for r in REGIONS for s in "abc"], region_i * 3 + link_idx % 3),
            "link_type": cat([t.name for t in LINK_TYPES], link_idx % len(LINK_TYPES)),
            "node_id": cat(node_names, link_idx),
            "peer_id": cat(node_names, peer_i),
            "rtt_ms": np.round(meas_k[..., 1][mask], 4),
            "jitter_ms": np.round(meas_k[..., 3][mask], 4),
            "throughput_mbps": np.round(tp_meas[mask], 3),
            "bytes_tx": bytes_tx[mask],
            "bytes_rx": bytes_rx[mask],
            "packet_loss": np.round(meas_k[..., 2][mask], 6),
            "retransmits": retrans[mask],
            "congestion_window": cwnd[mask],
            "queue_depth": queue[mask],
            "dwcp_mode": mode[mask],
            "network_tier": cat(sorted({t.network_tier for t in LINK_TYPES}), _type_codes(link_idx, "network_tier")),
            "transport_type": cat(
                sorted({t.transport_type for t in LINK_TYPES}), _type_codes(link_idx, "transport_type")
            ),
            "time_of_day": hour_k[mask],
            "day_of_week": dow_k[mask],
        }
    )
    df["bandwidth_mbps"] = df["throughput_mbps"]
    df["latency_ms"] = df["rtt_ms"]
    oracle = df[["node_id", "peer_id", "timestamp"]].copy()
    nxt = state_k[mask]  # state at row k = forecast of row k + 1
    for i, target in enumerate(TARGETS):
        oracle[f"oracle_{target}"] = nxt[:, i]
    last = np.r_[df["node_id"].to_numpy()[1:] != df["node_id"].to_numpy()[:-1], True]
    oracle.loc[last, [f"oracle_{t}" for t in TARGETS]] = np.nan  # no next row to forecast
    if oracle_steps > 1:
        link_of, row_of = np.nonzero(mask)  # [N] each, in the frame's (link, time) order
        s = burn + 1 + row_of  # state index of each row
        ahead = _mc_oracle(
            links.take(link_of),
            (diurnal, weekly),
            (z[link_of, s], build[link_of, s], episode[link_of, s], delay[link_of, s]),
            s,
            rows[link_of] - 1 - row_of,
            oracle_steps,
            mc,
        )  # [N, K - 1, 4]
        cols = oracle_columns(TARGETS, oracle_steps)[len(TARGETS) :]
        oracle = pd.concat([oracle, pd.DataFrame(ahead.reshape(len(oracle), -1), columns=cols)], axis=1)
    return df[COLUMNS], oracle


def _mc_oracle(
    links: _Links,
    calendar: tuple[np.ndarray, np.ndarray],
    latent: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    start: np.ndarray,
    left: np.ndarray,
    steps: int,
    rng: np.random.Generator,
    draws: int = ORACLE_DRAWS,
) -> np.ndarray:
    """The h-step oracle for h = 2..``steps`` of N rows: the mean over ``draws`` simulated futures [N, steps - 1, 4].

    Args:
        links: each row's link constants [N, 1].
        calendar: the generator's ``diurnal`` and ``weekly`` factors over its whole time axis [T] each.
        latent: each row's ``z, build, episode, delay`` at its state index [N] each.
        start: each row's state index into the time axis [N]; step h needs index ``start + h - 1``.
        left: rows after each row in its link [N]; steps beyond it are NaN.
        steps: the last step K.
        rng: the Monte Carlo's own generator.
        draws: simulated futures per row (rounded down to even: antithetic pairs).

    Every row sees the same ``draws`` innovation paths (common random numbers): the random parts of the dynamics,
    z's innovations and the episode kicks, do not depend on the state, so one set of paths serves all rows, and the
    oracle of neighbouring rows is smooth instead of independently noisy. The z innovations come in antithetic
    pairs (+eps, -eps; each pair shares its kicks), which cancels the error of the part that is linear in them.
    The Monte-Carlo error of each forecast has sd at most sd(state_{k+h-1} | state_k) / sqrt(draws), so it adds at
    most 1/draws of the forecast's own conditional variance to the oracle's MSE. Measured on the default data (two
    Monte-Carlo seeds, 1000 draws, steps 2..12): the error's sd is 0.004 % to 0.5 % of each target's level, 0.2 %
    to 25 % of the measurement noise's sd (the largest for packet_loss at h = 12, whose spread is mostly the
    queue's, not the noise's), and its variance at most 0.06 % of the oracle's MSE: gap closed moves by less than
    0.0006 x MSE_oracle / (MSE_persistence - MSE_oracle), about 0.001 here. 15,000 rows x 12 steps take about 4 s.
    """
    half = draws // 2
    eps = Z_SD * rng.standard_normal((half, steps - 1))
    eps = np.concatenate([eps, -eps])  # [D, K - 1] antithetic
    kicks = (rng.random((half, steps - 1)) < KICK_RATE) * rng.uniform(KICK_LOW, KICK_HIGH, (half, steps - 1))
    kicks = np.concatenate([kicks, kicks])  # [D, K - 1]
    diurnal, weekly = calendar
    n = len(start)
    out = np.full((n, steps - 1, len(TARGETS)), np.nan)
    block = max(1, _MC_BLOCK // len(eps))
    for a in range(0, n, block):
        rows = slice(a, min(n, a + block))
        link = links.take(rows)  # [c, 1]
        z, build, episode, delay = (v[rows, None] for v in latent)  # [c, 1] each, [c, D] after the first step
        horizon = int(min(steps - 1, left[rows].max()))  # steps past every row's end are not simulated
        for j in range(horizon):  # state index start + j + 1 sets the measurement of step h = j + 2
            z = Z_PHI * z + eps[:, j]
            build = BUILD_POLE * build + kicks[:, j]
            episode = EPISODE_POLE * episode + EPISODE_GAIN * build
            t = np.minimum(start[rows] + j + 1, len(diurnal) - 1)[:, None]  # [c, 1]
            obs = _observe(_utilisation(link, diurnal[t], weekly[t], z, episode), link, delay)  # [c, D] each
            delay = obs.delay
            for i, v in enumerate((obs.carried, obs.rtt, obs.loss, obs.jitter)):
                out[rows, j, i] = v.mean(axis=1)
    out[np.arange(2, steps + 1)[None, :] > left[:, None]] = np.nan  # row + h beyond the link's last row
    return out


def _type_codes(link_idx: np.ndarray, attr: str) -> np.ndarray:
    values = sorted({getattr(t, attr) for t in LINK_TYPES})
    per_type = np.array([values.index(getattr(t, attr)) for t in LINK_TYPES])
    return per_type[link_idx % len(LINK_TYPES)]


def _seed_profile(
    samples: int, rng: np.random.Generator, start: pd.Timestamp, oracle_steps: int = 1
) -> tuple[pd.DataFrame, pd.DataFrame]:
    ts = int(start.timestamp()) + SEED_CADENCE_S * np.arange(samples + oracle_steps, dtype=np.int64)  # + the oracle's
    _, hour, dow = _calendar(ts)
    mean_tp = _seed_base(hour, dow)
    n = samples
    tp = np.clip(mean_tp[:n] + rng.normal(0, 50, n), 10, 1000)
    rtt = np.clip(50 - (tp - 500) / 20 + rng.normal(0, 5, n), 5, 150)
    jitter = np.clip(0.1 * rtt + rng.exponential(2.0, n), 0.1, 20)
    loss = np.clip(0.05 * (1000 - tp) / 1000 + rng.exponential(0.001, n), 0, 0.1)
    pick = rng.integers
    df = pd.DataFrame(
        {
            "timestamp": ts[:n],
            "region": np.array(REGIONS)[pick(0, len(REGIONS), n)],
            "az": np.array(["a", "b", "c"])[pick(0, 3, n)],
            "link_type": np.array([t.name for t in LINK_TYPES])[pick(0, len(LINK_TYPES), n)],
            "node_id": "node-01",
            "peer_id": "node-02",
            "rtt_ms": np.round(rtt, 4),
            "jitter_ms": np.round(jitter, 4),
            "throughput_mbps": np.round(tp, 3),
            "bytes_tx": pick(1_000_000, 1_000_000_000, n),
            "bytes_rx": pick(1_000_000, 1_000_000_000, n),
            "packet_loss": np.round(loss, 6),
            "retransmits": pick(0, 100, n),
            "congestion_window": pick(10, 1000, n),
            "queue_depth": pick(0, 100, n),
            "dwcp_mode": np.array(["bulk", "balanced", "latency"])[pick(0, 3, n)],
            "network_tier": np.array(["premium", "standard", "economy"])[pick(0, 3, n)],
            "transport_type": np.array(["tcp", "quic", "rdma"])[pick(0, 3, n)],
            "time_of_day": hour[:n],
            "day_of_week": dow[:n],
        }
    )
    df["region"] = df["region"].astype(str)
    df["az"] = df["region"] + df["az"]
    df["bandwidth_mbps"] = df["throughput_mbps"]
    df["latency_ms"] = df["rtt_ms"]
    oracle = df[["node_id", "peer_id", "timestamp"]].copy()
    expected = _seed_conditional_means()  # [24, 2, 4]: hour x weekend x target
    weekend = (dow >= 5).astype(int)
    cols = oracle_columns(TARGETS, oracle_steps)
    for k in range(1, oracle_steps + 1):  # the calendar is the only state: row + k's mean is exact at every step
        nxt = expected[hour[k : k + n], weekend[k : k + n]]  # [n, 4]
        step = cols[(k - 1) * len(TARGETS) : k * len(TARGETS)]
        oracle[step] = nxt
        oracle.loc[max(0, n - k) :, step] = np.nan  # row + k beyond the series
    return df[COLUMNS], oracle


def _seed_base(hour: np.ndarray, dow: np.ndarray) -> np.ndarray:
    business = np.where((hour >= 9) & (hour < 17), 1.5, 1.0)
    weekend = np.where(dow >= 5, 0.7, 1.0)
    return (500 + 200 * np.sin(2 * np.pi * hour / 24)) * business * weekend


def _seed_conditional_means(draws: int = 200_000) -> np.ndarray:
    """E[targets | hour, weekend] of the seed model: throughput exactly, the rest by a fixed-seed Monte-Carlo."""
    out = np.empty((24, 2, 4))
    mc = np.random.default_rng(20251103)  # fixed: the oracle must not depend on the data seed
    for hour in range(24):
        for weekend in (0, 1):
            mu = float(_seed_base(np.array([hour]), np.array([5 if weekend else 0]))[0])
            a, b = (10 - mu) / 50, (1000 - mu) / 50
            pdf = np.exp(-0.5 * np.array([a, b]) ** 2) / np.sqrt(2 * np.pi)
            # Mean of a normal clipped to [10, 1000] (point masses at both ends plus the truncated middle).
            tp_mean = 10 * ndtr(a) + 1000 * (1 - ndtr(b)) + mu * (ndtr(b) - ndtr(a)) + 50 * (pdf[0] - pdf[1])
            tp = np.clip(mu + mc.normal(0, 50, draws), 10, 1000)
            rtt = np.clip(50 - (tp - 500) / 20 + mc.normal(0, 5, draws), 5, 150)
            jitter = np.clip(0.1 * rtt + mc.exponential(2.0, draws), 0.1, 20)
            loss = np.clip(0.05 * (1000 - tp) / 1000 + mc.exponential(0.001, draws), 0, 0.1)
            out[hour, weekend] = [tp_mean, rtt.mean(), loss.mean(), jitter.mean()]
    return out


def ceiling(df: pd.DataFrame, oracle: pd.DataFrame, tail: float = 0.15) -> dict[str, dict]:
    """Oracle and persistence on the last ``tail`` of each link: per-target Pearson correlation and MAPE (%), and
    their means. This is the data card's measure of how hard a dataset is."""
    ys, os_, ps = [], [], []
    for _, g in df.groupby(LINK_COLUMNS, observed=True, sort=False):
        n = len(g)
        idx = np.arange(max(1, n - int(round(tail * n))), n)
        values = g[TARGETS].to_numpy(np.float64)
        ys.append(values[idx])
        ps.append(values[idx - 1])  # persistence: the previous row
        os_.append(oracle.loc[g.index, [f"oracle_{t}" for t in TARGETS]].to_numpy(np.float64)[idx - 1])
    y = np.concatenate(ys)
    out = {}
    for name, p in (("oracle", np.concatenate(os_)), ("persistence", np.concatenate(ps))):
        corr = [float(np.corrcoef(y[:, j], p[:, j])[0, 1]) for j in range(len(TARGETS))]
        keep = y != 0
        mape = [float(100 * np.mean(np.abs(y[keep[:, j], j] - p[keep[:, j], j]) / np.abs(y[keep[:, j], j])))
                for j in range(len(TARGETS))]  # fmt: skip
        out[name] = {
            "correlation": dict(zip(TARGETS, corr, strict=True)),
            "mape": dict(zip(TARGETS, mape, strict=True)),
            "mean_correlation": float(np.mean(corr)),
            "mean_mape": float(np.mean(mape)),
            "mse": dict(zip(TARGETS, map(float, ((p - y) ** 2).mean(axis=0)), strict=True)),
        }
    return out


def card_markdown(samples: int = 15_000, seed: int = 42) -> str:
    """The data card's table: oracle vs persistence for both profiles at the default size and seed."""
    lines = [
        f"Last 15 % of each link, {samples} rows, seed {seed} (`python -m dwcp_lstm generate --card`):",
        "",
        "| profile | forecast | " + " | ".join(f"{t} corr / MAPE %" for t in TARGETS) + " | mean corr | mean MAPE % |",
        "|---" * (len(TARGETS) + 4) + "|",
    ]
    for profile in PROFILES:
        c = ceiling(*generate_with_oracle(samples, seed, profile))
        for name in ("oracle", "persistence"):
            m = c[name]
            cells = " | ".join(f"{m['correlation'][t]:.4f} / {m['mape'][t]:.2f}" for t in TARGETS)
            lines.append(f"| {profile} | {name} | {cells} | {m['mean_correlation']:.4f} | {m['mean_mape']:.2f} |")
    return "\n".join(lines)


def oracle_path(data_path: str | Path) -> Path:
    """Where the oracle sidecar of a generated file lives: ``x.csv`` -> ``x.oracle.csv``."""
    p = Path(data_path)
    return p.with_name(f"{p.stem}.oracle{p.suffix}")


DATA_HASH_COLUMN = "data_sha256"  # the sidecar's first row: the sha256 of the data file it belongs to


def write_oracle(oracle: pd.DataFrame, data_path: str | Path) -> Path:
    """Write the oracle sidecar of the data file ``data_path`` (written already), bound to that file's bytes: its
    sha256 in column :data:`DATA_HASH_COLUMN` of the first row (the others empty: a constant column added 65 bytes
    a row to a CSV). Its rows are joined by link and time only, and other data of the same size has the same keys:
    a file replaced by ``cp`` kept its old sidecar, and the report's oracle and gap closed were another seed's."""
    from dwcp_lstm.tables import sha256_of

    stamp = pd.Series([sha256_of(data_path)] + [None] * (len(oracle) - 1), index=oracle.index, dtype=object)
    path = oracle_path(data_path)
    write_frame(oracle.assign(**{DATA_HASH_COLUMN: stamp}), path)
    return path

"""Split conformal intervals: finite-sample ranks, coverage on exchangeable data, the adaptive scale, the mean over k
steps, the Winkler score, and the refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dwcp_lstm.errors import ConfigError, DataError
from dwcp_lstm.intervals import (
    QR_MAX_INPUTS,
    SCALES,
    calibrate,
    check_levels,
    choose,
    earlier_half,
    interval_scores,
    intervals,
    quantile_regression,
    recorded_scale,
    scale_kinds,
    windows_needed,
)

LEVELS = (0.8, 0.95)


def heteroscedastic(n: int, seed: int, h: int = 1):
    """Windows whose noise sd equals the sd of their own one-step changes: the adaptive scale is the right one."""
    rng = np.random.default_rng(seed)
    sd = rng.uniform(0.2, 5.0, size=(n, 1, 2))  # [n, 1, T]
    hist = np.cumsum(rng.normal(size=(n, 40, 2)) * sd, axis=1)  # changes with sd `sd`
    pred = rng.normal(size=(n, h, 2))
    y = pred + rng.normal(size=(n, h, 2)) * sd
    return pred, y, hist


def test_coverage_holds_on_new_exchangeable_windows_for_both_scales():
    pred, y, hist = heteroscedastic(4000, 1)
    tp, ty, th = heteroscedastic(40000, 2)
    widths = {}
    for adaptive in (False, True):
        cal = calibrate(pred, y, hist, LEVELS, adaptive)
        b = intervals(cal, tp, th)
        s = interval_scores(b["lower"], b["upper"], ty, LEVELS)
        for i, level in enumerate(LEVELS):
            assert s["coverage"][i].mean() == pytest.approx(level, abs=0.015), (adaptive, level)
        widths[adaptive] = s["width"].mean()
    assert widths[True] < 0.9 * widths[False]  # the adaptive scale narrows intervals at the same coverage
    cal, scores = choose(pred, y, hist, LEVELS)
    assert cal.adaptive.all() and all(a < p for a, p in zip(scores["adaptive"], scores["plain"], strict=True))


def set_by_another_target(n: int, seed: int):
    """Target 0's noise sd is a tenth of target 1's level in the window; target 0's own window says nothing about
    it (a random walk of sd 1 everywhere): neither plain nor the window's own volatility can follow it."""
    rng = np.random.default_rng(seed)
    level = rng.uniform(1.0, 20.0, size=n)
    hist = np.stack([np.cumsum(rng.normal(size=(n, 20)), axis=1),
                     level[:, None] + rng.normal(0, 0.05, size=(n, 20))], axis=2)  # fmt: skip
    pred = rng.normal(size=(n, 1, 2))
    y = pred + rng.normal(size=(n, 1, 2)) * np.stack([0.1 * level, np.ones(n)], axis=1)[:, None]
    return pred, y, hist


def test_the_fitted_scale_follows_a_spread_set_by_another_targets_level():
    pred, y, hist = set_by_another_target(4000, 11)
    tp, ty, th = set_by_another_target(40000, 12)
    widths = {}
    for name in SCALES:
        cal = calibrate(pred, y, hist, LEVELS, name == "adaptive", fitted=name == "fitted")
        b = intervals(cal, tp, th)
        s = interval_scores(b["lower"], b["upper"], ty, LEVELS)
        for i, level in enumerate(LEVELS):  # split conformal's coverage holds whatever the scale
            assert s["coverage"][i, 0, 0] == pytest.approx(level, abs=0.015), (name, level)
        widths[name] = s["width"][:, 0, 0].mean()
    assert widths["fitted"] < 0.9 * min(widths["plain"], widths["adaptive"])
    coef = calibrate(pred, y, hist, LEVELS, False, fitted=True).spread[:, 0]  # [1, log vol, log |mean|, log |last|]
    # sd proportional to target 1's level: an exponent near 1 on it (a little less: the log is of |residual| plus a
    # floor), near 0 on target 0's own volatility
    assert 0.75 < coef[4] + coef[6] < 1.1 and abs(coef[1]) < 0.1
    cal, scores = choose(pred, y, hist, LEVELS)
    assert cal.fitted[0] and scores["fitted"][0] < min(scores["plain"][0], scores["adaptive"][0])


def set_by_the_forecast(n: int, seed: int, h: int = 2):
    """Residuals whose spread and skew grow with where the forecast says the target goes, as a queue's loss does
    under load (docs/method.md, "The quantile scale"): noise proportional to the forecast, plus a tail upwards that
    only loaded windows have. The windows' own history says nothing about it."""
    rng = np.random.default_rng(seed)
    pred = rng.uniform(0.1, 2.0, size=(n, h, 2))
    tail = rng.exponential(1.0, size=pred.shape) * np.maximum(pred - 1.0, 0.0) ** 2
    y = pred + 0.1 * pred * rng.standard_normal(pred.shape) + tail
    return pred, y, rng.normal(size=(n, 20, 2))


def test_quantile_regression_matches_scikit_learns_linear_program():
    """The vectorised IRLS against scikit-learn's exact solver, on skewed heteroscedastic data: the same pinball
    loss to 0.1 %, for several problems solved at once."""
    from sklearn.linear_model import QuantileRegressor

    rng = np.random.default_rng(5)
    x = np.concatenate([np.ones((3, 800, 1)), rng.normal(size=(3, 800, 3))], axis=2)
    y = x[..., 1] + rng.exponential(1.0, size=(3, 800)) * (1 + np.abs(x[..., 2]))
    taus = np.array([0.1, 0.5, 0.9])
    beta = quantile_regression(x, y, taus)
    for c, tau in enumerate(taus):
        exact = QuantileRegressor(quantile=tau, alpha=0.0, fit_intercept=False, solver="highs").fit(x[c], y[c])

        def loss(b, c=c, tau=tau):
            r = y[c] - x[c] @ b
            return np.mean(np.maximum(tau * r, (tau - 1) * r))

        assert loss(beta[c]) == pytest.approx(loss(exact.coef_), rel=1e-3)


def test_the_quantile_scale_of_exact_or_constant_residuals_is_finite():
    """A forecast that is exactly right on every calibration window (or off by a constant) left IRLS dividing by
    |residual| = 0: overflow, then NaN bounds. Now finite, and the bounds hold the residual."""
    rng = np.random.default_rng(41)
    pred, hist = rng.uniform(0, 1, (200, 2, 2)), rng.uniform(0, 1, (200, 5, 2))
    with np.errstate(all="raise"):
        for y in (pred.copy(), pred + 0.5):
            b = intervals(calibrate(pred, y, hist, LEVELS, False, quantile=True), pred, hist)
            for name in ("lower", "upper"):
                np.testing.assert_allclose(b[name], np.broadcast_to(y[:, None], b[name].shape), atol=1e-6)


def test_the_quantile_scale_follows_a_spread_and_skew_set_by_the_forecast():
    """Coverage holds on new windows at both levels, and also among the calm and the loaded windows separately
    (one scale for all cannot: it over-covers the calm ones and under-covers the loaded); the intervals are the
    narrowest, and the chronological check picks the quantile scale."""
    pred, y, hist = set_by_the_forecast(4000, 21)
    tp, ty, th = set_by_the_forecast(40000, 22)
    loaded = tp[:, :, 0] > 1.0  # [N, H]
    widths, calm_cov = {}, {}
    for name in SCALES:
        cal = calibrate(pred, y, hist, LEVELS, name == "adaptive", fitted=name == "fitted", quantile=name == "quantile")
        b = intervals(cal, tp, th)
        s = interval_scores(b["lower"], b["upper"], ty, LEVELS)
        for i, level in enumerate(LEVELS):
            assert s["coverage"][i].mean() == pytest.approx(level, abs=0.015), (name, level)
        inside = (ty[:, None] >= b["lower"]) & (ty[:, None] <= b["upper"])  # [N, L, H, T]
        calm_cov[name] = [inside[:, 0, :, 0][~loaded].mean(), inside[:, 0, :, 0][loaded].mean()]
        widths[name] = s["width"].mean()
    assert calm_cov["plain"][0] > 0.9 and calm_cov["plain"][1] < 0.7  # what the quantile scale is for
    assert calm_cov["quantile"] == pytest.approx([0.8, 0.8], abs=0.03)
    assert widths["quantile"] < 0.9 * min(w for k, w in widths.items() if k != "quantile")
    cal, scores = choose(pred, y, hist, LEVELS)
    assert cal.quantile.all() and not cal.adaptive.any()
    assert all(scores["quantile"][j] < min(scores[k][j] for k in SCALES[:3]) for j in range(2))
    record = cal.to_dict()
    assert record["quantile"] == [True, True] and np.asarray(record["centre"]).shape == (2, 3, 2)
    assert scale_kinds(record) == ["quantile", "quantile"]
    # beyond the horizon they use the fitted spread: the tail has no step of its own to regress on
    assert scale_kinds(cal.scale_dict()) == ["fitted", "fitted"]


def test_with_many_targets_each_quantile_regression_reads_its_own_forecast():
    """Beyond QR_MAX_INPUTS targets the regressions' cost (the inputs' square, times the targets) would run to
    minutes: each target then reads its own forecast only, the other weights exactly 0, and coverage still holds."""
    rng = np.random.default_rng(31)
    t = QR_MAX_INPUTS + 2

    def draw(n):
        pred = rng.uniform(0.1, 2.0, size=(n, 1, t))
        return pred, pred + 0.2 * pred * rng.standard_normal(pred.shape), rng.normal(size=(n, 5, t))

    cal = calibrate(*draw(3000), LEVELS, False, quantile=True)
    weights = np.asarray(cal.qr["width"])[0, 1:]  # [T in, T out]
    assert (weights[~np.eye(t, dtype=bool)] == 0).all() and (np.diag(weights) > 0).all()
    tp, ty, th = draw(30000)
    b = intervals(cal, tp, th)
    cov = interval_scores(b["lower"], b["upper"], ty, LEVELS)["coverage"].mean(axis=(1, 2))
    np.testing.assert_allclose(cov, LEVELS, atol=0.01)


def test_flat_and_idle_windows_get_a_finite_positive_fitted_scale():
    """A link at 0 Mbit/s has a volatility and a level of 0, whose log is -inf: each summary is floored first."""
    pred, y, hist = set_by_another_target(500, 13)
    hist[:100] = 0.0
    cal = calibrate(pred, y, hist, LEVELS, False, fitted=True)
    scale = cal.scale(hist)
    assert np.isfinite(scale).all() and (scale > 0).all()
    assert cal.to_dict()["fitted"] == [True, True] and len(cal.to_dict()["spread"]) == 7


def test_the_recorded_scale_is_the_calibrations_own_for_every_mix_of_kinds():
    """The planner rebuilds the scale from the metadata (``recorded_scale``): the same numbers as the calibration's,
    for a target on the volatility beside one on the fitted scale too (the fitted coefficients are read whenever
    any target uses them), and for metadata written before the fitted scale existed."""
    pred, y, hist = set_by_another_target(600, 14)
    cases = {  # the kinds of the two targets: (adaptive, fitted) flags
        ("adaptive", "adaptive"): ([True, True], [False, False]),
        ("adaptive", "fitted"): ([True, False], [False, True]),  # the planner's throughput on the volatility
        ("fitted", "plain"): ([False, False], [True, False]),
        ("fitted", "fitted"): ([False, False], [True, True]),
    }
    for kinds, (adaptive, fitted) in cases.items():
        cal = calibrate(pred, y, hist, LEVELS, np.array(adaptive), fitted=np.array(fitted))
        recorded = json.loads(json.dumps(cal.scale_dict()))  # as the metadata carries it
        np.testing.assert_allclose(recorded_scale(hist, recorded), cal.scale(hist), rtol=1e-12)
        assert scale_kinds(recorded) == list(kinds)


def test_quantiles_are_the_finite_sample_ranks():
    rng = np.random.default_rng(3)
    n = 99
    r = rng.normal(size=(n, 1, 1))
    cal = calibrate(np.zeros((n, 1, 1)), r, np.zeros((n, 5, 1)), [0.8], adaptive=False)
    s = np.sort(r[:, 0, 0])
    assert cal.lo[0, 0, 0] == s[int(np.floor(100 * 0.1)) - 1]  # the 10th smallest
    assert cal.hi[0, 0, 0] == s[int(np.ceil(100 * 0.9)) - 1]  # the 90th smallest


def test_the_mean_over_k_steps_has_its_own_calibration():
    pred, y, hist = heteroscedastic(3000, 4, h=6)
    tp, ty, th = heteroscedastic(30000, 5, h=6)
    cal = calibrate(pred, y, hist, LEVELS, adaptive=True)
    b = intervals(cal, tp, th)
    np.testing.assert_allclose(b["mean"][:, 2], tp[:, :3].mean(axis=1))
    mean_y = np.cumsum(ty, axis=1) / np.arange(1, 7)[None, :, None]
    s = interval_scores(b["mean_lower"], b["mean_upper"], mean_y, LEVELS)
    assert np.abs(s["coverage"].mean(axis=(1, 2)) - np.array(LEVELS)).max() < 0.015
    # the mean of independent errors is tighter than its steps: its bound is not the average of per-step bounds
    assert (b["mean_upper"][:, :, -1] - b["mean_lower"][:, :, -1]).mean() < (b["upper"] - b["lower"]).mean()


def test_winkler_score_by_hand():
    lower, upper = np.array([[[[0.0]]]]), np.array([[[[1.0]]]])  # [N=1, L=1, H=1, T=1]
    s = interval_scores(lower, upper, np.array([[[1.5]]]), [0.8])
    assert s["winkler"][0, 0, 0] == pytest.approx(1.0 + 2 / 0.2 * 0.5)
    assert s["coverage"][0, 0, 0] == 0.0 and s["width"][0, 0, 0] == 1.0


def test_too_few_windows_and_bad_levels_are_refused():
    assert windows_needed([0.95]) == 39 and windows_needed([0.8]) == 9
    z = np.zeros((39, 1, 1))
    calibrate(z, z, np.zeros((39, 3, 1)), [0.95], adaptive=False)  # exactly enough
    with pytest.raises(DataError, match="38 validation windows cannot calibrate a 95 % interval: it needs at least 39"):
        calibrate(z[:38], z[:38], np.zeros((38, 3, 1)), [0.95], adaptive=False)
    for bad in ([], [0.0], [1.0], [0.8, 0.8], [1.5]):
        with pytest.raises(ConfigError, match="interval_levels must be distinct numbers in"):
            check_levels(bad)
    for bad, name in (([0.8, 0.80000001], "80 % names two levels"), ([0.9999999], "100 % names a level")):
        with pytest.raises(ConfigError, match=name):  # the columns lower_80 / upper_80 of both overwrote each other
            check_levels(bad)
    assert check_levels([0.8, 0.975]) == (0.8, 0.975)


def long_windows(n: int, seed: int, h: int = 2, k: int = 16):
    """Like :func:`heteroscedastic`, with k future rows: a random walk around the forecast level."""
    rng = np.random.default_rng(seed)
    sd = rng.uniform(0.2, 5.0, size=(n, 1, 2))
    hist = np.cumsum(rng.normal(size=(n, 40, 2)) * sd, axis=1)
    pred = rng.normal(size=(n, h, 2))
    y_long = pred.mean(axis=1, keepdims=True) + np.cumsum(rng.normal(size=(n, k, 2)), axis=1) * sd
    return pred, y_long, hist


def test_the_mean_beyond_the_horizon_is_calibrated_on_the_rows_the_split_has():
    from dwcp_lstm.intervals import TAIL_FACTOR, calibrate_tail

    pred, y_long, hist = long_windows(3000, 5)
    y_long[::3, 10:] = np.nan  # a third of the windows run out of the split after 10 rows
    cal = calibrate_tail(calibrate(pred, y_long[:, :2], hist, LEVELS, True), pred, y_long, hist)
    assert cal.tail_lo.shape == (2, 14, 2) and TAIL_FACTOR == 8  # spans k = 3 .. 16
    tp, ty, th = long_windows(40000, 6)
    b = intervals(cal, tp, th)
    mean_k = np.cumsum(ty, axis=1)[:, 2:] / np.arange(3, 17)[None, :, None]  # [N, 14, T]
    for i, level in enumerate(LEVELS):
        inside = (mean_k >= b["tail_lower"][:, i]) & (mean_k <= b["tail_upper"][:, i])
        assert inside.mean(axis=0) == pytest.approx(np.full((14, 2), level), abs=0.02), level
    assert cal.beyond_horizon()["steps"] == 16 and np.array(cal.beyond_horizon()["lo"]).shape == (2, 14, 2)
    few = y_long.copy()
    few[: len(few) - 30, 6:] = np.nan  # 30 complete windows beyond 6 rows: fewer than 95 % needs (39)
    short = calibrate_tail(calibrate(pred, y_long[:, :2], hist, LEVELS, True), pred, few, hist)
    assert short.tail_lo.shape[1] == 4  # spans 3 .. 6 only


def test_the_tail_is_centred_where_a_link_reverts_to():
    """Each window's link sits at a level x for the horizon and reverts towards 10 after it (the realised mean over
    k > H steps is 10 + 0.8 (x - 10) + noise): the tail's centre learns that line, and its lower bound holds its
    level for the slow windows too, where around the held mean it covered them ~100 % (Norway's spans past 2 H)."""
    from dwcp_lstm.intervals import calibrate_tail

    def draw(n: int, seed: int):
        rng = np.random.default_rng(seed)
        x = rng.uniform(2.0, 18.0, n)
        pred = np.repeat(x[:, None, None], 2, axis=1)  # [n, H = 2, 1]: the forecast is the level
        y_long = np.repeat((10.0 + 0.8 * (x - 10.0))[:, None, None], 8, axis=1) + rng.normal(0, 1.0, (n, 8, 1))
        y_long[:, :2] = pred + rng.normal(0, 1.0, (n, 2, 1))
        return x, pred, y_long, np.zeros((n, 4, 1))

    _, pred, y_long, hist = draw(20_000, 0)
    cal = calibrate_tail(calibrate(pred, y_long[:, :2], hist, [0.8], False), pred, y_long, hist)
    running = np.cumsum(y_long, axis=1) / np.arange(1, 9)[None, :, None]
    expected = np.polyfit(pred.mean(axis=1)[:, 0], running[:, 7, 0], 1)  # numpy's own least squares, span 8
    np.testing.assert_allclose(cal.tail_centre[-1, ::-1, 0], expected, rtol=1e-9)
    assert np.array(cal.beyond_horizon()["centre"]).shape == (6, 2, 1)
    x, tp, ty, th = draw(40_000, 1)
    low = intervals(cal, tp, th)["tail_lower"][:, 0, -1, 0]
    mean_8 = ty.mean(axis=1)[:, 0]
    for part in (x < 6, (x >= 6) & (x < 14), x >= 14):  # slow, middling and fast links alike
        assert np.mean(mean_8[part] >= low[part]) == pytest.approx(0.9, abs=0.02)


def test_the_scale_is_chosen_calibrating_on_the_earlier_half_and_judging_the_later():
    """Each group's (link's) first half calibrates, its second half judges: as validation calibrates for the test
    split that follows it. The scores are those of a hand-made split."""
    groups = np.repeat([7, 3], [9, 6])  # two links' windows, each in time order
    assert earlier_half(groups).tolist() == [True] * 4 + [False] * 5 + [True] * 3 + [False] * 3
    pred, y, hist = heteroscedastic(600, 6)
    groups = np.repeat([0, 1, 2], 200)
    cal, scores = choose(pred, y, hist, LEVELS, groups=groups)
    first = np.tile(np.arange(200) < 100, 3)
    assert set(scores) == set(SCALES)
    for name in SCALES:
        c = calibrate(pred[first], y[first], hist[first], LEVELS, name == "adaptive", fitted=name == "fitted",
                      quantile=name == "quantile")  # fmt: skip
        b = intervals(c, pred[~first], hist[~first])
        expected = interval_scores(b["lower"], b["upper"], y[~first], LEVELS)["winkler"].mean(axis=(0, 1))
        np.testing.assert_allclose(scores[name], expected)
    assert cal.adaptive.all() and cal.windows == 600  # then calibrated on every window


def test_a_split_too_small_to_judge_both_halves_stays_plain():
    """50 windows calibrate a 95 % interval (39 needed) but half of them do not: plain, no scores (the interleaved
    two-fold choice used to fail here with a DataError at the end of training)."""
    pred, y, hist = heteroscedastic(50, 8)
    cal, scores = choose(pred, y, hist, LEVELS)
    assert scores is None and not cal.adaptive.any() and cal.windows == 50
    cal, scores = choose(*heteroscedastic(100, 9), LEVELS, allow_adaptive=False)
    assert scores is None and not cal.adaptive.any()


def test_an_atom_at_the_edge_does_not_make_intervals_over_cover():
    """Starlink loss_rate is 0 in 98 % of the seconds and its forecasts, clipped at 0, are often exactly 0: the
    upper quantile landed on that atom and the 80 % interval covered 87 % of the test windows. Windows that the
    clipped bound covers anyway do not bind the quantile, and the side that cannot miss its share hands it over."""

    def draw(n: int, seed: int):
        rng = np.random.default_rng(seed)
        burst = rng.random(n) < 0.03  # 3 % of the seconds lose pings
        y = np.where(burst, rng.uniform(0.01, 0.3, n), 0.0)
        pred = np.clip(0.02 * burst + rng.normal(0, 0.01, n), 0, 1)  # often exactly 0 once clipped
        return pred[:, None, None], y[:, None, None], np.zeros((n, 4, 1))

    ranges = np.array([[0.0], [1.0]])
    (p, y, h), (tp, ty, th) = draw(20_000, 0), draw(20_000, 1)
    coverage = {}
    for name, r in (("plain", None), ("edges", ranges)):
        cal = calibrate(p, y, h, [0.8, 0.95], False, r)
        assert np.isfinite(cal.lo).all() and np.isfinite(cal.hi).all()
        b = intervals(cal, tp, th, ranges)
        coverage[name] = interval_scores(b["lower"], b["upper"], ty, [0.8, 0.95])["coverage"].ravel()
    assert coverage["plain"][0] > 0.86  # the atom's over-coverage
    assert coverage["edges"] == pytest.approx([0.8, 0.95], abs=0.01)
    # without values at an edge nothing changes
    cal_a = calibrate(tp + 0.5, ty + 0.5, th, [0.8], False, ranges)
    cal_b = calibrate(tp + 0.5, ty + 0.5, th, [0.8], False, None)
    assert np.array_equal(cal_a.lo, cal_b.lo) and np.array_equal(cal_a.hi, cal_b.hi)


def test_the_bound_of_a_mean_keeps_its_level_among_the_windows_it_is_above_the_edge():
    """Half the windows are an idle client's (forecast 0.2, actual 0): their lower bound of the mean, clipped at 0,
    covers whatever the quantile, so a marginal quantile puts every miss on the busy half (one-sided 80 % there
    for 90 %: Irish's planner, 72-80 % of the plans that gave a time). Read again over the windows whose bound is
    above the edge, it keeps 90 % there, which is where the planner gives a time."""

    def draw(n: int, seed: int):
        rng = np.random.default_rng(seed)
        busy = np.arange(n) % 2 == 0
        pred = np.where(busy, 10.0, 0.2)[:, None, None] * np.ones((1, 2, 1))
        y = np.where(busy[:, None, None], 10.0 + rng.normal(0.0, 2.0, (n, 2, 1)), 0.0)
        return pred, y, np.zeros((n, 4, 1))

    (p, y, h), (tp, ty, th) = draw(20_000, 0), draw(40_000, 1)
    mean_y = np.cumsum(ty, axis=1) / np.arange(1, 3)[None, :, None]
    ranges = np.array([[0.0], [np.inf]])
    miss = {}
    for name, r in (("marginal", None), ("above the edge", ranges)):
        b = intervals(calibrate(p, y, h, [0.8], False, r), tp, th, ranges)
        low = b["mean_lower"][:, 0]  # [n, H, T]
        timed = low > 0
        assert not timed[1::2].any()  # the idle windows' bounds are on the edge either way
        miss[name] = float(np.mean(mean_y[timed] < low[timed]))
    assert miss["marginal"] > 0.18
    assert miss["above the edge"] == pytest.approx(0.10, abs=0.01)

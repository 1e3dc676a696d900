"""Loss analytics against hand-computed values."""

import math

import numpy as np
import pytest

from genesis_jax.research.analytics import LocaleEMA, LossAnalytics


def test_ema_minima_spikes():
    a = LossAnalytics(window=3)  # alpha = 0.5
    for s, v in enumerate([4.0, 2.0, 10.0, 1.0]):
        a.update(s, v)
    # EMA: 4 -> 3 -> 6.5 (10 > 2 * 3: a spike) -> 3.75
    assert a.ema == pytest.approx(3.75)
    assert a.spikes == 1 and a.min_loss == 1.0 and a.min_ema == pytest.approx(3.0)
    assert a.stagnation == 2  # 6.5 and 3.75 are above the minimum 3.0


def test_window_statistics():
    a = LossAnalytics(window=10)
    for s in range(10):
        a.update(s, 5.0 - 0.1 * s)  # an exact line
    w = a.window_stats()
    assert w["slope"] == pytest.approx(-0.1) and w["noise_fraction"] == pytest.approx(0.0, abs=1e-12)
    assert w["trend"] == "improving" and w["oscillation_rate"] == 0.0
    b = LossAnalytics(window=11)
    for s in range(11):
        b.update(s, 3.0 + (0.5 if s % 2 else -0.5))  # a symmetric zig-zag around a flat line
    w = b.window_stats()
    assert w["oscillation_rate"] == 1.0 and w["trend"] == "plateau"
    x = np.arange(11.0)
    y = np.array([3.0 + (0.5 if s % 2 else -0.5) for s in range(11)])
    slope, icpt = np.polyfit(x, y, 1)
    r2 = 1 - np.sum((y - (slope * x + icpt)) ** 2) / np.sum((y - y.mean()) ** 2)
    assert w["slope"] == pytest.approx(slope) and w["noise_fraction"] == pytest.approx(1 - r2)


def test_state_round_trip_and_non_finite_ignored():
    a = LossAnalytics(window=5, min_delta=0.01)
    for s, v in enumerate([3.0, 2.0, math.nan, 2.5]):
        a.update(s, v)
    b = LossAnalytics.from_state(a.state_dict())
    assert b.summary() == a.summary() and a.count == 3


def test_locale_ema():
    e = LocaleEMA(["en", "fr"], decay=0.9)
    e.update([4.0, 0.0], [2.0, 0.0])  # en mean 2.0; fr absent
    e.update([6.0, 3.0], [2.0, 1.0])
    assert e.ema["en"] == pytest.approx(0.9 * 2.0 + 0.1 * 3.0) and e.ema["fr"] == pytest.approx(3.0)

"""Host-side loss analytics (docs/design.md, "The curriculum"), updated from fetched per-step losses, off the hot path.

O(1) work per observation; the window statistics (slope, trend, noise, oscillation) are
computed only when asked for, at log steps.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import numpy as np

TREND_TOLERANCE = 0.01  # |fitted change over the window| / mean below this is a plateau


class LossAnalytics:
    """EMA (alpha = 2 / (window + 1)), minima, stagnation, spikes and window statistics."""

    def __init__(self, window: int = 100, min_delta: float = 0.0):
        self.window, self.min_delta = window, min_delta
        self.alpha = 2.0 / (window + 1.0)
        self.ema: float | None = None
        self.min_loss = math.inf
        self.min_ema = math.inf
        self.stagnation = 0  # observations since the EMA last beat its minimum by min_delta (relative)
        self.spikes = 0  # observations with loss > 2 * EMA (before the update)
        self.count = 0
        self.recent: deque[tuple[int, float]] = deque(maxlen=window)

    def update(self, step: int, loss: float) -> None:
        if not math.isfinite(loss):
            return
        if self.ema is not None and loss > 2.0 * self.ema:
            self.spikes += 1
        self.ema = loss if self.ema is None else self.alpha * loss + (1.0 - self.alpha) * self.ema
        self.min_loss = min(self.min_loss, loss)
        if self.ema < self.min_ema * (1.0 - self.min_delta) or not math.isfinite(self.min_ema):
            self.min_ema = self.ema
            self.stagnation = 0
        else:
            self.stagnation += 1
        self.count += 1
        self.recent.append((step, loss))

    def reset_stagnation(self) -> None:
        self.stagnation = 0

    def restart_minimum(self) -> None:
        """Forget the minimum: the next observation sets it (stagnation counts from there)."""
        self.min_ema = math.inf
        self.stagnation = 0

    def window_stats(self) -> dict[str, float | str | None]:
        """Least-squares slope (loss per step), trend, noise fraction 1 - R^2, oscillation rate."""
        if len(self.recent) < 3:
            return {"slope": None, "trend": "unknown", "noise_fraction": None, "oscillation_rate": None}
        steps = np.array([s for s, _ in self.recent], np.float64)
        losses = np.array([v for _, v in self.recent], np.float64)
        x = steps - steps.mean()
        sxx = float(np.dot(x, x))
        slope = float(np.dot(x, losses - losses.mean()) / sxx) if sxx > 0 else 0.0
        fitted = losses.mean() + slope * x
        ss_tot = float(np.sum((losses - losses.mean()) ** 2))
        r2 = 1.0 - float(np.sum((losses - fitted) ** 2)) / ss_tot if ss_tot > 0 else 1.0
        diffs = np.diff(losses)
        signs = np.sign(diffs[diffs != 0])
        oscillation = float(np.mean(signs[1:] != signs[:-1])) if len(signs) > 1 else 0.0
        change = slope * (steps[-1] - steps[0]) / max(abs(float(losses.mean())), 1e-12)
        trend = "improving" if change < -TREND_TOLERANCE else "worsening" if change > TREND_TOLERANCE else "plateau"
        return {"slope": slope, "trend": trend, "noise_fraction": 1.0 - r2, "oscillation_rate": oscillation}

    def summary(self) -> dict[str, Any]:
        return {
            "ema": self.ema,
            "min_loss": self.min_loss if self.count else None,
            "min_ema": self.min_ema if self.count else None,
            "stagnation": self.stagnation,
            "spikes": self.spikes,
            "count": self.count,
            **self.window_stats(),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "window": self.window,
            "min_delta": self.min_delta,
            "ema": self.ema,
            "min_loss": _finite(self.min_loss),
            "min_ema": _finite(self.min_ema),
            "stagnation": self.stagnation,
            "spikes": self.spikes,
            "count": self.count,
            "recent": [list(r) for r in self.recent],
        }

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> LossAnalytics:
        a = cls(int(d["window"]), float(d.get("min_delta", 0.0)))
        a.ema = d["ema"]
        a.min_loss = math.inf if d["min_loss"] is None else d["min_loss"]
        a.min_ema = math.inf if d["min_ema"] is None else d["min_ema"]
        a.stagnation, a.spikes, a.count = int(d["stagnation"]), int(d["spikes"]), int(d["count"])
        a.recent.extend((int(s), float(v)) for s, v in d["recent"])
        return a


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


class LocaleEMA:
    """Per-locale EMA of per-sequence training loss, by the locale of each window (docs/design.md, "Evaluation")."""

    def __init__(self, locales: list[str], decay: float):
        self.locales, self.decay = list(locales), decay
        self.ema: dict[str, float | None] = {loc: None for loc in locales}

    def update(self, loss_sums: list[float], counts: list[float]) -> None:
        for loc, total, n in zip(self.locales, loss_sums, counts):
            if n > 0:
                mean = total / n
                prev = self.ema[loc]
                self.ema[loc] = mean if prev is None else self.decay * prev + (1.0 - self.decay) * mean

    def state_dict(self) -> dict[str, Any]:
        return {"locales": self.locales, "decay": self.decay, "ema": self.ema}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.ema = {loc: d["ema"].get(loc) for loc in self.locales}


def validation_drop(history: list[tuple[int, float]], step: int, loss: float, window: int) -> float | None:
    """Relative fall of validation loss from the highest value seen in the `window` steps
    before `step` (None without earlier validations in the window)."""
    earlier = [v for s, v in history if step - window <= s < step]
    if not earlier:
        return None
    peak = max(earlier)
    return (peak - loss) / peak if peak > 0 else None

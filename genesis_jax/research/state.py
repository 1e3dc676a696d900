"""The host-side research state of a run: the curriculum, per-locale and per-task loss EMAs,
the validation history behind grokking detection, and the divergence guard's tally.

It is one object, saved whole into each checkpoint's metadata (`meta["research"]`) and
restored whole, so a resumed run takes the same decisions at the same steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config.schema import Config, EvalConfig
from ..data.verses import TASK_NAMES
from .analytics import LocaleEMA, validation_drop
from .curriculum import Curriculum, Signal


@dataclass
class ResearchState:
    curriculum: Curriculum
    locale_ema: LocaleEMA
    task_ema: dict[str, float]  # "coherence/loss" -> EMA over that task's micro-batches
    val_history: list[tuple[int, float]]  # (step, validation loss)
    last_grokking: int | None  # step of the last grokking signal
    nonfinite_events: int  # skipped updates or rollbacks so far
    lr_scale: float  # product of the rollbacks' learning-rate scales
    task_ema_decay: float  # mtl.task_ema_decay (configuration, not saved)
    grokking: EvalConfig  # eval.grokking_* (configuration, not saved)

    @classmethod
    def fresh(cls, cfg: Config, locales: list[str], has_words: bool) -> ResearchState:
        """Every config key the research state reads enters here, once."""
        return cls(
            Curriculum(cfg.curriculum, cfg.training.log_interval, has_words),
            LocaleEMA(locales, cfg.curriculum.locale_ema_decay),
            {},
            [],
            None,
            0,
            1.0,
            cfg.mtl.task_ema_decay,
            cfg.eval,
        )

    @classmethod
    def restore(cls, cfg: Config, locales: list[str], has_words: bool, meta: dict[str, Any]) -> ResearchState:
        """From a checkpoint's metadata (fresh when it has none). Checkpoints written before the
        state was one object keep its parts at the top level of the metadata."""
        r = cls.fresh(cfg, locales, has_words)
        d = meta.get("research", meta)
        if "curriculum" in d:
            r.curriculum.load_state_dict(d["curriculum"])
        if "locale_ema" in d:
            r.locale_ema.load_state_dict(d["locale_ema"])
        r.task_ema = {str(k): float(v) for k, v in d.get("task_ema", {}).items()}
        r.val_history = [(int(s), float(v)) for s, v in d.get("val_history", [])]
        last = d.get("last_grokking")
        r.last_grokking = None if last is None or last < 0 else int(last)
        guard = d.get("nonfinite", {})
        r.nonfinite_events, r.lr_scale = int(guard.get("events", 0)), float(guard.get("lr_scale", 1.0))
        return r

    def state_dict(self) -> dict[str, Any]:
        return {
            "curriculum": self.curriculum.state_dict(),
            "locale_ema": self.locale_ema.state_dict(),
            "task_ema": self.task_ema,
            "val_history": self.val_history,
            "last_grokking": self.last_grokking,
            "nonfinite": {"events": self.nonfinite_events, "lr_scale": self.lr_scale},
        }

    def observe(self, step: int, m: dict[str, np.ndarray]) -> list[Signal]:
        """The finite metrics of one step (fetched to the host): EMAs, then the curriculum."""
        self.locale_ema.update([float(x) for x in m["locale_loss_sum"]], [float(x) for x in m["locale_count"]])
        for name in TASK_NAMES[1:]:
            if float(m.get(f"task/{name}/count", 0.0)) > 0:
                for what in ("loss", "acc"):
                    v, k = float(m[f"task/{name}/{what}"]), f"{name}/{what}"
                    prev = self.task_ema.get(k)
                    d = self.task_ema_decay
                    self.task_ema[k] = v if prev is None else d * prev + (1 - d) * v
        return self.curriculum.observe(step, float(m["loss"]), float(m["loss_ema"]))

    def validated(self, step: int, loss: float) -> Signal | None:
        """Record a validation loss; a grokking signal when it fell fast enough (eval.grokking_*)."""
        e = self.grokking
        signal = None
        recent = self.last_grokking is not None and step - self.last_grokking < e.grokking_window
        if e.grokking_drop > 0 and step >= e.grokking_min_step and not recent:
            drop = validation_drop(self.val_history, step, loss, e.grokking_window)
            if drop is not None and drop >= e.grokking_drop:
                self.last_grokking = step
                signal = Signal(
                    step,
                    "grokking",
                    drop,
                    f"validation loss fell {100 * drop:.1f}% within "
                    f"{e.grokking_window} steps (>= {100 * e.grokking_drop:.0f}%); checkpoint {step} pinned",
                )
        self.val_history.append((step, loss))
        return signal

"""The research curriculum (docs/design.md, "The curriculum"): phases BYTE -> WWM -> SPAN, mask ramps, anchors and the LR stun.

Plain host-side Python driven by fetched metrics. Timing convention: metrics arrive one step
late, so the observation of step s is processed after step s + 1 was dispatched, and every
decision it makes (a phase activation, a stun) takes effect at step s + 2. `controls(t)` is a
pure function of the state and t, which makes a resumed run take the same decisions at the
same steps as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config.schema import CurriculumConfig
from .analytics import LossAnalytics

BYTE, WWM, SPAN = 1, 2, 3
PHASE_NAMES = {BYTE: "BYTE", WWM: "WWM", SPAN: "SPAN"}
PHASE_MASKS = {BYTE: "none", WWM: "wwm", SPAN: "span"}  # the sampler's mask kind each phase trains with
PHASE_TRACKERS = {BYTE: "byte", WWM: "wwm", SPAN: "span"}  # its loss-analytics tracker
DECISION_LAG = 2  # observation of step s -> effect at step s + 2


@dataclass(frozen=True)
class Controls:
    """What one train step runs with."""

    phase: int
    mask_kind: str  # "none", "wwm" or "span"
    mask_prob: float
    lr_mult: float
    mu_scale: float  # Adam first-moment scale applied before this step's update (stun)


@dataclass(frozen=True)
class Signal:
    step: int
    kind: str  # wwm_activation, span_activation, lr_stun, wwm_anchor, span_anchor
    value: float
    description: str


class Curriculum:
    def __init__(self, cfg: CurriculumConfig, log_interval: int, has_words: bool):
        self.cfg, self.log_interval, self.has_words = cfg, log_interval, has_words
        self.starts: dict[int, int] = {}  # phase -> first step that runs it
        self.baseline: tuple[int, float] | None = None  # (step, loss_ema) for the next phase test
        self.anchors: dict[int, float] = {}  # phase -> loss_ema when its ramp completed
        self.improvement: dict[int, float | None] = {WWM: None, SPAN: None}  # percent, phase-anchored
        self.stuns: list[tuple[int, int]] = []  # (observation step, first step it applies to)
        self.analytics = {
            name: LossAnalytics(cfg.analytics_window, cfg.plateau_min_delta)
            for name in ("lifetime", *PHASE_TRACKERS.values())
        }
        self.last_observed = -1

    # -- what a step runs with ------------------------------------------------------------
    def phase_at(self, step: int) -> int:
        if SPAN in self.starts and step >= self.starts[SPAN]:
            return SPAN
        if WWM in self.starts and step >= self.starts[WWM]:
            return WWM
        return BYTE

    def mask_prob_at(self, step: int) -> float:
        phase = self.phase_at(step)
        if phase == BYTE:
            return 0.0
        target, ramp = (
            (self.cfg.wwm_mask_prob, self.cfg.wwm_ramp_steps)
            if phase == WWM
            else (self.cfg.span_mask_prob, self.cfg.span_ramp_steps)
        )
        into = step - self.starts[phase]
        frac = 1.0 if ramp == 0 else min(1.0, into / ramp)
        return self.cfg.mask_ramp_start + (target - self.cfg.mask_ramp_start) * frac

    def lr_mult_at(self, step: int) -> float:
        mult = 1.0
        for _, applied in self.stuns:
            if step < applied:
                continue
            drop = self.cfg.plateau_lr_drop
            if self.cfg.stun_recovery_steps > 0:
                drop += (1.0 - drop) * min(1.0, (step - applied) / self.cfg.stun_recovery_steps)
            mult *= drop
        return mult

    def controls(self, step: int) -> Controls:
        phase = self.phase_at(step) if self.cfg.enabled else BYTE
        kind = PHASE_MASKS[phase]
        mu = 1.0
        for _, applied in self.stuns:
            if applied == step:
                mu *= self.cfg.plateau_lr_drop
        return Controls(phase, kind, self.mask_prob_at(step) if self.cfg.enabled else 0.0, self.lr_mult_at(step), mu)

    # -- observations -------------------------------------------------------------------
    def observe(self, step: int, loss: float, loss_ema: float) -> list[Signal]:
        """Feed the metrics of step `step` (in order); returns the signals it raised."""
        if step <= self.last_observed:
            return []
        self.last_observed = step
        signals: list[Signal] = []
        phase = self.phase_at(step)
        self.analytics["lifetime"].update(step, loss)
        tracker = self.analytics[PHASE_TRACKERS[phase]]
        tracker.update(step, loss)
        if not self.cfg.enabled:
            return signals
        signals += self._anchor(step, phase, loss_ema, tracker)
        self._update_improvements(phase, loss_ema)
        signals += self._stun(step, phase, tracker)
        if step % self.log_interval == 0:
            signals += self._phase_test(step, phase, loss_ema)
        return signals

    def _anchor(self, step: int, phase: int, loss_ema: float, tracker: LossAnalytics) -> list[Signal]:
        if phase == BYTE or phase in self.anchors:
            return []
        ramp = self.cfg.wwm_ramp_steps if phase == WWM else self.cfg.span_ramp_steps
        if step - self.starts[phase] >= ramp:  # >=: a resume cannot step over the anchor
            self.anchors[phase] = loss_ema
            tracker.restart_minimum()  # stagnation counts from the anchor
            name = PHASE_NAMES[phase].lower()
            return [
                Signal(
                    step,
                    f"{name}_anchor",
                    loss_ema,
                    f"{PHASE_NAMES[phase]} ramp complete; anchor loss EMA {loss_ema:.4f}",
                )
            ]
        return []

    def _update_improvements(self, phase: int, loss_ema: float) -> None:
        if phase in self.anchors and self.anchors[phase] > 0:
            self.improvement[phase] = (self.anchors[phase] - loss_ema) / self.anchors[phase] * 100.0
        # The WWM improvement stays frozen once Phase 3 has started (it is only written in Phase 2).

    def _stun(self, step: int, phase: int, tracker: LossAnalytics) -> list[Signal]:
        c = self.cfg
        if c.plateau_lr_patience <= 0 or len(self.stuns) >= c.stun_max_count:
            return []
        if phase != BYTE and phase not in self.anchors:
            # A mask ramp makes the loss rise by design: that is not stagnation. Counting starts
            # at the phase anchor, when the ramp has completed.
            tracker.reset_stagnation()
            return []
        if self.stuns and step - self.stuns[-1][0] < c.stun_cooldown_steps:
            return []
        if tracker.stagnation < c.plateau_lr_patience:
            return []
        self.stuns.append((step, step + DECISION_LAG))
        tracker.reset_stagnation()
        after = self.lr_mult_at(step + DECISION_LAG)
        return [
            Signal(
                step,
                "lr_stun",
                after,
                f"no new loss-EMA minimum (by {c.plateau_min_delta:.0e}) in {c.plateau_lr_patience} steps of "
                f"{PHASE_NAMES[phase]}; LR multiplier -> {after:.3g} and Adam first moment "
                f"x{c.plateau_lr_drop} from step {step + DECISION_LAG} (stun {len(self.stuns)}/{c.stun_max_count})",
            )
        ]

    def _phase_test(self, step: int, phase: int, loss_ema: float) -> list[Signal]:
        c = self.cfg
        if phase == BYTE:
            if WWM in self.starts or step < c.wwm_trigger_steps or not self.has_words:
                return []
            window, threshold, nxt = c.wwm_window, c.wwm_threshold, WWM
        elif phase == WWM:
            if SPAN in self.starts or step - self.starts[WWM] < c.span_trigger_steps:
                return []
            window, threshold, nxt = c.span_window, c.span_threshold, SPAN
        else:
            return []
        if self.baseline is None:
            self.baseline = (step, loss_ema)
            return []
        base_step, base_ema = self.baseline
        if step - base_step < window:
            return []
        rel = (base_ema - loss_ema) / base_ema if base_ema else 0.0
        self.baseline = (step, loss_ema)  # either way, re-baseline
        if rel >= threshold:
            return []
        start = step + DECISION_LAG
        self.starts[nxt] = start
        self.baseline = None  # the next test takes its own baseline inside the new phase
        name = "wwm_activation" if nxt == WWM else "span_activation"
        return [
            Signal(
                step,
                name,
                rel,
                f"loss EMA improved {100 * rel:.2f}% over {step - base_step} steps "
                f"(< {100 * threshold:.2f}%): {PHASE_NAMES[nxt]} from step {start}",
            )
        ]

    # -- reporting and checkpoints ------------------------------------------------------
    def status(self, step: int) -> dict[str, Any]:
        ctl = self.controls(step)
        return {
            "phase": ctl.phase,
            "phase_name": PHASE_NAMES[ctl.phase],
            "mask_prob": ctl.mask_prob,
            "lr_mult": ctl.lr_mult,
            "wwm_improvement": self.improvement[WWM],
            "span_improvement": self.improvement[SPAN],
            "stuns": len(self.stuns),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "starts": {str(k): v for k, v in self.starts.items()},
            "baseline": self.baseline,
            "anchors": {str(k): v for k, v in self.anchors.items()},
            "improvement": {str(k): v for k, v in self.improvement.items()},
            "stuns": self.stuns,
            "last_observed": self.last_observed,
            "analytics": {k: a.state_dict() for k, a in self.analytics.items()},
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.starts = {int(k): int(v) for k, v in d["starts"].items()}
        self.baseline = (int(d["baseline"][0]), float(d["baseline"][1])) if d["baseline"] is not None else None
        self.anchors = {int(k): float(v) for k, v in d["anchors"].items()}
        self.improvement = {int(k): v for k, v in d["improvement"].items()}
        self.stuns = [(int(a), int(b)) for a, b in d["stuns"]]
        self.last_observed = int(d["last_observed"])
        self.analytics = {k: LossAnalytics.from_state(v) for k, v in d["analytics"].items()}

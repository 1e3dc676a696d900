"""The phase machine, ramps, anchors, improvements and the LR stun, driven by synthetic loss
curves with transition steps worked out by hand (decisions at observation s act from s + 2)."""

import dataclasses

import pytest

from genesis_jax.config.schema import CurriculumConfig
from genesis_jax.research.analytics import LossAnalytics
from genesis_jax.research.curriculum import BYTE, SPAN, WWM, Curriculum

CFG = CurriculumConfig(
    wwm_trigger_steps=100,
    wwm_window=50,
    wwm_threshold=0.05,
    wwm_mask_prob=0.15,
    wwm_ramp_steps=30,
    span_trigger_steps=60,
    span_window=50,
    span_threshold=0.05,
    span_mask_prob=0.25,
    span_ramp_steps=40,
    mask_ramp_start=0.05,
)


def run(cur: Curriculum, ema_of, steps: range, loss_of=None) -> dict[str, list[int]]:
    """Feed observations; return the steps at which each signal kind fired."""
    fired: dict[str, list[int]] = {}
    for s in steps:
        ema = ema_of(s)
        for sig in cur.observe(s, loss_of(s) if loss_of else ema, ema):
            fired.setdefault(sig.kind, []).append(sig.step)
    return fired


def piecewise(s: int) -> float:
    # Falls 0.01 per step until 120, then flat at 2.8; rises while WWM ramps (masking is harder),
    # then falls again slowly; flat from 330.
    if s < 120:
        return 4.0 - 0.01 * s
    if s < 202:
        return 2.8
    if s < 232:
        return 2.8 + 0.01 * (s - 202)
    if s < 330:
        return 3.1 - 0.001 * (s - 232)
    return 3.1 - 0.001 * 98


def test_transitions_happen_at_hand_computed_steps():
    cur = Curriculum(CFG, log_interval=10, has_words=True)
    fired = run(cur, piecewise, range(0, 500))
    # s=100: baseline 3.00. s=150: (3.00 - 2.80) / 3.00 = 6.7% >= 5%: no WWM, re-baseline at 2.80.
    # s=200: 0% < 5%: WWM from 202.
    assert fired["wwm_activation"] == [200]
    assert cur.starts[WWM] == 202
    # Ramp of 30 steps: complete at 232; anchor at the first observation with s - 202 >= 30.
    assert fired["wwm_anchor"] == [232]
    assert cur.anchors[WWM] == pytest.approx(piecewise(232))
    # Phase 2 test eligible once s - 202 >= 60 (s >= 262): first check 270 takes its own baseline
    # (3.062); 320: (3.062 - 3.012) / 3.062 = 1.6% < 5%: SPAN from 322. (Reusing the baseline from
    # WWM's start would have fired at 270.)
    assert fired["span_activation"] == [320]
    assert cur.starts[SPAN] == 322
    assert fired["span_anchor"] == [362]


def test_mask_probability_ramps_and_phases():
    cur = Curriculum(CFG, log_interval=10, has_words=True)
    run(cur, piecewise, range(0, 500))
    c = cur.controls
    assert (c(201).phase, c(201).mask_kind, c(201).mask_prob) == (BYTE, "none", 0.0)
    assert (c(202).phase, c(202).mask_kind) == (WWM, "wwm")
    assert c(202).mask_prob == pytest.approx(0.05)
    assert c(217).mask_prob == pytest.approx(0.05 + 0.10 * 15 / 30)
    assert c(232).mask_prob == pytest.approx(0.15) and c(300).mask_prob == pytest.approx(0.15)
    assert (c(322).phase, c(322).mask_kind) == (SPAN, "span")
    assert c(342).mask_prob == pytest.approx(0.05 + 0.20 * 20 / 40)
    assert c(400).mask_prob == pytest.approx(0.25)


def test_improvements_are_phase_anchored_and_wwm_freezes():
    cur = Curriculum(CFG, log_interval=10, has_words=True)
    run(cur, piecewise, range(0, 322))
    anchor = piecewise(232)
    assert cur.improvement[WWM] == pytest.approx((anchor - piecewise(321)) / anchor * 100)
    frozen = cur.improvement[WWM]
    run(cur, lambda s: 1.0, range(322, 500))  # a big drop in Phase 3 must not move the WWM figure
    assert cur.improvement[WWM] == frozen
    assert cur.improvement[SPAN] == pytest.approx(0.0)  # anchor and EMA are both 1.0


def test_no_word_boundaries_no_wwm():
    cur = Curriculum(CFG, log_interval=10, has_words=False)
    assert "wwm_activation" not in run(cur, lambda s: 2.0, range(0, 400))


def test_resume_mid_ramp_takes_the_same_decisions():
    whole = Curriculum(CFG, log_interval=10, has_words=True)
    a = run(whole, piecewise, range(0, 500))
    first = Curriculum(CFG, log_interval=10, has_words=True)
    run(first, piecewise, range(0, 215))  # inside the WWM ramp
    resumed = Curriculum(CFG, log_interval=10, has_words=True)
    resumed.load_state_dict(__import__("json").loads(__import__("json").dumps(first.state_dict())))
    b = run(resumed, piecewise, range(215, 500))
    assert b == {k: [s for s in v if s >= 215] for k, v in a.items() if any(s >= 215 for s in v)}
    assert [resumed.controls(t) for t in range(215, 500)] == [whole.controls(t) for t in range(215, 500)]


STUN = dataclasses.replace(CFG, wwm_trigger_steps=10**6, plateau_lr_patience=20, plateau_lr_drop=0.5)


def test_stun_fires_after_patience_and_scales_once():
    cur = Curriculum(STUN, log_interval=10, has_words=True)
    # Falling loss until step 50, then flat: the analytics EMA keeps creeping down while it
    # converges; it stagnates once no step beats the minimum by plateau_min_delta (0.1%).
    loss = lambda s: 3.0 - 0.02 * min(s, 50)  # noqa: E731
    fired = run(cur, loss, range(0, 400))
    assert len(fired["lr_stun"]) == 1  # stun_max_count = 1
    s0 = fired["lr_stun"][0]
    ref = LossAnalytics(STUN.analytics_window, STUN.plateau_min_delta)
    for s in range(0, s0 + 1):
        ref.update(s, loss(s))
    assert ref.stagnation == STUN.plateau_lr_patience  # fired exactly when patience was reached
    assert cur.controls(s0 + 1).lr_mult == 1.0 and cur.controls(s0 + 1).mu_scale == 1.0
    assert cur.controls(s0 + 2).lr_mult == 0.5 and cur.controls(s0 + 2).mu_scale == 0.5
    assert cur.controls(s0 + 3).mu_scale == 1.0 and cur.controls(399).lr_mult == 0.5  # permanent


def test_stun_cooldown_count_and_recovery():
    cfg = dataclasses.replace(STUN, stun_max_count=2, stun_cooldown_steps=100, stun_recovery_steps=40)
    cur = Curriculum(cfg, log_interval=10, has_words=True)
    fired = run(cur, lambda s: 2.0, range(0, 400))
    a, b = fired["lr_stun"]
    assert a == 20 and b == a + 100  # flat loss: stagnation from step 1; then the cooldown
    assert cur.controls(a + 2).lr_mult == pytest.approx(0.5)
    assert cur.controls(a + 22).lr_mult == pytest.approx(0.5 + 0.5 * 20 / 40)
    assert cur.controls(a + 42).lr_mult == pytest.approx(1.0)


def test_stagnation_is_phase_local():
    # The PyTorch engine counted against the all-time minimum, so the loss rise on entering WWM
    # always triggered the stun. Here Phase 2 starts its own minimum.
    cfg = dataclasses.replace(CFG, plateau_lr_patience=30)
    cur = Curriculum(cfg, log_interval=10, has_words=True)
    ema = lambda s: piecewise(s) if s < 202 else 3.5 - 0.002 * (s - 202)  # noqa: E731
    fired = run(cur, ema, range(0, 320))
    assert fired["wwm_activation"] == [200]
    assert all(s < 202 for s in fired.get("lr_stun", []))  # none in Phase 2, though above the all-time minimum


def test_stagnation_counts_only_once_the_mask_ramp_has_completed():
    """A ramp raises the masked loss by design. With the analytics EMA equal to the loss
    (window 1): BYTE falls 0.02/step (0.5% > min_delta, no stagnation); WWM activates at
    observation 30 (from 32); its 50-step ramp raises the loss; flat after. The anchor is taken
    at 82 and restarts the minimum; 83 sets it; 84..103 are the 20 stagnant steps: the stun is
    observed at 103. Counting during the ramp would have stunned at 52."""
    cfg = CurriculumConfig(
        wwm_trigger_steps=20,
        wwm_window=10,
        wwm_threshold=1.0,
        wwm_ramp_steps=50,
        span_trigger_steps=10**6,
        analytics_window=1,
        plateau_lr_patience=20,
        plateau_min_delta=1e-3,
        stun_max_count=1,
    )

    def loss(s: int) -> float:
        if s < 32:
            return 4.0 - 0.02 * s
        return 3.36 + 0.01 * (min(s, 82) - 32)

    cur = Curriculum(cfg, log_interval=10, has_words=True)
    fired = run(cur, loss, range(0, 200))
    assert fired["wwm_activation"] == [30] and cur.starts[WWM] == 32
    assert fired["wwm_anchor"] == [82]
    assert fired["lr_stun"] == [103]
    assert cur.controls(104).lr_mult == 1.0 and cur.controls(105).lr_mult == 0.5


def test_research_state_feeds_the_curriculum_loss_and_loss_ema_in_their_slots():
    """The step's metrics reach the curriculum in their places: the phase test reads the device
    loss EMA (flat here, so WWM activates at the first test window: baseline at 10, test at 15,
    active from 17), the loss analytics read the raw loss (falling here, so its minimum is the
    last loss), the locale EMAs read each locale's mean loss with decay locale_ema_decay."""
    import numpy as np

    from genesis_jax import config as C
    from genesis_jax.research.state import ResearchState

    cfg = C.from_dict(
        {
            "training": {"log_interval": 1},
            "curriculum": {
                "wwm_trigger_steps": 10,
                "wwm_window": 5,
                "wwm_threshold": 0.01,
                "locale_ema_decay": 0.5,
                "plateau_lr_patience": 0,
            },
        }
    )
    r = ResearchState.fresh(cfg, ["en", "fr"], has_words=True)
    signals = []
    for s in range(20):
        m = {
            "loss": np.float32(3.0 * 0.9**s),
            "loss_ema": np.float32(3.0),
            "locale_loss_sum": np.array([2.0 * s, 9.0]),
            "locale_count": np.array([2.0, 3.0]),
        }
        signals += r.observe(s, m)
    assert [(x.step, x.kind) for x in signals] == [(15, "wwm_activation")]
    assert r.curriculum.controls(16).phase == BYTE and r.curriculum.controls(17).phase == WWM
    assert r.curriculum.analytics["lifetime"].min_loss == pytest.approx(3.0 * 0.9**19, rel=1e-6)
    ema_en = 0.0
    for s in range(1, 20):
        ema_en = 0.5 * ema_en + 0.5 * s  # en's mean loss at step s is 2s / 2
    assert r.locale_ema.ema["en"] == pytest.approx(ema_en) and r.locale_ema.ema["fr"] == pytest.approx(3.0)


def test_stun_multipliers_and_ramps_against_hand_computed_values():
    """Closed forms the phase machine must follow (found unguarded by mutation testing):
    stuns compound (drop^n while permanent); a recovering stun ramps linearly back to exactly
    1 and no further; a ramp of 0 steps starts at the target; the values the signals carry are
    the multiplier from the stun's first step and the relative improvement that was tested."""
    permanent = Curriculum(CurriculumConfig(plateau_lr_drop=0.5), 1, True)
    permanent.stuns = [(10, 12), (30, 32)]
    assert [permanent.lr_mult_at(s) for s in (11, 12, 31, 32, 500)] == [1.0, 0.5, 0.5, 0.25, 0.25]
    assert [permanent.controls(s).mu_scale for s in (11, 12, 13, 32)] == [1.0, 0.5, 1.0, 0.5]
    recovering = Curriculum(CurriculumConfig(plateau_lr_drop=0.2, stun_recovery_steps=10), 1, True)
    recovering.stuns = [(10, 12)]
    assert [recovering.lr_mult_at(s) for s in (12, 17, 22, 40)] == pytest.approx([0.2, 0.6, 1.0, 1.0])
    one = Curriculum(CurriculumConfig(plateau_lr_drop=0.2, stun_recovery_steps=1), 1, True)
    one.stuns = [(10, 12)]
    assert [one.lr_mult_at(s) for s in (12, 13)] == pytest.approx([0.2, 1.0])
    instant = Curriculum(CurriculumConfig(wwm_ramp_steps=0, wwm_mask_prob=0.3), 1, True)
    instant.starts = {WWM: 5}
    assert [instant.mask_prob_at(s) for s in (4, 5, 6)] == [0.0, 0.3, 0.3]
    # Signals: a flat loss EMA stuns after the patience and activates WWM; their values.
    cfg = CurriculumConfig(
        wwm_trigger_steps=10,
        wwm_window=5,
        wwm_threshold=0.05,
        plateau_lr_patience=4,
        plateau_lr_drop=0.5,
        stun_max_count=1,
    )
    cur = Curriculum(cfg, 1, True)
    signals = [x for s in range(20) for x in cur.observe(s, 3.0 - 0.01 * min(s, 12), 3.0 - 0.01 * min(s, 12))]
    stun = [x for x in signals if x.kind == "lr_stun"]
    act = [x for x in signals if x.kind == "wwm_activation"]
    assert len(stun) == 1 and stun[0].value == 0.5 and cur.lr_mult_at(stun[0].step + 2) == 0.5
    assert len(act) == 1 and act[0].step == 15
    assert act[0].value == pytest.approx((2.9 - 2.88) / 2.9)  # baseline at 10 (2.90), tested at 15 (2.88)


def test_phase_tests_at_their_boundaries():
    """Exact boundaries: a test window that improved by exactly the threshold does not switch
    (the switch needs less than the threshold); the SPAN test takes its baseline exactly
    span_trigger_steps after WWM began, and WWM's exactly at wwm_trigger_steps."""
    cfg = CurriculumConfig(
        wwm_trigger_steps=10,
        wwm_window=5,
        wwm_threshold=0.25,
        span_trigger_steps=10,
        span_window=5,
        span_threshold=0.25,
        plateau_lr_patience=0,
        wwm_ramp_steps=0,
        span_ramp_steps=0,
    )
    exact = Curriculum(cfg, 1, True)
    assert [x.kind for s in range(20) for x in exact.observe(s, 2.0 if s < 15 else 1.5, 2.0 if s < 15 else 1.5)] == []
    flat = Curriculum(cfg, 1, True)
    kinds = [(x.step, x.kind) for s in range(40) for x in flat.observe(s, 2.0, 2.0)]
    # WWM: baseline 10, tested 15, active from 17; SPAN: baseline 17 + 10 = 27, tested 32.
    assert kinds == [(15, "wwm_activation"), (17, "wwm_anchor"), (32, "span_activation"), (34, "span_anchor")]

"""One metrics dict per event, read by every sink; the research state saved and restored whole."""

import io
import json
import sqlite3

import numpy as np

from genesis_jax import config as C
from genesis_jax.research.curriculum import Signal
from genesis_jax.research.state import ResearchState
from genesis_jax.telemetry.console import Console, ConsoleSink
from genesis_jax.telemetry.sink import RunEnd
from genesis_jax.telemetry.sqlite import MetricsDB, SQLiteSink
from genesis_jax.telemetry.tensorboard import tensorboard_tag

LOG = {
    "train/loss": 1.83142,
    "train/loss_ema": 1.99651,
    "train/grad_norm": 0.5567,
    "train/lr": 2.4731e-3,
    "train/lr_multiplier": 0.56,
    "train/mask_prob": 0.0625,
    "train/phase": 2.0,
    "curriculum/stuns": 1.0,
    "curriculum/wwm_improvement": 1.61,
    "analytics/loss_slope": -0.01,
    "locale_ema/en": 1.7,
    "task_ema/coherence/loss": 0.5,
    "task_ema/coherence/acc": 0.75,
    "system/tokens_per_sec": 15123.0,
    "system/eta_s": 138.0,
    "system/wall_time": 1.0e9,
}


def as_json(d):
    return json.loads(json.dumps(d))


def test_tensorboard_tags_are_the_specified_ones():
    expected = {
        "train/loss": "Train/Loss",
        "train/loss_ema": "Train/LossEMA",
        "train/grad_norm": "Train/GradNorm",
        "train/lr": "Train/LR",
        "train/lr_multiplier": "Train/LRMultiplier",
        "train/mask_prob": "Train/MaskProb",
        "train/phase": "Train/Phase",
        "curriculum/stuns": None,
        "curriculum/wwm_improvement": "Research/WWM_Improvement",
        "analytics/loss_slope": "Research/LossSlope",
        "locale_ema/en": "Research/EMA_Loss_en",
        "task_ema/coherence/loss": "Tasks/coherence_loss",
        "task_ema/coherence/acc": "Tasks/coherence_acc",
        "system/tokens_per_sec": "System/TokensPerSec",
        "system/eta_s": None,
        "system/wall_time": None,
    }
    assert {k: tensorboard_tag(k) for k in LOG} == expected
    assert (
        tensorboard_tag("val/loss/fr") == "Eval/loss_fr"
        and tensorboard_tag("quick/align/top1") == "Eval/quick_align_top1"
    )


def test_sqlite_and_console_read_the_same_dict(tmp_path):
    db = MetricsDB(tmp_path / "m.sqlite")
    db.start("hash", {}, {})
    sink = SQLiteSink(db)
    sink.write(1200, LOG)
    sink.write(1200, {"val/loss": 2.0, "val/loss/en": 1.9})
    sink.signal(Signal(1200, "lr_stun", 0.56, "plateau"))
    sink.close(RunEnd("completed", 1500, 1.8, 2.0))
    con = sqlite3.connect(tmp_path / "m.sqlite")
    row = con.execute(
        "SELECT step, loss, loss_ema, grad_norm, lr, mask_prob, phase, wwm_improvement, span_improvement,"
        " tokens_per_sec FROM training_logs"
    ).fetchall()
    assert row == [(1200, 1.83142, 1.99651, 0.5567, 2.4731e-3, 0.0625, 2, 1.61, None, 15123.0)]
    assert con.execute("SELECT locale, ema_loss, val_loss FROM language_logs").fetchall() == [("en", 1.7, 1.9)]
    assert dict(con.execute("SELECT name, value FROM evaluation_logs").fetchall()) == {
        "task/coherence/loss_ema": 0.5,
        "task/coherence/acc_ema": 0.75,
        "val/loss": 2.0,
        "val/loss/en": 1.9,
    }
    assert con.execute("SELECT status, final_step FROM experiments").fetchall() == [("completed", 1500)]

    cfg = C.from_dict({"training": {"max_steps": 1500}, "curriculum": {"stun_max_count": 1}})
    stream = io.StringIO()
    ConsoleSink(Console(1500, "plain", stream), cfg.training.max_steps, cfg.curriculum.stun_max_count, cfg.eval).write(
        1200, LOG
    )
    assert stream.getvalue() == (
        "step    1200/1500 | loss 1.8314 | ema 1.9965 | lr 2.47e-03 | gnorm  0.557 | WWM  mask  6.2%  +1.6% | "
        "lr x0.56 (stun 1/1) |    15.1k tok/s | ETA 2m18s | cohe 0.500/75%\n"
    )


def test_research_state_round_trips_whole_and_reads_the_older_flat_layout():
    cfg = C.from_dict({"training": {"log_interval": 1}, "curriculum": {"wwm_trigger_steps": 2}})
    r = ResearchState.fresh(cfg, ["en", "fr"], has_words=True)
    for s in range(30):
        m = {
            "loss": np.float32(3.0 - 0.01 * s),
            "loss_ema": np.float32(3.0 - 0.01 * s),
            "locale_loss_sum": np.array([2.0, 6.0]),
            "locale_count": np.array([1.0, 2.0]),
            "task/coherence/count": np.float32(1.0),
            "task/coherence/loss": np.float32(0.75),
            "task/coherence/acc": np.float32(0.5),
        }
        r.observe(s, m)
    r.validated(30, 2.5)
    r.nonfinite_events, r.lr_scale = 2, 0.25
    saved = as_json(r.state_dict())  # what a checkpoint's metadata holds
    back = ResearchState.restore(cfg, ["en", "fr"], True, {"research": saved})
    assert as_json(back.state_dict()) == saved and back.curriculum.controls(40) == r.curriculum.controls(40)
    assert back.locale_ema.ema == {"en": 2.0, "fr": 3.0} and back.task_ema == {
        "coherence/loss": 0.75,
        "coherence/acc": 0.5,
    }
    # Checkpoints written before the state was one object kept its parts at the top level.
    flat = {
        "step": 30,
        "curriculum": saved["curriculum"],
        "locale_ema": saved["locale_ema"],
        "task_ema": saved["task_ema"],
        "val_history": saved["val_history"],
        "last_grokking": -(10**12),
        "nonfinite": saved["nonfinite"],
    }
    old = ResearchState.restore(cfg, ["en", "fr"], True, flat)
    assert as_json(old.state_dict()) == {**saved, "last_grokking": None}
    assert (
        ResearchState.restore(cfg, ["en", "fr"], True, {}).state_dict()
        == ResearchState.fresh(cfg, ["en", "fr"], True).state_dict()
    )

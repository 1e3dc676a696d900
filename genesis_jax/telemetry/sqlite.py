"""The run's SQLite database (WAL, kept across resumes: rows keyed by step are replaced, so steps
replayed after a crash keep one row), and the sink that fills it."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from ..research.curriculum import Signal
from .sink import Metrics, RunEnd, scoped

SCHEMA = """
CREATE TABLE IF NOT EXISTS experiments (
  run_id TEXT PRIMARY KEY, config_hash TEXT, model_shape TEXT, hyperparams TEXT, status TEXT,
  started_at REAL, updated_at REAL, launches INTEGER, final_step INTEGER, final_loss REAL,
  final_val_loss REAL, duration_s REAL);
CREATE TABLE IF NOT EXISTS training_logs (
  step INTEGER PRIMARY KEY, loss REAL, loss_ema REAL, grad_norm REAL, lr REAL, mask_prob REAL,
  phase INTEGER, wwm_improvement REAL, span_improvement REAL, tokens_per_sec REAL, wall_time REAL);
CREATE TABLE IF NOT EXISTS evaluation_logs (
  step INTEGER, name TEXT, value REAL, wall_time REAL, PRIMARY KEY (step, name));
CREATE TABLE IF NOT EXISTS language_logs (
  step INTEGER, locale TEXT, ema_loss REAL, val_loss REAL, PRIMARY KEY (step, locale));
CREATE TABLE IF NOT EXISTS grokking_signals (
  id INTEGER PRIMARY KEY AUTOINCREMENT, step INTEGER, type TEXT, value REAL, description TEXT);
"""


class MetricsDB:
    """One SQLite database per run directory; rows keyed by step are replaced on a resume, so
    steps replayed after a crash keep one (identical) row."""

    def __init__(self, path: Path):
        try:
            self.con = sqlite3.connect(path, timeout=30)
            self.con.execute("PRAGMA journal_mode=WAL")
            self.con.executescript(SCHEMA)
            self.con.commit()
            row = self.con.execute("SELECT run_id, duration_s FROM experiments LIMIT 1").fetchone()
        except sqlite3.DatabaseError as e:
            raise UserError(
                f"{path}: not a usable metrics database ({e}); move it aside and the run starts a new one"
            ) from None
        self.launch_time = time.time()
        self.run_id = row[0] if row else uuid.uuid4().hex[:12]
        self.prior_duration = float(row[1] or 0.0) if row else 0.0

    def start(self, config_hash: str, model_shape: dict[str, Any], hyperparams: dict[str, Any]) -> None:
        now = time.time()
        self.con.execute(
            "INSERT INTO experiments (run_id, config_hash, model_shape, hyperparams, status, started_at, updated_at,"
            " launches, duration_s) VALUES (?, ?, ?, ?, 'running', ?, ?, 1, ?) ON CONFLICT(run_id) DO UPDATE SET"
            " config_hash=excluded.config_hash, model_shape=excluded.model_shape, hyperparams=excluded.hyperparams,"
            " status='running', updated_at=excluded.updated_at, launches=launches+1",
            (self.run_id, config_hash, json.dumps(model_shape), json.dumps(hyperparams), now, now, self.prior_duration),
        )
        self.con.commit()

    def finish(self, status: str, step: int, loss: float | None, val_loss: float | None) -> None:
        self.con.execute(
            "UPDATE experiments SET status=?, updated_at=?, final_step=?, final_loss=COALESCE(?, final_loss),"
            " final_val_loss=COALESCE(?, final_val_loss), duration_s=? WHERE run_id=?",
            (
                status,
                time.time(),
                step,
                loss,
                val_loss,
                self.prior_duration + time.time() - self.launch_time,
                self.run_id,
            ),
        )
        self.con.commit()

    def log_train(self, row: dict[str, Any]) -> None:
        cols = [
            "step",
            "loss",
            "loss_ema",
            "grad_norm",
            "lr",
            "mask_prob",
            "phase",
            "wwm_improvement",
            "span_improvement",
            "tokens_per_sec",
            "wall_time",
        ]
        self.con.execute(
            f"INSERT OR REPLACE INTO training_logs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
            [row.get(c) for c in cols],
        )
        self.con.commit()

    def log_eval(self, step: int, values: dict[str, float]) -> None:
        now = time.time()
        self.con.executemany(
            "INSERT OR REPLACE INTO evaluation_logs VALUES (?, ?, ?, ?)", [(step, k, v, now) for k, v in values.items()]
        )
        self.con.commit()

    def log_languages(self, step: int, rows: dict[str, tuple[float | None, float | None]]) -> None:
        """Upsert (ema_loss, val_loss) per locale; a None leaves the stored value alone."""
        self.con.executemany(
            "INSERT INTO language_logs VALUES (?, ?, ?, ?) ON CONFLICT(step, locale) DO UPDATE SET"
            " ema_loss=COALESCE(excluded.ema_loss, ema_loss), val_loss=COALESCE(excluded.val_loss, val_loss)",
            [(step, loc, ema, val) for loc, (ema, val) in rows.items()],
        )
        self.con.commit()

    def log_signal(self, step: int, kind: str, value: float, description: str) -> None:
        """One row per (step, kind): a signal replayed after a resume replaces its row."""
        self.con.execute("DELETE FROM grokking_signals WHERE step = ? AND type = ?", (step, kind))
        self.con.execute(
            "INSERT INTO grokking_signals (step, type, value, description) VALUES (?, ?, ?, ?)",
            (step, kind, value, description),
        )
        self.con.commit()

    def close(self) -> None:
        self.con.close()


TRAIN_COLUMNS = {
    "loss": "train/loss",
    "loss_ema": "train/loss_ema",
    "grad_norm": "train/grad_norm",
    "lr": "train/lr",
    "mask_prob": "train/mask_prob",
    "phase": "train/phase",
    "wwm_improvement": "curriculum/wwm_improvement",
    "span_improvement": "curriculum/span_improvement",
    "tokens_per_sec": "system/tokens_per_sec",
    "wall_time": "system/wall_time",
}


class SQLiteSink:
    """metrics.sqlite: training_logs (one row per log step), language_logs, evaluation_logs, signals."""

    def __init__(self, db: MetricsDB):
        self.db = db

    def write(self, step: int, metrics: Metrics) -> None:
        if "train/loss" in metrics:
            row: dict[str, float | int | None] = {col: metrics.get(key) for col, key in TRAIN_COLUMNS.items()}
            row["step"] = step
            row["phase"] = int(metrics["train/phase"])
            self.db.log_train(row)
        languages: dict[str, tuple[float | None, float | None]] = {
            loc: (v, None) for loc, v in scoped(metrics, "locale_ema").items()
        }
        for key, v in scoped(metrics, "val/loss").items():
            languages[key] = (languages.get(key, (None, None))[0], v)
        if languages:
            self.db.log_languages(step, languages)
        evals = {k: v for k, v in metrics.items() if k.startswith(("val/", "quick/"))}
        evals.update({f"task/{k}_ema": v for k, v in scoped(metrics, "task_ema").items()})
        if evals:
            self.db.log_eval(step, evals)

    def signal(self, sig: Signal) -> None:
        self.db.log_signal(sig.step, sig.kind, sig.value, sig.description)

    def close(self, end: RunEnd) -> None:
        try:
            self.db.finish(end.status, end.step, end.last_loss, end.last_val)
        finally:
            self.db.close()

"""Run logs: SQLite (WAL, kept across resumes), TensorBoard scalars and the console."""

from __future__ import annotations

import json
import sqlite3
import sys
import time
import uuid
from pathlib import Path
from typing import Any, TextIO

from tensorboard.summary import Writer

from .errors import UserError

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
            raise UserError(f"{path}: not a usable metrics database ({e}); move it aside and the run starts a new one") from None
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
            (self.run_id, config_hash, json.dumps(model_shape), json.dumps(hyperparams), now, now, self.prior_duration))
        self.con.commit()

    def finish(self, status: str, step: int, loss: float | None, val_loss: float | None) -> None:
        self.con.execute(
            "UPDATE experiments SET status=?, updated_at=?, final_step=?, final_loss=COALESCE(?, final_loss),"
            " final_val_loss=COALESCE(?, final_val_loss), duration_s=? WHERE run_id=?",
            (status, time.time(), step, loss, val_loss, self.prior_duration + time.time() - self.launch_time, self.run_id))
        self.con.commit()

    def log_train(self, row: dict[str, Any]) -> None:
        cols = ["step", "loss", "loss_ema", "grad_norm", "lr", "mask_prob", "phase", "wwm_improvement",
                "span_improvement", "tokens_per_sec", "wall_time"]
        self.con.execute(f"INSERT OR REPLACE INTO training_logs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                         [row.get(c) for c in cols])
        self.con.commit()

    def log_eval(self, step: int, values: dict[str, float]) -> None:
        now = time.time()
        self.con.executemany("INSERT OR REPLACE INTO evaluation_logs VALUES (?, ?, ?, ?)",
                             [(step, k, v, now) for k, v in values.items()])
        self.con.commit()

    def log_languages(self, step: int, rows: dict[str, tuple[float | None, float | None]]) -> None:
        """Upsert (ema_loss, val_loss) per locale; a None leaves the stored value alone."""
        self.con.executemany(
            "INSERT INTO language_logs VALUES (?, ?, ?, ?) ON CONFLICT(step, locale) DO UPDATE SET"
            " ema_loss=COALESCE(excluded.ema_loss, ema_loss), val_loss=COALESCE(excluded.val_loss, val_loss)",
            [(step, loc, ema, val) for loc, (ema, val) in rows.items()])
        self.con.commit()

    def log_signal(self, step: int, kind: str, value: float, description: str) -> None:
        """One row per (step, kind): a signal replayed after a resume replaces its row."""
        self.con.execute("DELETE FROM grokking_signals WHERE step = ? AND type = ?", (step, kind))
        self.con.execute("INSERT INTO grokking_signals (step, type, value, description) VALUES (?, ?, ?, ?)",
                         (step, kind, value, description))
        self.con.commit()

    def close(self) -> None:
        self.con.close()


class TensorBoard:
    """Scalars through the `tensorboard` package's own writer (no TensorFlow needed)."""

    def __init__(self, directory: Path):
        self.writer = Writer(str(directory))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, v in values.items():
            self.writer.add_scalar(tag, float(v), step)

    def close(self) -> None:
        self.writer.close()


def _duration(seconds: float) -> str:
    s = int(max(seconds, 0))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Console:
    """One line per log interval; on a terminal, a progress bar redrawn on its own last line."""

    def __init__(self, max_steps: int, mode: str, stream: TextIO | None = None):
        self.stream, self.max_steps = stream or sys.stdout, max_steps
        self.bar = mode == "bar" or (mode == "auto" and self.stream.isatty())
        self.bar_shown = False
        self.last_draw = 0.0

    def _clear_bar(self) -> None:
        if self.bar_shown:
            self.stream.write("\r\x1b[K")
            self.bar_shown = False

    def print(self, text: str) -> None:
        self._clear_bar()
        self.stream.write(text + "\n")
        self.stream.flush()

    def progress(self, done: int, eta_s: float | None) -> None:
        if not self.bar:
            return
        now = time.monotonic()
        if now - self.last_draw < 0.1 and done < self.max_steps:
            return
        self.last_draw = now
        width = 30
        frac = done / max(self.max_steps, 1)
        fill = int(frac * width)
        eta = f" ETA {_duration(eta_s)}" if eta_s is not None else ""
        self.stream.write(f"\r\x1b[K[{'#' * fill}{'.' * (width - fill)}] {done}/{self.max_steps} {frac:6.1%}{eta}")
        self.stream.flush()
        self.bar_shown = True

    def close(self) -> None:
        self._clear_bar()
        self.stream.flush()


def print_err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def format_line(m: dict[str, Any], max_steps: int, eta_s: float | None) -> str:
    """step, loss, EMA, LR, phase and mask %, phase-anchored improvement, stun state, tokens/s, ETA."""
    eta = _duration(eta_s) if eta_s is not None else "-"
    tps = m.get("tokens_per_sec")
    tps_s = f"{tps / 1000:7.1f}k tok/s" if tps else "      - tok/s"
    imp = m.get("improvement")
    imp_s = f" {imp:+5.1f}%" if imp is not None else ""
    stun = f" | lr x{m['lr_mult']:.2f} (stun {m['stuns']}/{m['stun_max']})" if m.get("stuns") else ""
    return (f"step {m['step']:>7d}/{max_steps} | loss {m['loss']:.4f} | ema {m['loss_ema']:.4f} | "
            f"lr {m['lr']:.2e} | gnorm {m['grad_norm']:6.3f} | {m.get('phase_name', 'BYTE'):4s} mask "
            f"{100 * m.get('mask_prob', 0.0):4.1f}%{imp_s}{stun} | {tps_s} | ETA {eta}")

"""The console: one line per log interval and, on a terminal, a progress bar redrawn on its own
last line; the console sink that writes the train, validation and evaluation lines."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from ..config.schema import EvalConfig
from ..data.verses import TASK_NAMES
from ..evaluation.metrics import console_summary, go_no_go
from ..research.curriculum import PHASE_NAMES, WWM, Signal
from .sink import Metrics, RunEnd, scoped


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


def format_line(m: dict[str, Any], max_steps: int, eta_s: float | None) -> str:
    """step, loss, EMA, LR, phase and mask %, phase-anchored improvement, stun state, tokens/s, ETA."""
    eta = _duration(eta_s) if eta_s is not None else "-"
    tps = m.get("tokens_per_sec")
    tps_s = f"{tps / 1000:7.1f}k tok/s" if tps else "      - tok/s"
    imp = m.get("improvement")
    imp_s = f" {imp:+5.1f}%" if imp is not None else ""
    stun = f" | lr x{m['lr_mult']:.2f} (stun {m['stuns']}/{m['stun_max']})" if m.get("stuns") else ""
    return (
        f"step {m['step']:>7d}/{max_steps} | loss {m['loss']:.4f} | ema {m['loss_ema']:.4f} | "
        f"lr {m['lr']:.2e} | gnorm {m['grad_norm']:6.3f} | {m.get('phase_name', 'BYTE'):4s} mask "
        f"{100 * m.get('mask_prob', 0.0):4.1f}%{imp_s}{stun} | {tps_s} | ETA {eta}"
    )


class ConsoleSink:
    """One line per event: the training line, the validation line, the quick-evaluation verdict."""

    def __init__(self, console: Console, max_steps: int, stun_max: int, gates: EvalConfig):
        """`stun_max`: curriculum.stun_max_count; `gates`: the [eval] thresholds of the verdict."""
        self.console, self.max_steps, self.stun_max, self.gates = console, max_steps, stun_max, gates

    def write(self, step: int, metrics: Metrics) -> None:
        max_steps = self.max_steps
        if "train/loss" in metrics:
            self.console.print(self.train_line(step, metrics))
        if "val/loss" in metrics:
            per_locale = " ".join(f"{loc} {v:.3f}" for loc, v in scoped(metrics, "val/loss").items())
            self.console.print(
                f"val  {step:>7d}/{max_steps} | loss {metrics['val/loss']:.4f} | ppl {metrics['val/ppl']:.2f} | "
                f"bpb {metrics['val/bpb']:.3f} | {per_locale}"
            )
        if "quick/go" in metrics:
            results = scoped(metrics, "quick")
            failed = go_no_go(results, self.gates)
            headline = console_summary(results)
            self.console.print(
                f"eval {step:>7d}/{max_steps} | quick suite: "
                + ("GO" if not failed else "NO-GO (" + "; ".join(failed) + ")")
                + (f" | {headline}" if headline else "")
            )

    def train_line(self, step: int, m: Metrics) -> str:
        phase = int(m["train/phase"])
        improvement = m.get("curriculum/wwm_improvement" if phase == WWM else "curriculum/span_improvement")
        row = {
            "step": step,
            "loss": m["train/loss"],
            "loss_ema": m["train/loss_ema"],
            "lr": m["train/lr"],
            "grad_norm": m["train/grad_norm"],
            "mask_prob": m["train/mask_prob"],
            "phase_name": PHASE_NAMES[phase],
            "improvement": improvement,
            "lr_mult": m["train/lr_multiplier"],
            "stuns": int(m["curriculum/stuns"]),
            "stun_max": self.stun_max,
            "tokens_per_sec": m.get("system/tokens_per_sec"),
        }
        line = format_line(row, self.max_steps, m.get("system/eta_s"))
        tasks = scoped(m, "task_ema")
        if tasks:
            line += " | " + " ".join(
                f"{n[:4]} {tasks[f'{n}/loss']:.3f}/{100 * tasks[f'{n}/acc']:.0f}%"
                for n in TASK_NAMES[1:]
                if f"{n}/loss" in tasks
            )
        return line

    def signal(self, sig: Signal) -> None:
        self.console.print(f"signal {sig.kind} at step {sig.step}: {sig.description}")

    def close(self, end: RunEnd) -> None:
        self.console.close()

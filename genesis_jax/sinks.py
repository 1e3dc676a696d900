"""Where a run's metrics go. The loop builds one dict of namespaced values per event (a log
step, a validation, a quick evaluation) and every sink takes what it knows from it:

  train/*        loss, loss_ema, grad_norm, lr, lr_multiplier, mask_prob, phase
  curriculum/*   wwm_improvement, span_improvement, stuns
  analytics/*    loss_slope, noise_fraction, oscillation_rate
  locale_ema/L   training EMA of locale L's per-sequence loss
  task_ema/T/X   EMA of task T's loss or acc (multi-task learning)
  system/*       tokens_per_sec, mfu, eta_s, wall_time
  val/*          periodic validation (eval_suite.ce_summary keys)
  quick/*        the quick evaluation suite (eval_metrics keys), quick/go = 1 for go

A new sink implements `Sink`; a new metric is a new key, mapped below where a sink's schema
names it (the SQLite columns and TensorBoard tags are fixed by the run-directory format).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .config import Config
from .curriculum import PHASE_NAMES, WWM, Signal
from .eval_metrics import console_summary, go_no_go
from .logs import Console, MetricsDB, TensorBoard, format_line
from .tasks import TASK_NAMES

Metrics = dict[str, float]


@dataclass(frozen=True)
class RunEnd:
    status: str  # completed, interrupted, diverged, failed
    step: int  # updates done
    last_loss: float | None
    last_val: float | None


class Sink(Protocol):
    def write(self, step: int, metrics: Metrics) -> None: ...

    def signal(self, sig: Signal) -> None: ...

    def close(self, end: RunEnd) -> None: ...


def scoped(metrics: Metrics, prefix: str) -> Metrics:
    """The entries under `prefix/`, with the prefix removed."""
    n = len(prefix) + 1
    return {k[n:]: v for k, v in metrics.items() if k.startswith(prefix + "/")}


TRAIN_COLUMNS = {"loss": "train/loss", "loss_ema": "train/loss_ema", "grad_norm": "train/grad_norm", "lr": "train/lr",
                 "mask_prob": "train/mask_prob", "phase": "train/phase",
                 "wwm_improvement": "curriculum/wwm_improvement", "span_improvement": "curriculum/span_improvement",
                 "tokens_per_sec": "system/tokens_per_sec", "wall_time": "system/wall_time"}


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
            loc: (v, None) for loc, v in scoped(metrics, "locale_ema").items()}
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


TB_TAGS = {"train/loss": "Train/Loss", "train/loss_ema": "Train/LossEMA", "train/lr": "Train/LR",
           "train/grad_norm": "Train/GradNorm", "train/mask_prob": "Train/MaskProb", "train/phase": "Train/Phase",
           "train/lr_multiplier": "Train/LRMultiplier", "system/tokens_per_sec": "System/TokensPerSec",
           "system/mfu": "System/MFU", "curriculum/wwm_improvement": "Research/WWM_Improvement",
           "curriculum/span_improvement": "Research/Span_Improvement", "analytics/loss_slope": "Research/LossSlope",
           "analytics/noise_fraction": "Research/NoiseFraction", "analytics/oscillation_rate": "Research/OscillationRate"}
TB_PREFIXES = {"locale_ema/": "Research/EMA_Loss_", "task_ema/": "Tasks/", "val/": "Eval/", "quick/": "Eval/quick_"}


def tensorboard_tag(key: str) -> str | None:
    """The TensorBoard tag of a metric key (None: not plotted, e.g. the ETA)."""
    if key in TB_TAGS:
        return TB_TAGS[key]
    for prefix, tag in TB_PREFIXES.items():
        if key.startswith(prefix):
            return tag + key[len(prefix):].replace("/", "_")
    return None


class TensorBoardSink:
    def __init__(self, directory: Path):
        self.tb = TensorBoard(directory)

    def write(self, step: int, metrics: Metrics) -> None:
        tags = {tensorboard_tag(k): v for k, v in metrics.items() if v is not None}
        self.tb.scalars(step, {t: v for t, v in tags.items() if t is not None})

    def signal(self, sig: Signal) -> None:
        self.tb.scalars(sig.step, {f"Signals/{sig.kind}": sig.value})

    def close(self, end: RunEnd) -> None:
        self.tb.close()


class ConsoleSink:
    """One line per event: the training line, the validation line, the quick-evaluation verdict."""

    def __init__(self, console: Console, cfg: Config):
        self.console, self.cfg = console, cfg

    def write(self, step: int, metrics: Metrics) -> None:
        max_steps = self.cfg.training.max_steps
        if "train/loss" in metrics:
            self.console.print(self.train_line(step, metrics))
        if "val/loss" in metrics:
            per_locale = " ".join(f"{loc} {v:.3f}" for loc, v in scoped(metrics, "val/loss").items())
            self.console.print(f"val  {step:>7d}/{max_steps} | loss {metrics['val/loss']:.4f} | ppl {metrics['val/ppl']:.2f} | "
                               f"bpb {metrics['val/bpb']:.3f} | {per_locale}")
        if "quick/go" in metrics:
            results = scoped(metrics, "quick")
            failed = go_no_go(results, self.cfg)
            headline = console_summary(results)
            self.console.print(f"eval {step:>7d}/{max_steps} | quick suite: "
                               + ("GO" if not failed else "NO-GO (" + "; ".join(failed) + ")")
                               + (f" | {headline}" if headline else ""))

    def train_line(self, step: int, m: Metrics) -> str:
        phase = int(m["train/phase"])
        improvement = m.get("curriculum/wwm_improvement" if phase == WWM else "curriculum/span_improvement")
        row = {"step": step, "loss": m["train/loss"], "loss_ema": m["train/loss_ema"], "lr": m["train/lr"],
               "grad_norm": m["train/grad_norm"], "mask_prob": m["train/mask_prob"], "phase_name": PHASE_NAMES[phase],
               "improvement": improvement, "lr_mult": m["train/lr_multiplier"], "stuns": int(m["curriculum/stuns"]),
               "stun_max": self.cfg.curriculum.stun_max_count, "tokens_per_sec": m.get("system/tokens_per_sec")}
        line = format_line(row, self.cfg.training.max_steps, m.get("system/eta_s"))
        tasks = scoped(m, "task_ema")
        if tasks:
            line += " | " + " ".join(f"{n[:4]} {tasks[f'{n}/loss']:.3f}/{100 * tasks[f'{n}/acc']:.0f}%"
                                     for n in TASK_NAMES[1:] if f"{n}/loss" in tasks)
        return line

    def signal(self, sig: Signal) -> None:
        self.console.print(f"signal {sig.kind} at step {sig.step}: {sig.description}")

    def close(self, end: RunEnd) -> None:
        self.console.close()


def open_sinks(cfg: Config, run_dir: Path, db: MetricsDB, console: Console) -> list[Sink]:
    """SQLite first: the record of the run is written before anything that only displays it."""
    sinks: list[Sink] = [SQLiteSink(db)]
    if cfg.logging.tensorboard:
        sinks.append(TensorBoardSink(run_dir / "tensorboard"))
    sinks.append(ConsoleSink(console, cfg))
    return sinks


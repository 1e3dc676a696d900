"""Where a run's metrics go. The loop builds one dict of namespaced values per event (a log
step, a validation, a quick evaluation) and every sink takes what it knows from it:

  train/*        loss, loss_ema, grad_norm, lr, lr_multiplier, mask_prob, phase
  curriculum/*   wwm_improvement, span_improvement, stuns
  analytics/*    loss_slope, noise_fraction, oscillation_rate
  locale_ema/L   training EMA of locale L's per-sequence loss
  task_ema/T/X   EMA of task T's loss or acc (multi-task learning)
  system/*       tokens_per_sec, mfu, eta_s, wall_time
  val/*          periodic validation (evaluation/suite.py, ce_summary keys)
  quick/*        the quick evaluation suite (evaluation/metrics.py keys), quick/go = 1 for go

A new sink implements `Sink` in a module of its own and is opened in sinks.py; a new metric is a new key, mapped below where a sink's schema
names it (the SQLite columns and TensorBoard tags are fixed by the run-directory format).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..research.curriculum import Signal

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

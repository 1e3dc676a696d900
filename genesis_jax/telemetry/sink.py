"""TODO(sinks)."""

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

"""The sinks a run writes to, opened from its `[logging]` section."""

from __future__ import annotations

from pathlib import Path

from ..config.schema import Config
from .console import Console, ConsoleSink
from .sink import Sink
from .sqlite import MetricsDB, SQLiteSink
from .tensorboard import TensorBoardSink


def open_sinks(cfg: Config, run_dir: Path, db: MetricsDB, console: Console) -> list[Sink]:
    """SQLite first: the record of the run is written before anything that only displays it."""
    sinks: list[Sink] = [SQLiteSink(db)]
    if cfg.logging.tensorboard:
        sinks.append(TensorBoardSink(run_dir / "tensorboard"))
    sinks.append(ConsoleSink(console, cfg.training.max_steps, cfg.curriculum.stun_max_count, cfg.eval))
    return sinks

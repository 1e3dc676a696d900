"""`python -m genesis_jax.report --run DIR`: PNG plots of a run from its SQLite logs, in DIR/reports/.

- training.png: loss and loss EMA with the learning rate on a second axis, phases shaded,
  signals (activations, stuns, grokking) marked;
- locales.png: per-locale training EMA and validation loss;
- evaluation.png: evaluation metrics over steps (validation, reconstruction, alignment).

A run can also write them as it trains: `logging.report_interval`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .core.cli import ArgumentParser, run_cli
from .telemetry.report import plot_run


def report(run_dir: Path) -> int:
    for path in plot_run(run_dir):
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(
        prog="python -m genesis_jax.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--run", type=Path, required=True)
    args = ap.parse_args(argv)
    return run_cli("genesis_jax.report", lambda: report(args.run), lambda: args.run / "logs", devices=False)


if __name__ == "__main__":
    sys.exit(main())

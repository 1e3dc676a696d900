"""`python -m genesis_jax.train --config FILE [--run-dir DIR] [--set section.key=value ...]`.

Re-running the same command on the same run directory resumes from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import config as config_lib
from .core import platforms
from .core.cli import ArgumentParser, run_cli
from .core.host_memory import relaunch_with_huge_pages
from .model.attention import check_name
from .parallel.processes import add_arguments as add_distributed_arguments, agree, initialize as initialize_distributed
from .training.run import fingerprint, train


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = ArgumentParser(prog="python -m genesis_jax.train", description=__doc__)
    ap.add_argument("--config", required=True, help="TOML run config (see configs/)")
    ap.add_argument("--run-dir", help="run directory (default runs/<config name>)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config key, typed by the schema (repeatable)",
    )
    ap.add_argument(
        "--init-from",
        metavar="DIR",
        help="start a new run from a Hugging Face model directory (an export): training.init_from",
    )
    ap.add_argument(
        "--allow-corpus-change",
        action="store_true",
        help="resume even though the corpus's content hash differs from the one the run trained on",
    )
    add_distributed_arguments(ap)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None, own_process: bool = False) -> int:
    args = parse_args(argv)
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / Path(args.config).stem

    def body() -> int:
        overrides = args.set + ([f"training.init_from={args.init_from}"] if args.init_from else [])
        cfg = config_lib.load(args.config, overrides)
        if own_process and cfg.training.host_huge_pages:
            relaunch_with_huge_pages()
        check_name(cfg.model.attention)
        watchdog = initialize_distributed(args)
        platforms.require()
        agree(fingerprint(cfg, run_dir, args.num_processes), watchdog)
        return train(cfg, run_dir, args.allow_corpus_change, own_process)

    return run_cli("genesis_jax.train", body, lambda: run_dir / "logs" if run_dir.is_dir() else None, devices=False)


if __name__ == "__main__":
    sys.exit(main(own_process=True))

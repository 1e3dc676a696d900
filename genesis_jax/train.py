"""`python -m genesis_jax.train --config FILE [--run-dir DIR] [--set section.key=value ...]`.

Re-running the same command on the same run directory resumes from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax

from . import config as config_lib
from .checkpoint import Checkpointer, check_shape
from .config import Config
from .errors import UserError
from .logs import print_err
from .loop import TrainLoop
from .runtime import build, compile_step
from .sampler import MaskParams
from .step import StepControls


class StopRequested:
    """SIGINT/SIGTERM set a flag; the loop saves at the current step and exits."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum


def config_changes(cfg: Config, run_dir: Path) -> list[str]:
    """On a resume, what differs from the run directory's stored config."""
    stored = run_dir / "config.toml"
    if not stored.is_file():
        return []
    try:
        old = config_lib.load(stored)
    except UserError as e:
        return [f"(stored config.toml unreadable: {e})"]
    return config_lib.diff(config_lib.to_dict(old), config_lib.to_dict(cfg))


def write_config(cfg: Config, run_dir: Path) -> None:
    tmp = run_dir / "config.toml.tmp"
    tmp.write_text(config_lib.to_toml(cfg), encoding="utf-8")
    tmp.replace(run_dir / "config.toml")


def train(cfg: Config, run_dir: Path) -> int:
    """Run or resume training in `run_dir`; returns the process exit code."""
    t_start = time.time()
    setup = build(cfg)
    state = setup.state
    run_dir.mkdir(parents=True, exist_ok=True)
    diffs = config_changes(cfg, run_dir)
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
    latest = ckpt.latest_step()
    meta: dict[str, Any] = {}
    if latest is not None:
        meta = ckpt.read_meta(latest)
        check_shape(meta, cfg, run_dir)
        state = ckpt.restore(latest, state)
        print_err(f"resuming {run_dir} from step {latest}")
        for line in diffs:
            print_err(f"  changed since the last launch: {line}")
    write_config(cfg, run_dir)  # only once the resume is known to be possible

    t_compile = time.time()
    step_fn = compile_step(cfg, setup, StepControls.make(mask=MaskParams.make(mask_id=cfg.data.mask_id)))
    compile_s = time.time() - t_compile
    loop = TrainLoop(cfg, run_dir, setup, ckpt, meta)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    loop.console.print(
        f"run {run_dir} | {n_params:,} parameters | {len(setup.locales)} locales | "
        f"{int(setup.device_corpus.valid_cum[-1]):,} train windows | {len(setup.windows.locale)} val windows | "
        f"{setup.mesh.size} {jax.default_backend()} device(s) | step compiled in {compile_s:.1f}s")
    stop = StopRequested()
    stop.install()
    code = loop.run(state, step_fn, stop)
    if loop.status == "interrupted":
        print_err(f"interrupted by signal {stop.signum} after step {loop.done}; checkpoint saved; run the same command to resume")
    elif loop.status == "completed":
        loop.console.print(f"done: {loop.done} steps in {time.time() - t_start:.0f}s; run directory {run_dir}")
    return code


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m genesis_jax.train", description=__doc__)
    ap.add_argument("--config", required=True, help="TOML run config (see configs/)")
    ap.add_argument("--run-dir", help="run directory (default runs/<config name>)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a config key, typed by the schema (repeatable)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = config_lib.load(args.config, args.set)
        run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / Path(args.config).stem
        return train(cfg, run_dir)
    except UserError as e:
        print_err(f"error: {e}")
        return e.exit_code
    except KeyboardInterrupt:
        print_err("interrupted: stopped at once; the run directory keeps its latest complete checkpoint")
        return 130


if __name__ == "__main__":
    sys.exit(main())

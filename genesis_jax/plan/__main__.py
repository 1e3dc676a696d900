"""`python -m genesis_jax.plan --config FILE [--set k=v ...] [--target h100|h200|local] [--devices N]`

Compiles the config's train step and validation step for a GPU, on a machine without one (or
for the local GPU), and says per device whether the run fits in memory and whether each Pallas
kernel compiles without spilling registers, and predicts the step time, tokens/s, MFU and the
run's wall time there (docs/plan.md). Exit 0: it fits and no kernel spills; 1: it does
not fit, a kernel spills, or a compile failed (the report says which); 2: a usage error or a
missing toolchain (one line, with the install command).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .. import config as config_lib
from ..config.ranges import COUNT, flag
from ..core.cli import ArgumentParser, run_cli
from ..core.errors import UserError
from ..core.writing import write_file
from . import target as targets
from .compile import run
from .rates import Rates, load_calibration
from .tables import report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = ArgumentParser(
        prog="python -m genesis_jax.plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", required=True, help="TOML run config")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config key")
    ap.add_argument("--target", default="h200", help=f"GPU to compile for: {', '.join(targets.names())} (default h200)")
    ap.add_argument(
        "--devices",
        type=flag(COUNT),
        default=None,
        help="GPUs of one host to shard over (default: the product of [parallel] when it has no -1, else 1)",
    )
    ap.add_argument("--json", type=Path, help="also write the whole plan as JSON here")
    ap.add_argument("--keep", type=Path, help="keep the compiler's logs and XLA dumps in this directory")
    ap.add_argument(
        "--calibration",
        type=Path,
        help="a GPU's measured rates (benchmarks/calibrate.py, written by benchmarks/gpu_suite.sh) in place "
        "of the published constants the speed prediction starts from",
    )
    return ap.parse_args(argv)


def default_devices(cfg: config_lib.Config) -> int:
    sizes = (cfg.parallel.data, cfg.parallel.fsdp, cfg.parallel.tensor)
    return 1 if -1 in sizes else math.prod(sizes)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        cfg = config_lib.load(args.config, args.set)
        n = args.devices if args.devices is not None else default_devices(cfg)
        if n < 1:
            raise UserError(f"--devices {n}: expected at least 1")
        job = {"kind": "train", "config": str(Path(args.config).resolve()), "set": args.set}
        calibration = load_calibration(args.calibration)[0] if args.calibration else Rates()
        c = run([job], args.target, n, workdir=args.keep)
        r = c.results[0]
        if r.user_error:
            raise UserError(r.error)
        lines, failures, prediction = report(args, c, n, calibration)
        print("\n".join(lines))
        print(
            f"\nverdict: {'; '.join(failures) if failures else 'fits, and every Pallas kernel compiles without spills'}"
        )
        if args.json:
            write_file(
                args.json,
                json.dumps(
                    {
                        "target": args.target,
                        "device_kind": c.device_kind,
                        "devices": n,
                        "memory_limit": c.memory_limit,
                        "peak": r.memory_rows()[1] if r.ok else None,
                        "ok": not failures,
                        "failures": failures,
                        "speed": prediction.to_json() if prediction else None,
                        "job": r.__dict__,
                    },
                    indent=1,
                ),
            )
        return 1 if failures else 0

    return run_cli("genesis_jax.plan", body, devices=False)


if __name__ == "__main__":
    sys.exit(main())

"""`python -m genesis_jax.eval --run DIR [--step N] [--suite full|quick]`: evaluate a checkpoint.

Writes DIR/reports/eval_<step>.json and a short table; exits 0 for go and 1 for no-go against
the thresholds in the run's `[eval]` config, naming each threshold that failed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from flax import nnx

from .config.ranges import COUNT0, flag
from .core.cli import ArgumentParser, run_cli
from .core.writing import write_file
from .data.host import open_configured, selected_locales
from .evaluation.metrics import format_table, go_no_go
from .evaluation.suite import EvalSuite
from .training.rundir import load_run


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m genesis_jax.eval", description=__doc__)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--step", type=flag(COUNT0))
    ap.add_argument("--suite", choices=["full", "quick"], default="full")
    args = ap.parse_args(argv)
    return run_cli("genesis_jax.eval", lambda: evaluate(args.run, args.step, args.suite), lambda: args.run / "logs")


def evaluate(run_dir: Path, step: int | None, suite: str) -> int:
    t0 = time.time()
    run = load_run(run_dir, step)
    corpus = open_configured(run.cfg.data)
    locales = selected_locales(corpus, run.cfg.data)
    graphdef, params = nnx.split(run.model)
    results = EvalSuite(run.cfg, corpus, locales, graphdef).run(params, quick=suite == "quick")
    failed = go_no_go(results, run.cfg.eval)
    report = {
        "run": str(run_dir),
        "step": run.step,
        "suite": suite,
        "seconds": time.time() - t0,
        "go": not failed,
        "failed": failed,
        "results": results,
    }
    out = run_dir / "reports" / (f"eval_{run.step}.json" if suite == "full" else f"eval_{run.step}_{suite}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_file(out, json.dumps(report, indent=1))
    print(f"{suite} evaluation of {run_dir} at step {run.step} ({report['seconds']:.0f}s)")
    print(format_table(results, locales))
    print("GO" if not failed else "NO-GO: " + "; ".join(failed))
    print(f"report: {out}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())

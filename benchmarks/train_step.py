"""Train-step throughput: compile time, bare jitted step vs the full training loop, per variant.

  python benchmarks/train_step.py --config configs/tiny.toml [--set k=v ...]
      [--variant NAME:key=value,mask=wwm ...] [--steps 30] [--loop-steps 60] [--out results.csv]

Each variant reports: compile time, step time and tokens/s of the bare AOT-compiled step
(timed over `--steps` steps, median of 3 repeats, one device sync per repeat), the training
loop's tokens/s for the same config (median of its logged intervals, first and last dropped:
they hold compilation and the final checkpoint), the loop/bare ratio, MFU where the device's
peak is known, XLA's memory estimate, the mesh and the bytes of parameters + optimizer state each device
holds (measured from the shards; a variant may set `parallel.*` keys), the device's measured peak
memory (where the device reports it; per process, so only the first variant's is its own) and,
with `--plan-target`, the peak memory and step time `python -m genesis_jax.plan` predicts (with
`--calibration`, also the calibrated step time; measured_over_plan uses the last), and
each variant's step time relative to the first
(masking rows: WWM/span mask probability from the config's [curriculum]). A CPU time is not a
GPU kernel speed.
"""

from __future__ import annotations

import argparse
import csv
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from benchmarks.synthetic import synthetic_corpus  # noqa: E402
from genesis_jax import config as C
from genesis_jax.config.ranges import COUNT, COUNT0, flag
from genesis_jax.core.cli import ArgumentParser, run_cli
from genesis_jax.core.errors import UserError
from genesis_jax.data.masks import MASK_KINDS, MaskParams
from genesis_jax.model.flops import peak_flops, train_flops_per_token
from genesis_jax.parallel.sharding import bytes_per_device
from genesis_jax.plan import compile as plan_compile, target as plan_target_lib
from genesis_jax.plan.rates import Rates, load_calibration
from genesis_jax.plan.speed import device_for, predict
from genesis_jax.training.build import build, compile_step
from genesis_jax.training.run import train
from genesis_jax.training.step import StepControls


def bare_step(cfg: C.Config, steps: int, mask: MaskParams) -> dict[str, Any]:
    setup = build(cfg)
    state_bytes = max(bytes_per_device((setup.state.params, setup.state.opt_state)).values())
    mesh = "x".join(f"{a}{n}" for a, n in setup.mesh.shape.items() if n > 1) or "1 device"
    t0 = time.perf_counter()
    controls = StepControls.make(mask=mask)
    step = compile_step(cfg, setup, controls)
    compile_s = time.perf_counter() - t0
    mem = step.memory_analysis()
    state, key = setup.state, jax.random.key(cfg.training.seed)
    for _ in range(3):
        state, m = step(state, setup.device_corpus, key, controls)
    jax.block_until_ready(m)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(steps):
            state, m = step(state, setup.device_corpus, key, controls)
        jax.block_until_ready((state, m))
        times.append((time.perf_counter() - t0) / steps)
    step_s = statistics.median(times)
    temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
    args = getattr(mem, "argument_size_in_bytes", None) if mem is not None else None
    return {
        "compile_s": compile_s,
        "step_ms": 1000 * step_s,
        "temp_mib": temp / 2**20 if temp else None,
        "args_mib": args / 2**20 if args else None,
        "state_mib": state_bytes / 2**20,
        "mesh": mesh,
    }


def planned(config: str, overrides: list[str], target: str, rates: list[Rates]) -> dict[str, Any]:
    """What `python -m genesis_jax.plan` predicts for this variant on `target`: the train step's
    peak memory per device and its step time (with each of `rates`: the published constants,
    then a calibration's)."""
    job = {"kind": "train", "config": str(Path(config).resolve()), "set": overrides}
    try:
        c = plan_compile.run([job], target)
    except UserError as e:  # no toolchain here: the table still has the measurements
        print(f"# plan for {target} skipped: {e}", file=sys.stderr)
        return {}
    result = c.results[0]
    if not result.ok:
        print(f"# plan for {target} failed: {result.error}", file=sys.stderr)
        return {}
    peak = result.memory_rows()[1] / 2**20
    device = device_for(c.target, c.device_kind)
    if device is None:  # a local GPU without a shipped spec: its rates are unknown
        return {"peak_mib": peak, "step_ms": []}
    steps = [predict(result.programs, result.info, device, r).step_s for r in rates]
    return {"peak_mib": peak, "step_ms": [1000 * s for s in steps]}


def plan_target(name: str) -> str:
    """`auto`: the shipped spec of this machine's GPU, else h200."""
    if name != "auto":
        return name
    spec = plan_target_lib.for_device_kind(jax.devices()[0].device_kind)
    return spec.name if spec else "h200"


def loop_tokens_per_sec(cfg: C.Config, steps: int) -> float | None:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        cfg = C.from_dict(
            C.apply_overrides(
                C.to_dict_for_overrides(cfg),
                [
                    f"training.max_steps={steps}",
                    f"training.log_interval={max(steps // 10, 1)}",
                    "training.val_interval=0",
                    f"checkpoint.save_interval={steps}",
                ],
            )
        )
        if train(cfg, run) != 0:
            return None
        con = sqlite3.connect(run / "metrics.sqlite")
        rates = [r[0] for r in con.execute("SELECT tokens_per_sec FROM training_logs ORDER BY step") if r[0]]
        con.close()
    rates = rates[1:-1] if len(rates) > 3 else rates
    return statistics.median(rates) if rates else None


def main() -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.toml"))
    ap.add_argument("--set", action="append", default=[], help="override applied to every variant")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        help=f"NAME:key=value,... with config keys and optionally mask={'|'.join(MASK_KINDS)} (default: one, as configured)",
    )
    ap.add_argument("--mask", default="none", choices=list(MASK_KINDS), help="default masking of a variant")
    ap.add_argument("--steps", type=flag(COUNT), default=30)
    ap.add_argument("--loop-steps", type=flag(COUNT0), default=60, help="0 skips the training-loop measurement")
    ap.add_argument(
        "--corpus", default="synthetic", help="'synthetic', 'config' (the config's corpus) or a corpus path"
    )
    ap.add_argument("--out", type=Path, help="CSV file to write")
    ap.add_argument(
        "--plan-target",
        help="also compile each variant with `genesis_jax.plan` for this target (h100, h200, or auto: "
        "this GPU's) and report its predicted peak memory and step time beside the measured ones",
    )
    ap.add_argument(
        "--calibration",
        type=Path,
        help="with --plan-target: also predict with this calibration file (benchmarks/calibrate.py)",
    )
    args = ap.parse_args()

    base = list(args.set)
    if args.corpus == "synthetic":
        path = synthetic_corpus(Path(tempfile.gettempdir()) / "genesis_jax_bench_corpus")
        base.append(f"data.corpus={path}")
    elif args.corpus != "config":
        base.append(f"data.corpus={args.corpus}")
    variants = [v.split(":", 1) for v in args.variant] or [["default", ""]]
    device = jax.devices()[0]
    print(f"# {device.device_kind} ({jax.default_backend()}, {jax.device_count()} device(s)), jax {jax.__version__}")
    rows: list[dict[str, Any]] = []
    plans: dict[tuple[str, ...], dict[str, Any]] = {}
    rates = [Rates()] + ([load_calibration(args.calibration)[0]] if args.calibration else [])
    for name, sets in variants:
        items = [s for s in sets.split(",") if s]
        kind = next((i.split("=", 1)[1] for i in items if i.startswith("mask=")), args.mask)
        if kind not in MASK_KINDS:
            print(f"error: --variant {name}: mask={kind}: expected one of {', '.join(MASK_KINDS)}", file=sys.stderr)
            return 2
        overrides = base + [i for i in items if not i.startswith("mask=")]
        cfg = C.load(args.config, overrides)
        tokens = cfg.training.batch_size * cfg.training.grad_accum_steps * cfg.data.seq_len
        k = cfg.curriculum
        mask = MaskParams.make(
            kind,
            k.span_mask_prob if kind == "span" else k.wwm_mask_prob,
            k.span_min_len,
            k.span_max_len,
            cfg.data.mask_id,
        )
        if args.plan_target and tuple(overrides) not in plans:  # masks are step inputs: one program
            plans[tuple(overrides)] = planned(args.config, overrides, plan_target(args.plan_target), rates)
        plan = plans.get(tuple(overrides), {})
        r = bare_step(cfg, args.steps, mask)
        stats = device.memory_stats() or {}
        tps = tokens / (r["step_ms"] / 1000)
        loop = loop_tokens_per_sec(cfg, args.loop_steps) if args.loop_steps else None
        peak = peak_flops(device)
        m = cfg.model
        rows.append(
            {
                "variant": name,
                "model": f"{m.dim}d x {m.n_layers}L h{m.n_heads}/{m.n_kv_heads} ffn{m.intermediate_size}",
                "dtype": m.compute_dtype,
                "attention": m.attention,
                "mask": kind,
                "mesh": r["mesh"],
                "tokens_per_step": tokens,
                "compile_s": round(r["compile_s"], 2),
                "step_ms": round(r["step_ms"], 3),
                "step_vs_first": round(r["step_ms"] / rows[0]["step_ms"], 3) if rows else 1.0,
                "tokens_per_s": round(tps),
                "loop_tokens_per_s": round(loop) if loop else None,
                "loop_over_bare": round(loop / tps, 3) if loop else None,
                "mfu": round(tps * train_flops_per_token(m, cfg.data.seq_len) / (peak * jax.device_count()), 4)
                if peak
                else None,
                "temp_mib": round(r["temp_mib"], 1) if r["temp_mib"] else None,
                "state_mib_per_device": round(r["state_mib"], 3),  # params + optimizer state, measured from the shards
                # the device's peak is per process: only the first variant's is its own
                "peak_mib": round(stats["peak_bytes_in_use"] / 2**20, 1) if "peak_bytes_in_use" in stats else None,
                "plan_peak_mib": round(plan["peak_mib"], 1) if plan else None,
                "plan_step_ms": round(plan["step_ms"][0], 3) if plan.get("step_ms") else None,
                "plan_step_ms_calibrated": round(plan["step_ms"][1], 3) if len(plan.get("step_ms", [])) > 1 else None,
                "measured_over_plan": round(r["step_ms"] / plan["step_ms"][-1], 3) if plan.get("step_ms") else None,
            }
        )
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print(" | ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print(" | ".join(str(r[c]).ljust(widths[c]) for c in cols))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli("benchmarks/train_step.py", main, devices=True))  # mistakes and faults in one line

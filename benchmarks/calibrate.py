"""Measure, on this machine's GPU, the rates `python -m genesis_jax.plan` predicts speed with, and
write them as a calibration file for `plan --calibration FILE` (docs/plan.md, "Speed").

  PYTHONPATH=. python benchmarks/calibrate.py [--attention-csv DIR/attention.csv] --out calibration.json
  python benchmarks/calibrate.py --dry-run --out cal.json   # CPU: every path at tiny sizes

Measured: a large bf16 GEMM against the dense peak (gemm_efficiency); a streaming kernel against
the HBM bandwidth of the GPU's spec (hbm_efficiency); a chain of tiny kernels, timed per launch
(kernel_gap_s); the training loop of a tiny model, whose step time is then the host's work
(host_step_s); and, from benchmarks/attention.py's CSV, our kernels' forward and backward rates
per head_dim and length (attention_measured) and their share of FlashAttention-3's anchors at
head_dim >= 64 (attention_fraction). A dry run writes a file of the same form whose numbers are
this CPU's: it checks the code, not a GPU.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.synthetic import synthetic_corpus  # noqa: E402
from benchmarks.train_step import loop_tokens_per_sec  # noqa: E402
from genesis_jax import config as C  # noqa: E402
from genesis_jax.config.ranges import COUNT, flag  # noqa: E402
from genesis_jax.core.cli import ArgumentParser, run_cli  # noqa: E402
from genesis_jax.core.writing import write_file  # noqa: E402
from genesis_jax.plan import hlo, target as targets  # noqa: E402
from genesis_jax.plan.rates import FA3_BACKWARD, FA3_FORWARD, PEAK_BY_DTYPE, anchor  # noqa: E402

ENGINE_KERNELS = ("pallas", "mosaic")  # our kernels' backend names (genesis_jax/model/attention.py)
BACKWARD_MATMULS = 3.5  # dq + dkv kernels: 7 matmuls per score against the forward's 2 (plan/speed.py)


def timed(fn: Callable[..., Any], args: tuple[Any, ...], iters: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gemm_efficiency(n: int, dtype: Any, iters: int) -> tuple[float, float]:
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    t = timed(jax.jit(lambda x, y: x @ y), (a, b), iters)
    rate = 2.0 * n**3 / t
    return rate / PEAK_BY_DTYPE[jnp.dtype(dtype).name.replace("bfloat16", "bf16").replace("float32", "f32")], rate


def hbm_rate(elements: int, iters: int) -> float:
    x = jnp.ones((elements,), jnp.bfloat16)
    t = timed(jax.jit(lambda x: x * 2), (x,), iters)
    return 2 * x.nbytes / t  # read once, written once


def kernel_gap(chain: int, iters: int) -> tuple[float, float]:
    """Seconds per launch of a chain of tiny dependent kernels (launches counted in its HLO)."""

    def f(x: jax.Array, w: jax.Array) -> jax.Array:
        for _ in range(chain):
            x = jnp.tanh(x @ w)
        return x

    x = jnp.ones((8, 8), jnp.float32)
    fn = jax.jit(f)
    launches = hlo.profile(fn.lower(x, x).compile().as_text()).launches
    return timed(fn, (x, x), iters) / launches, launches


def host_step(steps: int) -> float:
    corpus = synthetic_corpus(Path(tempfile.gettempdir()) / "genesis_jax_bench_corpus")
    cfg = C.load(
        ROOT / "configs" / "tiny.toml",
        [
            f"data.corpus={corpus}",
            "model.dim=16",
            "model.n_heads=2",
            "model.n_layers=1",
            "data.seq_len=16",
            "training.batch_size=1",
        ],
    )
    tps = loop_tokens_per_sec(cfg, steps)
    if not tps:
        raise RuntimeError("the tiny training run failed")
    return 16 / tps


def attention_rates(path: Path) -> tuple[dict[str, float], dict[str, float]]:
    """Our kernels' measured rates by backend/direction/head_dim/seq, and their median share of
    FA3's anchor at head_dim >= 64 per direction."""
    rows = [r for r in csv.DictReader(path.open(encoding="utf-8")) if r["backend"] in ENGINE_KERNELS and r.get("ms")]
    by = {(r["backend"], r["name"], r["batch"], r["seq"], r["heads_q"], r["head_dim"], r["mode"]): r for r in rows}
    measured: dict[str, float] = {}
    shares: dict[str, list[float]] = {"forward": [], "backward": []}
    for (backend, name, batch, seq, heads, hd, mode), r in by.items():
        if mode != "fwd" or r.get("causal") != "True":
            continue
        both = by.get((backend, name, batch, seq, heads, hd, "fwd+bwd"))
        flops = 4.0 * int(batch) * int(heads) * int(seq) ** 2 * int(hd) / 2
        t_fwd = float(r["ms"]) / 1e3
        rates = {"forward": flops / t_fwd}
        if both:
            t_bwd = float(both["ms"]) / 1e3 - t_fwd
            if t_bwd > 0:
                rates["backward"] = BACKWARD_MATMULS * flops / t_bwd
        for direction, rate in rates.items():
            measured[f"{backend}/{direction}/{hd}/{seq}"] = rate
            if int(hd) >= 64 and backend == ENGINE_KERNELS[0]:
                table = FA3_FORWARD if direction == "forward" else FA3_BACKWARD
                shares[direction].append(rate / anchor(table, int(seq)))
    return measured, {d: statistics.median(v) for d, v in shares.items() if v}


def main() -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="calibration JSON to write")
    ap.add_argument("--attention-csv", type=Path, help="benchmarks/attention.py's attention.csv from this GPU")
    ap.add_argument("--iters", type=flag(COUNT), default=20)
    ap.add_argument("--loop-steps", type=flag(COUNT), default=300, help="steps of the tiny training run")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes, on whatever device is here")
    args = ap.parse_args()

    dev = jax.devices()[0]
    spec = targets.for_device_kind(dev.device_kind)
    if spec is None and not args.dry_run:
        print(
            f"error: no shipped target spec describes {dev.device_kind!r} (genesis_jax/plan/targets/): "
            "its HBM bandwidth is unknown",
            file=sys.stderr,
        )
        return 2
    reference = spec or targets.load("h200")
    small = args.dry_run
    eff, gemm = gemm_efficiency(256 if small else 8192, jnp.float32 if small else jnp.bfloat16, args.iters)
    hbm = hbm_rate(2**20 if small else 2**28, args.iters)
    gap, launches = kernel_gap(16 if small else 128, args.iters)
    host = host_step(20 if small else args.loop_steps)
    rates: dict[str, Any] = {
        "gemm_efficiency": eff,
        "hbm_efficiency": hbm / reference.memory_bandwidth,
        "kernel_gap_s": gap,
        "host_step_s": host,
    }
    notes = {
        "gemm_rate": gemm,
        "hbm_bytes_per_s": hbm,
        "hbm_spec_bytes_per_s": reference.memory_bandwidth,
        "gap_chain_launches": launches,
    }
    if args.attention_csv and not args.attention_csv.is_file():
        print(f"# no {args.attention_csv}: the attention rates stay uncalibrated", file=sys.stderr)
    elif args.attention_csv:
        measured, fraction = attention_rates(args.attention_csv)
        if measured:
            rates["attention_measured"] = measured
        if fraction:
            rates["attention_fraction"] = fraction
    device = dev.device_kind + (" (dry run: these are not a GPU's rates)" if small else "")
    doc = {
        "device": device,
        "jax": jax.__version__,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "rates": rates,
        "measured": notes,
    }
    write_file(args.out, json.dumps(doc, indent=1))
    print(f"# calibration on {device}, jax {jax.__version__} -> {args.out}")
    print(f"  gemm_efficiency {eff:.3f} ({gemm / 1e12:.1f} TFLOP/s)")
    print(
        f"  hbm_efficiency {rates['hbm_efficiency']:.3f} ({hbm / 1e9:.0f} GB/s of {reference.memory_bandwidth / 1e9:.0f})"
    )
    print(f"  kernel_gap_s {gap * 1e6:.2f} us ({launches:.0f} launches a call)")
    print(f"  host_step_s {host * 1e3:.3f} ms")
    for key, rate in sorted(rates.get("attention_measured", {}).items(), key=lambda kv: kv[0]):
        print(f"  attention {key}: {rate / 1e12:.1f} TFLOP/s")
    for direction, share in rates.get("attention_fraction", {}).items():
        print(f"  attention_fraction {direction} {share:.3f} of FA3's anchor")
    return 0 if all(math.isfinite(v) for v in (eff, hbm, gap, host)) else 1


if __name__ == "__main__":
    sys.exit(run_cli("benchmarks/calibrate.py", main, devices=True))

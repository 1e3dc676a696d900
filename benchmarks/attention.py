"""Attention kernels side by side: every backend the engine registers (genesis_jax/model/attention.py:
our Triton and Mosaic kernels, the XLA references, cuDNN), then baselines outside the engine:
JAX's own `dot_product_attention` (XLA), JAX's bundled Pallas `mha`, and PyTorch SDPA (flash,
cuDNN) in a separate process; on request, the Mosaic kernel's design variants. Forward and
forward+backward.

  PYTHONPATH=. python benchmarks/attention.py [--shapes model,paper] [--seqs 512,1024,2048,4096,8192]
      [--head-dims 64,128] [--backends ...] [--iters 20] [--out DIR] [--no-torch]
  PYTHONPATH=. python benchmarks/attention.py --sweep [--sweep-kernel pallas|mosaic] ...  # block sizes
  python benchmarks/attention.py --dry-run     # CPU: checks every path on tiny shapes, times nothing

Conventions: forward FLOPs = 4 * batch * heads_q * seq_q * seq_kv * head_dim, halved when
causal; forward+backward = 3.5x forward (the FlashAttention-2 convention: backward = 2.5x).
Each row is the median of `--iters` timed runs after warm-up, with fresh random inputs rotated
between runs; "% matmul" compares with a bf16 8192^3 matmul timed in the same process; the
error is the relative L2 error against a float32 XLA attention of the same inputs (for
forward+backward, the largest over dq, dk, dv). A backend that refuses a shape reports its
error message in place of a time.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from genesis_jax.config.ranges import COUNT, COUNT0, flag
from genesis_jax.core.cli import ArgumentParser, run_cli

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave room for the PyTorch process

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from genesis_jax.kernels.flash_attention import BlockSizes, flash_attention
from genesis_jax.kernels.reference import reference_attention
from genesis_jax.model import attention

SWEEP = [
    BlockSizes(bq, bk, bqb, bkb, num_warps=w, num_stages=st)
    for bq, bk in ((64, 64), (128, 64), (128, 128), (64, 32))
    for bqb, bkb in ((64, 64), (32, 64))
    for w, st in ((4, 2), (4, 3), (8, 2))
]


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    seq: int
    heads_q: int
    heads_kv: int
    head_dim: int
    causal: bool

    def fwd_flops(self) -> float:
        f = 4.0 * self.batch * self.heads_q * self.seq * self.seq * self.head_dim
        return f / 2 if self.causal else f


def model_shapes(seq: int = 512, tokens: int = 16384) -> list[Shape]:
    """Our presets' attention (and GQA variants) at `tokens` tokens per call."""
    b = max(tokens // seq, 1)
    out = []
    for name, heads, dim in [("microscope", 12, 288), ("deep_narrow_40", 12, 384), ("standard", 8, 512)]:
        d = dim // heads
        out.append(Shape(f"{name}", b, seq, heads, heads, d, True))
        out.append(Shape(f"{name}-gqa", b, seq, heads, heads // (4 if heads % 4 == 0 else 2), d, True))
    return out


def paper_shapes(
    seqs: list[int], head_dims: list[int], causal: list[bool], tokens: int = 16384, hidden: int = 2048
) -> list[Shape]:
    """The FlashAttention paper grid: 16k tokens per call, hidden 2048."""
    return [
        Shape("fa-grid", max(tokens // s, 1), s, hidden // d, hidden // d, d, c)
        for d in head_dims
        for c in causal
        for s in seqs
    ]


def engine_backends() -> dict[str, Callable[..., jax.Array]]:
    """The engine's registered backends (a new one appears here with no change to this script)."""

    def bind(b: attention.Backend) -> Callable[..., jax.Array]:
        return lambda q, k, v, causal: b.fn(q, k, v, causal=causal)

    return {name: bind(b) for name, b in attention.BACKENDS.items()}


def baselines() -> dict[str, Callable[..., jax.Array]]:
    def jax_xla(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool) -> jax.Array:
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")

    def bundled_mha(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool) -> jax.Array:
        with warnings.catch_warnings():  # deprecated from JAX 0.11.2 (for tokamax): still the baseline we compare with
            warnings.simplefilter("ignore", DeprecationWarning)
            from jax.experimental.pallas.ops.gpu import attention as mha_lib  # GPU-only module: imported when used

        group = q.shape[2] // k.shape[2]  # the bundled kernel is wrong for GQA: repeat KV heads
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
        return mha_lib.mha(
            q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=causal, interpret=jax.default_backend() != "gpu"
        )

    return {"jax_xla": jax_xla, "jax_mha": bundled_mha}


def mosaic_variants() -> dict[str, Callable[..., jax.Array]]:
    """The Mosaic kernel's design alternatives (kernels/README.md), to time beside its defaults."""
    from genesis_jax.kernels.mosaic.forward import MosaicBlocks, flash_attention_mgpu

    def bind(blocks: MosaicBlocks) -> Callable[..., jax.Array]:
        return lambda q, k, v, causal: flash_attention_mgpu(q, k, v, causal=causal, block_sizes=blocks)

    return {
        "mosaic_1wg": bind(MosaicBlocks(compute_wgs=1, compute_wgs_bwd=1)),
        "mosaic_1wg_bwd": bind(MosaicBlocks(compute_wgs_bwd=1)),
        "mosaic_no_pingpong": bind(MosaicBlocks(ping_pong=False)),
        "mosaic_p_smem": bind(MosaicBlocks(p_in_registers=False)),
    }


def rel(a: jax.Array, b: jax.Array) -> float:
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a64 - b64) / max(np.linalg.norm(b64), 1e-30))


def make_inputs(s: Shape, dtype: Any, n: int, seed: int = 0) -> list[tuple[jax.Array, ...]]:
    keys = jax.random.split(jax.random.key(seed), n)
    out = []
    for key in keys:
        kq, kk, kv, kd = jax.random.split(key, 4)
        q = jax.random.normal(kq, (s.batch, s.seq, s.heads_q, s.head_dim), dtype)
        k = jax.random.normal(kk, (s.batch, s.seq, s.heads_kv, s.head_dim), dtype)
        v = jax.random.normal(kv, (s.batch, s.seq, s.heads_kv, s.head_dim), dtype)
        do = jax.random.normal(kd, (s.batch, s.seq, s.heads_q, s.head_dim), dtype)
        out.append((q, k, v, do))
    return out


def timed(fn: Callable[..., Any], inputs: list[tuple[jax.Array, ...]], iters: int, warmup: int) -> float:
    for i in range(warmup):
        jax.block_until_ready(fn(*inputs[i % len(inputs)]))
    times = []
    for i in range(iters):
        args = inputs[i % len(inputs)]
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def references(s: Shape, inputs: list[tuple[jax.Array, ...]]) -> tuple[jax.Array, Any]:
    """Float32 XLA output and gradients for the first input set, computed once per shape."""
    q, k, v, do = inputs[0]

    def ref_loss(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        return jnp.sum(reference_attention(*f32, causal=s.causal) * do.astype(jnp.float32))

    out = jax.jit(lambda q, k, v: reference_attention(*(x.astype(jnp.float32) for x in (q, k, v)), causal=s.causal))(
        q, k, v
    )
    return out, jax.jit(jax.grad(ref_loss, argnums=(0, 1, 2)))(q, k, v)


def measure(
    name: str,
    attn: Callable[..., jax.Array],
    s: Shape,
    inputs: list[tuple[jax.Array, ...]],
    refs: tuple[jax.Array, Any],
    iters: int,
    warmup: int,
    do_time: bool,
) -> list[dict[str, Any]]:
    fwd = jax.jit(lambda q, k, v, do: attn(q, k, v, s.causal))

    def loss(q: jax.Array, k: jax.Array, v: jax.Array, do: jax.Array) -> jax.Array:
        return jnp.sum(attn(q, k, v, s.causal).astype(jnp.float32) * do.astype(jnp.float32))

    bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    rows = []
    for mode, fn, flops in (("fwd", fwd, s.fwd_flops()), ("fwd+bwd", bwd, 3.5 * s.fwd_flops())):
        row: dict[str, Any] = {"backend": name, "mode": mode, **asdict(s)}
        try:
            q, k, v, do = inputs[0]
            got = fn(q, k, v, do)
            if mode == "fwd":
                row["rel_err"] = rel(got, refs[0])
            else:
                row["rel_err"] = max(rel(a, b) for a, b in zip(got, refs[1]))
            if do_time:
                t = timed(fn, inputs, iters, warmup)
                row["ms"] = 1000 * t
                row["tflops"] = flops / t / 1e12
        except Exception as e:  # noqa: BLE001 - a refusal is a result
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        rows.append(row)
    return rows


def matmul_tflops(dtype: Any, n: int = 8192, iters: int = 20) -> float:
    a = jax.random.normal(jax.random.key(1), (n, n), dtype)
    b = jax.random.normal(jax.random.key(2), (n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    t = timed(f, [(a, b), (b, a)], iters, 3)
    return 2.0 * n**3 / t / 1e12


def torch_rows(shapes: list[Shape], iters: int) -> list[dict[str, Any]]:
    """PyTorch SDPA in its own process (it must not share the GPU allocator with JAX)."""
    script = ROOT / "benchmarks" / "attention_torch.py"
    try:
        r = subprocess.run(
            [sys.executable, str(script), json.dumps([asdict(s) for s in shapes]), str(iters)],
            capture_output=True,
            text=True,
            timeout=400,
        )
    except subprocess.TimeoutExpired:
        return [{"backend": "torch", "error": "timed out"}]
    if r.returncode != 0:
        return [{"backend": "torch", "error": (r.stderr.strip().splitlines() or ["failed"])[-1][:200]}]
    return json.loads(r.stdout)


COLS = [
    "backend",
    "mode",
    "name",
    "batch",
    "seq",
    "heads_q",
    "heads_kv",
    "head_dim",
    "causal",
    "ms",
    "tflops",
    "pct_matmul",
    "rel_err",
    "error",
]


def print_table(rows: list[dict[str, Any]]) -> None:
    fmt = {"ms": "{:.3f}", "tflops": "{:.1f}", "pct_matmul": "{:.1f}", "rel_err": "{:.1e}"}
    cells = [
        [(fmt[c].format(r[c]) if c in fmt and isinstance(r.get(c), float) else str(r.get(c, ""))) for c in COLS]
        for r in rows
    ]
    widths = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c) for i, c in enumerate(COLS)]
    widths[-1] = min(widths[-1], 60)
    print(" | ".join(c.ljust(w) for c, w in zip(COLS, widths)))
    for x in cells:
        print(" | ".join(v[:w].ljust(w) for v, w in zip(x, widths)))


def sweep_settings(kernel: str) -> list[tuple[str, Callable[..., jax.Array]]]:
    """(label, attention) for each block-size setting of `kernel` (pallas: SWEEP; mosaic: key
    tiles of 64 or 128, rings of 2 or 3 slots, dk/dv query steps of 32 or 64)."""
    if kernel == "pallas":
        return [
            (
                f"q{bs.block_q} k{bs.block_k} bq{bs.block_q_bwd} bk{bs.block_k_bwd} w{bs.num_warps} s{bs.num_stages}",
                lambda q, k, v, causal, bs=bs: flash_attention(q, k, v, causal=causal, block_sizes=bs),
            )
            for bs in SWEEP
        ]
    from genesis_jax.kernels.mosaic.forward import MosaicBlocks, flash_attention_mgpu

    out = []
    for bk, stages, bqk in ((64, 2, 32), (128, 2, 32), (64, 3, 32), (128, 3, 32), (64, 2, 64)):
        blocks = MosaicBlocks(block_k=bk, stages=stages, block_q_dkv=bqk)
        out.append(
            (
                f"k{bk} stages{stages} dkv{bqk}",
                lambda q, k, v, causal, b=blocks: flash_attention_mgpu(q, k, v, causal=causal, block_sizes=b),
            )
        )
    return out


def sweep_shapes(
    shapes: list[Shape], dtype: Any, settings: list[tuple[str, Callable[..., jax.Array]]], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """The fastest setting per shape and mode (the first that works, in a dry run)."""
    best: list[dict[str, Any]] = []
    for s in shapes:
        inputs = make_inputs(s, dtype, 1 if args.dry_run else 3)
        refs = references(s, inputs)
        for mode in ("fwd", "fwd+bwd"):
            results = []
            for label, fn in settings:
                row = [
                    r
                    for r in measure(args.sweep_kernel, fn, s, inputs, refs, args.iters, args.warmup, not args.dry_run)
                    if r["mode"] == mode
                ][0]
                if "error" not in row:
                    results.append((row.get("ms", 0.0), label, row))
            if results:
                ms, label, row = min(results, key=lambda x: x[0])
                best.append({**row, "block_sizes": label, "tried": len(results)})
        del inputs, refs
    return best


def sweep(shapes: list[Shape], dtype: Any, args: argparse.Namespace) -> int:
    """Block-size search for one of our kernels: the tables kernels/README.md keeps per shape."""
    settings = sweep_settings(args.sweep_kernel)[: args.sweep_limit or None]
    # GPU interpret mode deadlocks when one jitted program holds a Mosaic forward and backward
    # kernel (kernels/README.md): the dry run of the Mosaic sweep runs op by op.
    eager = args.dry_run and args.sweep_kernel == "mosaic"
    with jax.disable_jit() if eager else contextlib.nullcontext():
        best = sweep_shapes(shapes, dtype, settings, args)
    for r in best:
        t = f"{r['ms']:.3f} ms {r['tflops']:.1f} TFLOP/s" if "ms" in r else "untimed (dry run)"
        print(
            f"{r['mode']:8s} b{r['batch']} s{r['seq']} h{r['heads_q']}/{r['heads_kv']} d{r['head_dim']} "
            f"{'causal' if r['causal'] else 'full'}: best {r['block_sizes']} ({t}, err {r['rel_err']:.1e}, "
            f"{r['tried']} settings)"
        )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "attention_sweep.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLS + ["block_sizes", "tried"], extrasaction="ignore")
            w.writeheader()
            w.writerows(best)
    return 0


def main() -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="model,paper")
    ap.add_argument("--seqs", default="512,1024,2048,4096,8192")
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--causal", default="true,false", help="which masks of the paper grid")
    ap.add_argument(
        "--backends",
        default=",".join([*attention.BACKENDS, "jax_xla", "jax_mha"]),
        help="registered engine backends, baselines (jax_xla, jax_mha) and Mosaic kernel variants "
        "(mosaic_1wg, mosaic_1wg_bwd, mosaic_no_pingpong, mosaic_p_smem) to time",
    )
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--iters", type=flag(COUNT), default=20)
    ap.add_argument("--warmup", type=flag(COUNT0), default=3)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes, every path, no timing (CPU)")
    ap.add_argument("--out", type=Path)
    ap.add_argument(
        "--sweep",
        action="store_true",
        help="time one of our kernels with each of its block-size settings and print the best per shape and mode",
    )
    ap.add_argument(
        "--sweep-kernel",
        default="pallas",
        choices=["pallas", "mosaic"],
        help="the kernel --sweep tries (mosaic: bf16/fp16 on a Hopper GPU)",
    )
    ap.add_argument("--sweep-limit", type=flag(COUNT0), default=0, help="try only the first N settings (0 = all)")
    args = ap.parse_args()

    known = {**engine_backends(), **baselines(), **mosaic_variants()}
    unknown = [b for b in args.backends.split(",") if b not in known]
    if unknown:
        print(f"error: --backends: unknown {', '.join(unknown)} (known: {', '.join(known)})", file=sys.stderr)
        return 2
    on_gpu = jax.default_backend() == "gpu"
    dtype = jnp.dtype(args.dtype)
    if args.dry_run:
        shapes = [Shape("dry", 1, 40, 4, 2, 16, True), Shape("dry", 1, 32, 2, 2, 32, False)]
        dtype = jnp.float32
        if args.sweep and args.sweep_kernel == "mosaic":  # bf16/fp16 only; GPU interpret mode is slow
            shapes, dtype = shapes[:1], jnp.dtype(jnp.bfloat16)
    else:
        if not on_gpu:
            print(
                "error: timing needs a GPU (interpret-mode times are not kernel speeds); use --dry-run", file=sys.stderr
            )
            return 2
        wanted = set(args.shapes.split(","))
        shapes = (model_shapes() if "model" in wanted else []) + (
            paper_shapes(
                [int(x) for x in args.seqs.split(",")],
                [int(x) for x in args.head_dims.split(",")],
                [x.strip().lower() == "true" for x in args.causal.split(",")],
            )
            if "paper" in wanted
            else []
        )
    dev = jax.devices()[0]
    backends = {k: v for k, v in known.items() if k in args.backends.split(",")}
    # The Mosaic kernel takes bf16/fp16 only (its backend routes float32 elsewhere): a dry run
    # checks it at bf16 on the first shape, op by op, since GPU interpret mode deadlocks on one
    # jitted program holding its forward and backward.
    mosaic = {k: v for k, v in backends.items() if args.dry_run and k.startswith("mosaic")}
    dry = " (dry run; the Mosaic kernels in bfloat16 on the first shape)" if mosaic else " (dry run)" * args.dry_run
    print(f"# {dev.device_kind}, jax {jax.__version__}, {jnp.dtype(dtype).name}{dry}")
    peak = None if args.dry_run else matmul_tflops(dtype)
    if peak:
        print(f"# bf16 matmul 8192^3: {peak:.1f} TFLOP/s (same process)")
    if args.sweep:
        return sweep(shapes, dtype, args)
    # (dtype, shapes, backends, context) per pass
    passes = [(dtype, shapes, {k: v for k, v in backends.items() if k not in mosaic}, contextlib.nullcontext)]
    if mosaic:
        passes.append((jnp.dtype(jnp.bfloat16), shapes[:1], mosaic, jax.disable_jit))
    rows: list[dict[str, Any]] = []
    for pass_dtype, pass_shapes, pass_backends, context in passes:
        for s in pass_shapes:
            inputs = make_inputs(s, pass_dtype, 1 if args.dry_run else 3)
            refs = references(s, inputs)
            with context():
                for name, fn in pass_backends.items():
                    rows += measure(name, fn, s, inputs, refs, args.iters, args.warmup, do_time=not args.dry_run)
            del inputs, refs
    if not args.no_torch and not args.dry_run:
        rows += torch_rows(shapes, args.iters)
    for r in rows:
        if peak and isinstance(r.get("tflops"), float):
            r["pct_matmul"] = 100.0 * r["tflops"] / peak
    print_table(rows)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "attention.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    bad = [r for r in rows if r.get("backend") == "pallas" and "error" in r]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(run_cli("benchmarks/attention.py", main, devices=True))  # mistakes and faults in one line

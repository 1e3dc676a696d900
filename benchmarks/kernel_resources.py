"""Compile-time properties of the flash-attention kernel per block setting, for a GPU that is
absent: registers, spills, shared memory and resident blocks per SM of each kernel, compiled
for sm_90a through `genesis_jax.plan` (deviceless; needs the `plan` extra). No timing: this is
how the default block sizes are chosen until a GPU has timed them (kernels/README.md).

    python benchmarks/kernel_resources.py --head-dims 32,64,128 --dtypes bfloat16,float32 --out results/
"""

from __future__ import annotations

import argparse
import csv
import itertools
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from genesis_jax.config.ranges import COUNT, flag
from genesis_jax.core.cli import ArgumentParser, run_cli
from genesis_jax.plan.compile import run

FORWARD = [
    dict(block_q=bq, block_k=bk, num_warps=w, num_stages=s)
    for (bq, bk), (w, s) in itertools.product(
        [(64, 32), (64, 64), (128, 32), (128, 64), (128, 128)], [(4, 2), (4, 3), (8, 2), (8, 3)]
    )
]
BACKWARD = [
    dict(block_q_bwd=bq, block_k_bwd=bk, num_warps_bwd=w, num_stages_bwd=s)
    for (bq, bk), (w, s) in itertools.product(
        [(32, 32), (32, 64), (64, 32), (64, 64), (64, 128), (128, 64)], [(4, 2), (4, 3), (8, 2)]
    )
]
KERNELS = {"forward": ("genesis_flash_fwd",), "backward": ("genesis_flash_dq", "genesis_flash_dkv")}


def jobs_for(
    head_dim: int, dtype: str, seq: int, forward: list[dict[str, int]], backward: list[dict[str, int]]
) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(pass, setting, job): GQA 2:1, causal, with segments (the model's worst case)."""
    base = {
        "kind": "attention",
        "shape": [1, seq, seq, 8, 4, head_dim],
        "dtype": dtype,
        "causal": True,
        "segments": True,
    }
    out = [("forward", f, {**base, "backward": False, "block_sizes": f}) for f in forward]
    out += [("backward", b, {**base, "backward": True, "block_sizes": b}) for b in backward]
    return out


def choose(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The default rule: compiles, no kernel spills nor sits at the 255-register ceiling (a
    longer mask path, from padding, tips those into spilling); then at least two resident
    blocks per SM where any setting reaches it; then the largest tile; then fewer registers."""
    ok = [r for r in rows if r["ok"] and not r["spills"] and r["registers"] < 255]
    if not ok:
        return None
    best_occupancy = max(min(r["blocks_per_sm"], 2) for r in ok)
    ok = [r for r in ok if min(r["blocks_per_sm"], 2) == best_occupancy]
    return max(ok, key=lambda r: (r["tile"], -r["registers"]))


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--head-dims", default="32,64,128")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--seq", type=flag(COUNT), default=2048)
    ap.add_argument("--target", default="h200")
    ap.add_argument("--quick", action="store_true", help="two settings per pass (a smoke test)")
    ap.add_argument("--out", type=Path, help="directory for kernel_resources.csv")
    args = ap.parse_args(argv)
    forward, backward = (FORWARD[:2], BACKWARD[:2]) if args.quick else (FORWARD, BACKWARD)
    fields = [
        "dtype",
        "head_dim",
        "pass",
        "setting",
        "ok",
        "kernel",
        "registers",
        "spill_stores",
        "spill_loads",
        "shared_kib",
        "threads",
        "blocks_per_sm",
        "error",
    ]
    table: list[dict[str, Any]] = []
    for dtype, hd in itertools.product(args.dtypes.split(","), [int(x) for x in args.head_dims.split(",")]):
        plan = jobs_for(hd, dtype, args.seq, forward, backward)
        compiled = run([job for _, _, job in plan], args.target)
        summary: dict[str, list[dict[str, Any]]] = {"forward": [], "backward": []}
        for (kind, setting, _), result in zip(plan, compiled.results):
            bq, bk, warps, stages = setting.values()
            label = f"{bq}x{bk} w{warps} s{stages}"
            ks = [k for k in result.kernels() if k["name"] in KERNELS[kind]]
            for k in ks or [{}]:
                table.append(
                    {
                        "dtype": dtype,
                        "head_dim": hd,
                        "pass": kind,
                        "setting": label,
                        "ok": result.ok,
                        "kernel": k.get("name", ""),
                        "registers": k.get("registers"),
                        "spill_stores": k.get("spill_stores"),
                        "spill_loads": k.get("spill_loads"),
                        "shared_kib": None if k.get("shared_memory") is None else round(k["shared_memory"] / 1024, 1),
                        "threads": k.get("threads"),
                        "blocks_per_sm": k.get("blocks_per_sm"),
                        "error": result.error,
                    }
                )
            spills = any(k["spill_stores"] or k["spill_loads"] for k in ks)
            summary[kind].append(
                {
                    "ok": result.ok and len(ks) == len(KERNELS[kind]),
                    "spills": spills,
                    "setting": label,
                    "blocks_per_sm": min((k["blocks_per_sm"] or 0) for k in ks) if ks else 0,
                    "registers": max((k["registers"] or 0) for k in ks) if ks else 0,
                    "tile": bq * bk,
                }
            )
        for row in table[-sum(max(1, len(KERNELS[k])) for k, _, _ in plan) :]:
            print(
                f"{row['dtype']:>9} hd{row['head_dim']:<4} {row['pass']:<8} {row['setting']:<14} {row['kernel']:<18} "
                f"regs {row['registers']!s:>4} spill {row['spill_stores']!s:>6}/{row['spill_loads']!s:<6} "
                f"smem {row['shared_kib']!s:>6} KiB blocks/SM {row['blocks_per_sm']!s:>2} {row['error'][:60]}"
            )
        for kind in ("forward", "backward"):
            best = choose(summary[kind])
            print(
                f"chosen {dtype} hd{hd} {kind}: {best['setting'] if best else 'none compiles without spilling'}"
                + (f" (blocks/SM {best['blocks_per_sm']}, registers {best['registers']})" if best else "")
            )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "kernel_resources.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(table)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli("benchmarks/kernel_resources.py", main, devices=False))  # mistakes and faults in one line

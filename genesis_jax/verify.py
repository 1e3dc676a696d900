"""`python -m genesis_jax.verify`: is this machine ready to train?

Prints devices and versions, then for each registered attention backend (and `auto`): whether it is available, a tiny
model forward and backward against the `reference` backend (plain jnp attention), and a short timing. Exit 0 only if
every available check passes.
"""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

import jax

from .core.cli import ArgumentParser, run_cli
from .core.errors import UserError
from .core.writing import write_file
from .model import attention
from .model.verification import check_backend, versions


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m genesis_jax.verify", description=__doc__)
    ap.add_argument("--out", type=Path, help="also write the table as CSV")
    args = ap.parse_args(argv)
    return run_cli("genesis_jax.verify", lambda: verify(args.out))


def verify(out: Path | None) -> int:
    if out is not None and not out.parent.is_dir():  # refused before minutes of checks, not after
        raise UserError(f"--out {out}: directory {out.parent} does not exist")
    on_gpu = jax.default_backend() == "gpu"
    print(f"backend {jax.default_backend()}: {', '.join(f'{d.device_kind} ({d.platform})' for d in jax.devices())}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    preset, seq = ("small", 256) if on_gpu else ("test", 48)
    dtypes = ("float32", "bfloat16") if on_gpu else ("float32",)
    rows = [check_backend(b, d, preset, seq) for b in attention.names() for d in dtypes]
    cols = ["backend", "dtype", "status", "logits_rel_err", "max_grad_rel_err", "fwd_bwd_ms", "detail"]
    for r in rows:
        print(" | ".join(str(r.get(c, "")) for c in cols))
    if out is not None:
        text = io.StringIO(newline="")
        w = csv.DictWriter(text, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
        write_file(out, text.getvalue())
    failed = [r for r in rows if r["status"] == "FAIL"]
    print("all available checks passed" if not failed else f"{len(failed)} check(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

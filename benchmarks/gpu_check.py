"""Correctness on the accelerator: the model's forward and gradients with each attention
backend against the `xla` reference, in float32 and bf16. Exit 0 only if all pass.

  PYTHONPATH=. python benchmarks/gpu_check.py [--out results.csv]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from genesis_jax import config as C  # noqa: E402
from genesis_jax.errors import ConfigError  # noqa: E402
from genesis_jax.model import Llama, attention_backend  # noqa: E402

# Relative L2 error bounds (float32 accumulation in every backend).
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}


def rel(a: jax.Array, b: jax.Array) -> float:
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a64 - b64) / max(np.linalg.norm(b64), 1e-30))


def check(backend: str, dtype: str) -> dict[str, object]:
    cfg = C.from_dict({"model": {"preset": "small", "n_kv_heads": 2, "compute_dtype": dtype}})
    tokens = jnp.asarray(np.random.default_rng(0).integers(4, 260, size=(4, 256)), jnp.int32)
    try:
        fn = attention_backend(backend)
    except ConfigError as e:
        return {"backend": backend, "dtype": dtype, "status": f"unavailable: {e}"}
    ref = Llama(cfg.model, nnx.Rngs(0), attn_fn=attention_backend("xla"))
    test = Llama(cfg.model, nnx.Rngs(0), attn_fn=fn)

    def loss_and_grad(model: Llama) -> tuple[jax.Array, jax.Array, object]:
        g, p = nnx.split(model)

        def loss(params: object) -> jax.Array:
            logits = nnx.merge(g, params)(tokens)
            return -jnp.mean(jax.nn.log_softmax(logits)[:, :-1].reshape(-1, 260)[
                jnp.arange(tokens[:, 1:].size), tokens[:, 1:].reshape(-1)])

        out = jax.jit(lambda q: nnx.merge(g, q)(tokens))(p)
        val, grads = jax.jit(jax.value_and_grad(loss))(p)
        return out, val, grads

    try:
        out_r, loss_r, g_r = loss_and_grad(ref)
        out_t, loss_t, g_t = loss_and_grad(test)
    except Exception as e:  # noqa: BLE001 - a backend that refuses is a result, not a crash
        return {"backend": backend, "dtype": dtype, "status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    grad_err = max(rel(a, b) for a, b in zip(jax.tree.leaves(g_t), jax.tree.leaves(g_r)))
    out_err = rel(out_t, out_r)
    ok = out_err <= TOLERANCE[dtype] and grad_err <= TOLERANCE[dtype]
    return {"backend": backend, "dtype": dtype, "status": "pass" if ok else "FAIL", "logits_rel_err": f"{out_err:.2e}",
            "max_grad_rel_err": f"{grad_err:.2e}", "loss": f"{float(loss_t):.5f}", "loss_ref": f"{float(loss_r):.5f}"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, backend {jax.default_backend()}")
    rows = [check(b, d) for b in ("xla", "cudnn", "pallas", "auto") for d in ("float32", "bfloat16")]
    cols = ["backend", "dtype", "status", "logits_rel_err", "max_grad_rel_err", "loss", "loss_ref"]
    for r in rows:
        print(" | ".join(str(r.get(c, "")) for c in cols))
    if args.out:
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
    return 1 if any(r["status"] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Checking an attention backend on this machine: a tiny model's logits and every parameter
gradient against the `reference` backend, and a forward+backward time (`python -m genesis_jax.verify`)."""

from __future__ import annotations

import importlib.metadata
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpy.typing as npt
from flax import nnx

from .. import config as config_lib
from ..core.errors import ConfigError
from ..core.tokenizer import BYTE_OFFSET, VOCAB_SIZE
from . import attention
from .attention import Backend
from .llama import Llama

# Relative L2 error bounds for logits and every parameter gradient (float32 accumulation).
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorboard", "numpy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "missing"
    return out


def _rel(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a64 - b64) / max(np.linalg.norm(b64), 1e-30))


_REFERENCE: dict[tuple[str, str, int], tuple[jax.Array, Any]] = {}  # (dtype, preset, seq) -> xla logits, grads


def check_backend(backend: str, dtype: str, preset: str, seq: int) -> dict[str, Any]:
    """Model logits and gradients with `backend` against `xla`, plus a forward+backward time."""
    row: dict[str, Any] = {"backend": backend, "dtype": dtype}
    platform = jax.default_backend()
    try:
        chosen = attention.backend(backend, platform)
    except ConfigError as e:
        return {**row, "status": "unavailable", "detail": str(e)}
    cfg = config_lib.from_dict({"model": {"preset": preset, "n_kv_heads": 2, "compute_dtype": dtype}})
    tokens = jnp.asarray(np.random.default_rng(0).integers(BYTE_OFFSET, VOCAB_SIZE, size=(2, seq)), jnp.int32)

    def loss_and_grads(attn: Backend) -> tuple[jax.Array, jax.Array, Any, Callable[[], Any]]:
        g, params = nnx.split(Llama(cfg.model, nnx.Rngs(0), attn=attn))

        def loss(p: nnx.State) -> tuple[jax.Array, jax.Array]:
            logits = nnx.merge(g, p)(tokens)
            logp = jax.nn.log_softmax(logits[:, :-1])
            return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)), logits

        f = jax.jit(jax.value_and_grad(loss, has_aux=True))
        (val, logits), grads = f(params)
        return val, logits, grads, lambda: jax.block_until_ready(f(params))

    try:
        key = (dtype, preset, seq)
        if key not in _REFERENCE:  # one reference per setting, whatever the number of backends
            _REFERENCE[key] = loss_and_grads(attention.BACKENDS["reference"])[1:3]
        logits_r, grads_r = _REFERENCE[key]
        _, logits_t, grads_t, rerun = loss_and_grads(chosen)
        t0 = time.perf_counter()
        for _ in range(3):
            rerun()
        ms = (time.perf_counter() - t0) / 3 * 1000
    except Exception as e:  # noqa: BLE001 - a failing backend is a result
        return {
            **row,
            "status": "FAIL",
            "detail": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}",
        }
    out_err = _rel(logits_t, logits_r)
    grad_err = max(_rel(a, b) for a, b in zip(jax.tree.leaves(grads_t), jax.tree.leaves(grads_r)))
    ok = out_err <= TOLERANCE[dtype] and grad_err <= TOLERANCE[dtype]
    interp = f" ({chosen.name} emulated on {platform}: not a kernel speed)" if chosen.emulated(platform) else ""
    return {
        **row,
        "status": "pass" if ok else "FAIL",
        "logits_rel_err": f"{out_err:.2e}",
        "max_grad_rel_err": f"{grad_err:.2e}",
        "fwd_bwd_ms": f"{ms:.2f}",
        "detail": f"{preset} preset, 2 x {seq} tokens{interp}",
    }

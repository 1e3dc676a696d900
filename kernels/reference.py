"""Plain-jnp attention: the `xla` backend and the reference the Pallas kernel is checked against."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def reference_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    segment_ids: jax.Array | None = None,
    sm_scale: float | None = None,
    block_sizes: Any = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Softmax attention in `[batch, seq, heads, head_dim]` layout with float32 softmax.

    `k`/`v` may have fewer heads (grouped-query): query head h reads KV head
    h // (heads_q // heads_kv). A query with no visible key returns zeros. `block_sizes` and
    `interpret` are accepted for signature parity with the kernel and ignored.
    """
    del block_sizes, interpret
    b, sq, hq, d = q.shape
    skv, hkv = k.shape[1], k.shape[2]
    if k.shape != (b, skv, hkv, d) or v.shape != k.shape:
        raise ValueError(f"k and v must be [batch, seq_kv, heads_kv, {d}] like q's batch; got k {k.shape}, v {v.shape}")
    if hq % hkv:
        raise ValueError(f"heads_q = {hq} is not a multiple of heads_kv = {hkv}")
    scale = d**-0.5 if sm_scale is None else sm_scale
    group = hq // hkv
    qg = q.reshape(b, sq, hkv, group, d)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
    mask = jnp.ones((sq, skv), dtype=bool)
    if causal:
        mask = jnp.tril(mask, k=skv - sq)
    mask = jnp.broadcast_to(mask, (b, sq, skv))
    if segment_ids is not None:
        if segment_ids.shape != (b, sq) or sq != skv:
            raise ValueError(f"segment_ids must be [batch, seq] = {(b, sq)} for self-attention; got {segment_ids.shape}")
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    mask = mask[:, None, None]
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(mask, jnp.exp(s - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0.0, 1.0, denom)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(b, sq, hq, d).astype(q.dtype)

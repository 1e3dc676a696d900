"""Plain-jnp attention: the `xla` backend, its KV-cache decode, and the reference the Pallas
kernel is checked against."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def check_shapes(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
    b, _, hq, d = q.shape
    skv, hkv = k.shape[1], k.shape[2]
    if k.shape != (b, skv, hkv, d) or v.shape != k.shape:
        raise ValueError(f"k and v must be [batch, seq_kv, heads_kv, {d}] like q's batch; got k {k.shape}, v {v.shape}")
    if hq % hkv:
        raise ValueError(f"heads_q = {hq} is not a multiple of heads_kv = {hkv}")


def check_segments(q: jax.Array, k: jax.Array, segment_ids: jax.Array | None) -> None:
    b, sq = q.shape[:2]
    if segment_ids is not None and (segment_ids.shape != (b, sq) or sq != k.shape[1]):
        raise ValueError(f"segment_ids must be [batch, seq] = {(b, sq)} for self-attention; got {segment_ids.shape}")


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """Grouped-query softmax attention with a float32 softmax under `mask` `[batch, seq_q, seq_kv]`;
    a query with no visible key returns zeros."""
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    group = hq // hkv
    qg = q.reshape(b, sq, hkv, group, d)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(q.dtype), preferred_element_type=jnp.float32) * scale
    mask = mask[:, None, None]
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(mask, jnp.exp(s - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0.0, 1.0, denom)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(b, sq, hq, d).astype(q.dtype)


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
    check_shapes(q, k, v)
    b, sq, _, d = q.shape
    skv = k.shape[1]
    mask = jnp.ones((sq, skv), dtype=bool)
    if causal:
        mask = jnp.tril(mask, k=skv - sq)
    mask = jnp.broadcast_to(mask, (b, sq, skv))
    if segment_ids is not None:
        check_segments(q, k, segment_ids)
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return masked_attention(q, k, v, mask, d**-0.5 if sm_scale is None else sm_scale)


def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, start: jax.Array) -> jax.Array:
    """Causal attention of queries at positions `start..start+seq_q` over a KV cache
    `[batch, max_len, heads_kv, head_dim]` whose entries up to `start + seq_q` are filled."""
    check_shapes(q, k_cache, v_cache)
    b, sq, _, d = q.shape
    visible = jnp.arange(k_cache.shape[1])[None, :] <= (start + jnp.arange(sq))[:, None]  # [seq_q, max_len]
    return masked_attention(q, k_cache, v_cache, jnp.broadcast_to(visible, (b, *visible.shape)), d**-0.5)

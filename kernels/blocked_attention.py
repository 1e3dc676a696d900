"""Blocked softmax attention in plain XLA: the fast path off the GPU (the `xla` backend).

Queries are cut into blocks of `block_q` rows; under a causal mask block i only multiplies
the keys up to its last row, so about half the score matrix is never computed, and only the
blocks cut by the diagonal (or any block, with segments) build a mask. The backward is a
custom VJP that saves each row's log-sum-exp instead of the probabilities and recomputes them
block by block: memory O(seq * block_q) per head instead of O(seq^2), and no softmax backward
through XLA's generic transpose rules (the reference's backward costs 8x its forward on CPU).

Layout inside: `[batch, heads_kv, rows, head_dim]` with a group's query heads folded into the
rows (position-major), so every product is one dot batched over (batch, heads_kv).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from ..core.compat import add_into_prefix
from .reference import check_segments, check_shapes

DEFAULT_BLOCK_Q = 64


@dataclasses.dataclass(frozen=True)
class _Static:
    causal: bool
    scale: float
    block_q: int  # positions per block (each has `group` rows)
    group: int  # query heads per KV head


def _blocks(st: _Static, sq: int, skv: int) -> list[tuple[int, int, int, bool]]:
    """(first row, end row, keys seen, needs the causal mask) per query block."""
    out = []
    offset = skv - sq  # query row r sees keys <= r + offset
    for a in range(0, sq, st.block_q):
        e = min(sq, a + st.block_q)
        if not st.causal:
            out.append((a, e, skv, False))
            continue
        kend = max(0, min(skv, e + offset))
        out.append((a, e, kend, a + offset < kend - 1))
    return out


def _to_rows(x: jax.Array, hkv: int) -> jax.Array:
    """`[b, s, h, d]` -> `[b, hkv, s * group, d]`: row r is position r // group, head r % group
    of the KV head's group, so a block of positions is a contiguous block of rows."""
    b, s, h, d = x.shape
    return x.reshape(b, s, hkv, (h // hkv) * d).transpose(0, 2, 1, 3).reshape(b, hkv, s * (h // hkv), d)


def _from_rows(x: jax.Array, group: int) -> jax.Array:
    b, hkv, rows, d = x.shape
    return x.reshape(b, hkv, rows // group, group * d).transpose(0, 2, 1, 3).reshape(b, rows // group, hkv * group, d)


def _mask(a: int, e: int, kend: int, offset: int, group: int, causal: bool, seg: jax.Array | None) -> jax.Array | None:
    """Visible keys of positions a..e, broadcastable to the scores `[b, hkv, rows, kend]`."""
    mask = None
    if causal:
        rows = jnp.repeat(jnp.arange(a, e), group)[:, None] + offset
        mask = (rows >= jnp.arange(kend)[None, :])[None, None]
    if seg is not None:
        same = (jnp.repeat(seg[:, a:e], group, axis=1)[:, :, None] == seg[:, None, :kend])[:, None]
        mask = same if mask is None else mask & same
    return mask


def _scores(st: _Static, qb: jax.Array, k: jax.Array, mask: jax.Array | None) -> jax.Array:
    s = jnp.einsum("bhqd,bhkd->bhqk", qb, k, preferred_element_type=jnp.float32) * st.scale
    return s if mask is None else jnp.where(mask, s, -jnp.inf)


def _forward(
    st: _Static, q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """Output rows and each row's log-sum-exp (+inf for a row that sees nothing)."""
    b, hkv, rows, d = q.shape
    skv = k.shape[2]
    sq, g = rows // st.group, st.group
    outs, lses = [], []
    for a, e, kend, causal_cut in _blocks(st, sq, skv):
        if kend == 0:
            outs.append(jnp.zeros((b, hkv, (e - a) * g, d), q.dtype))
            lses.append(jnp.full((b, hkv, (e - a) * g), jnp.inf, jnp.float32))
            continue
        mask = _mask(a, e, kend, skv - sq, g, causal_cut, seg)
        s = _scores(st, q[:, :, a * g : e * g], k[:, :, :kend], mask)
        m = jnp.max(s, axis=-1, keepdims=True)
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        p = jnp.exp(s - m)
        denom = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v[:, :, :kend], preferred_element_type=jnp.float32)
        outs.append((o / jnp.where(denom == 0.0, 1.0, denom)).astype(q.dtype))
        lses.append(jnp.where(denom[..., 0] == 0.0, jnp.inf, m[..., 0] + jnp.log(denom[..., 0])))
    return jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2)


def _backward(
    st: _Static,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    seg: jax.Array | None,
    o: jax.Array,
    lse: jax.Array,
    do: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """dk and dv are accumulated transposed, `[b, hkv, d, skv]`: XLA:CPU multiplies
    `do^T @ p` about twice as fast as `p^T @ do`, whose contraction runs over the scores' rows."""
    g, skv = st.group, k.shape[2]
    sq = q.shape[2] // g
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
    dqs = []
    dkt = jnp.zeros((*k.shape[:2], k.shape[3], skv), jnp.float32)
    dvt = jnp.zeros_like(dkt)
    for a, e, kend, causal_cut in _blocks(st, sq, skv):
        r0, r1 = a * g, e * g
        if kend == 0:
            dqs.append(jnp.zeros(q[:, :, r0:r1].shape, jnp.float32))
            continue
        qb, dob, kb, vb = q[:, :, r0:r1], do[:, :, r0:r1], k[:, :, :kend], v[:, :, :kend]
        s = _scores(st, qb, kb, _mask(a, e, kend, skv - sq, g, causal_cut, seg))
        p = jnp.exp(s - lse[:, :, r0:r1, None])
        dvt = add_into_prefix(
            dvt, jnp.einsum("bhqd,bhqk->bhdk", dob, p.astype(do.dtype), preferred_element_type=jnp.float32)
        )
        dp = jnp.einsum("bhqd,bhkd->bhqk", dob, vb, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, :, r0:r1, None]) * st.scale
        dqs.append(jnp.einsum("bhqk,bhkd->bhqd", ds.astype(kb.dtype), kb, preferred_element_type=jnp.float32))
        dkt = add_into_prefix(
            dkt, jnp.einsum("bhqd,bhqk->bhdk", qb, ds.astype(qb.dtype), preferred_element_type=jnp.float32)
        )
    dk, dv = (jnp.swapaxes(x, 2, 3) for x in (dkt, dvt))
    return jnp.concatenate(dqs, axis=2).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(st: _Static, q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array | None) -> jax.Array:
    return _forward(st, q, k, v, seg)[0]


def _attend_fwd(
    st: _Static, q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array | None
) -> tuple[jax.Array, tuple[Any, ...]]:
    o, lse = _forward(st, q, k, v, seg)
    return o, (q, k, v, seg, o, lse)


def _attend_bwd(st: _Static, res: tuple[Any, ...], do: jax.Array) -> tuple[Any, ...]:
    q, k, v, seg, o, lse = res
    return (*_backward(st, q, k, v, seg, o, lse, do), None)


_attend.defvjp(_attend_fwd, _attend_bwd)


def blocked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    segment_ids: jax.Array | None = None,
    sm_scale: float | None = None,
    block_q: int = DEFAULT_BLOCK_Q,
    block_sizes: Any = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Softmax attention with the signature and semantics of `reference_attention` (float32
    softmax, grouped-query heads, a row with no visible key gives zeros); differentiable with a
    memory-efficient backward. `block_sizes` and `interpret` are accepted for signature parity
    with the Pallas kernel and ignored."""
    del block_sizes, interpret
    check_shapes(q, k, v)
    check_segments(q, k, segment_ids)
    if block_q < 1:
        raise ValueError(f"block_q must be positive; got {block_q}")
    d, hkv = q.shape[3], k.shape[2]
    group = q.shape[2] // hkv
    st = _Static(causal, d**-0.5 if sm_scale is None else float(sm_scale), block_q, group)
    o = _attend(st, _to_rows(q, hkv), _to_rows(k, hkv), _to_rows(v, hkv), segment_ids)
    return _from_rows(o, group)

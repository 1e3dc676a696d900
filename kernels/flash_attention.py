"""Fused flash attention in Pallas (Triton lowering): forward, and a custom VJP whose dq and
dk/dv passes are Pallas kernels too. Layout `[batch, seq, heads, head_dim]`.

Design (see kernels/README.md): the grid runs over (query block, batch, head) in the forward
and dq passes and over (key block, batch, KV head) in the dk/dv pass, which loops over the
query heads of its group inside; each program loops over the other sequence axis with online
softmax in float32, skipping blocks that a causal mask hides entirely and computing no mask on
the blocks it sees whole. Any length works: sequences are padded to the block size in the
wrapper and padded keys are masked inside the kernel. Softmax runs in base 2 (exp2 with log2(e) folded
into the scale); the forward saves each row's base-2 max and log2 sum for the backward.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .platform import target_platform

LOG2E = math.log2(math.e)
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: masked rows never give inf - inf
EMPTY_ROW_LSE = 1e30  # log2-sum of a row with no visible key: every recomputed p becomes 0
SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
MAX_HEAD_DIM = 256


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (each capped at the power-of-two rounded sequence length) and Triton's
    compiler parameters, for the forward kernel and for the two backward kernels apart."""

    block_q: int = 64
    block_k: int = 64
    block_q_bwd: int = 64
    block_k_bwd: int = 64
    num_warps: int = 4
    num_stages: int = 2
    num_warps_bwd: int | None = None  # None: as the forward
    num_stages_bwd: int | None = None

    @staticmethod
    def for_head_dim(head_dim: int, dtype: Any = jnp.bfloat16) -> BlockSizes:
        """The default per (padded) head dim and input dtype: chosen from compile properties on
        sm_90a, not from timings (kernels/README.md, "Block sizes")."""
        table = DEFAULT_BLOCKS_F32 if jnp.dtype(dtype) == jnp.float32 else DEFAULT_BLOCKS
        return next(blocks for limit, blocks in table if head_dim <= limit)


# (largest padded head_dim, setting), from benchmarks/kernel_resources.py on sm_90a: no kernel
# spills (nor sits at the 255-register ceiling, where a longer mask path tips it over), two
# resident blocks per SM where any setting reaches it, then the largest tile.
DEFAULT_BLOCKS = (
    (32, BlockSizes(128, 64, 64, 64, num_warps=8, num_stages=2, num_warps_bwd=4, num_stages_bwd=2)),
    (64, BlockSizes(128, 64, 64, 64, num_warps=8, num_stages=3, num_warps_bwd=4, num_stages_bwd=2)),
    (128, BlockSizes(64, 64, 64, 32, num_warps=4, num_stages=3, num_warps_bwd=4, num_stages_bwd=3)),
    (MAX_HEAD_DIM, BlockSizes(64, 32, 32, 16, num_warps=4, num_stages=2, num_warps_bwd=4, num_stages_bwd=1)),
)
# float32 dots run at full precision (no TF32): every product is an FMA loop, so tiles are smaller.
# Above head_dim 64 the backward settings are those without spills under both JAX 0.10's and
# JAX 0.12's Triton (the earlier 32x16 / 8-warp dk/dv spilled 4 to 12 bytes under 0.12).
DEFAULT_BLOCKS_F32 = (
    (32, BlockSizes(64, 32, 32, 32, num_warps=8, num_stages=3, num_warps_bwd=8, num_stages_bwd=2)),
    (64, BlockSizes(64, 32, 32, 32, num_warps=8, num_stages=3, num_warps_bwd=8, num_stages_bwd=2)),
    (128, BlockSizes(32, 32, 16, 16, num_warps=8, num_stages=2, num_warps_bwd=4, num_stages_bwd=1)),
    (MAX_HEAD_DIM, BlockSizes(32, 16, 16, 16, num_warps=8, num_stages=2, num_warps_bwd=16, num_stages_bwd=1)),
)


def _fit(block: int, seq: int) -> int:
    return max(16, min(block, pl.next_power_of_2(seq)))


def _mask(
    q_pos: jax.Array,
    k_pos: jax.Array,
    kv_len: int,
    causal_offset: int | None,
    q_seg: jax.Array | None,
    k_seg: jax.Array | None,
) -> jax.Array:
    """Visible (query, key) pairs of a tile: real keys, causal order, same segment."""
    mask = (k_pos < kv_len)[None, :]
    if causal_offset is not None:
        mask = mask & (q_pos[:, None] + causal_offset >= k_pos[None, :])
    if q_seg is not None and k_seg is not None:
        mask = mask & (q_seg[:, None] == k_seg[None, :])
    return mask


def _dot(a: jax.Array, b: jax.Array, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    """a @ b with float32 accumulation; float32 inputs stay exact (no TF32)."""
    ca = (0,) if trans_a else (a.ndim - 1,)
    cb = (b.ndim - 1,) if trans_b else (0,)
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, ((ca, cb), ((), ())), precision=precision, preferred_element_type=jnp.float32)


def _kv_blocks_seen(
    iq: jax.Array, block_q: int, block_k: int, n_kv_blocks: int, causal_offset: int | None
) -> jax.Array | int:
    """Key blocks query block `iq` must read: all of them, or under `causal` only up to its last
    visible key (block skipping: later key blocks are never loaded)."""
    if causal_offset is None:
        return n_kv_blocks
    last = lax.div((iq + 1) * block_q + causal_offset + block_k - 1, block_k)
    return jnp.maximum(jnp.minimum(n_kv_blocks, last), 0)


def _kv_blocks_whole(
    iq: jax.Array, block_q: int, block_k: int, kv_len: int, causal_offset: int | None, hi: jax.Array | int
) -> jax.Array | int:
    """Leading key blocks that every query of block `iq` sees in full (real keys, not cut by
    the causal diagonal): their tiles need no mask. Only without segments."""
    real = kv_len // block_k  # key blocks with no padded key (never more than `hi`)
    if causal_offset is None:
        return real
    # key block j is whole when its last key (j + 1) * block_k - 1 <= the block's first query + offset
    whole = lax.div(jnp.maximum(iq * block_q + causal_offset + 1, 0), block_k)
    return jnp.minimum(jnp.minimum(whole, real), hi)


def _fwd_kernel(
    *refs: Any,
    sm_scale: float,
    causal_offset: int | None,
    kv_len: int,
    block_q: int,
    block_k: int,
    n_kv_blocks: int,
    has_segments: bool,
) -> None:
    if has_segments:
        q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, m_ref, ll_ref = refs
    else:
        q_ref, k_ref, v_ref, o_ref, m_ref, ll_ref = refs
        qseg_ref = kseg_ref = None
    iq = pl.program_id(0)
    q = q_ref[...]
    q_pos = iq * block_q + jnp.arange(block_q)
    q_seg = qseg_ref[...] if qseg_ref is not None else None
    scale = sm_scale * LOG2E

    Carry = tuple[jax.Array, jax.Array, jax.Array]

    def body(j: jax.Array, carry: Carry, masked: bool) -> Carry:
        acc, m_prev, l_prev = carry
        ks = pl.ds(j * block_k, block_k)
        k, v = k_ref[ks, :], v_ref[ks, :]
        s = _dot(q, k, trans_b=True) * scale
        if masked:
            k_seg = kseg_ref[ks] if kseg_ref is not None else None
            visible = _mask(q_pos, j * block_k + jnp.arange(block_k), kv_len, causal_offset, q_seg, k_seg)
            s = jnp.where(visible, s, MASK_VALUE)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=-1))
        p = jnp.exp2(s - m_next[:, None])
        if masked:
            p = jnp.where(visible, p, 0.0)
        corr = jnp.exp2(m_prev - m_next)
        acc = acc * corr[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_next, l_prev * corr + jnp.sum(p, axis=-1)

    hi = _kv_blocks_seen(iq, block_q, block_k, n_kv_blocks, causal_offset)
    whole = 0 if has_segments else _kv_blocks_whole(iq, block_q, block_k, kv_len, causal_offset, hi)
    acc0 = jnp.zeros((block_q, q.shape[-1]), jnp.float32)
    m0 = jnp.full((block_q,), -jnp.inf, jnp.float32)
    carry = lax.fori_loop(
        0, whole, functools.partial(body, masked=False), (acc0, m0, jnp.zeros((block_q,), jnp.float32))
    )
    acc, m, l = lax.fori_loop(whole, hi, functools.partial(body, masked=True), carry)
    empty = l == 0.0
    o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
    # The row max and log2 of the sum are kept apart: at large logits one float32 lse = m + log2(l)
    # would round away the precision that exp2((s - m) - log2(l)) keeps in the backward pass.
    m_ref[...] = jnp.where(empty, 0.0, m)
    ll_ref[...] = jnp.where(empty, EMPTY_ROW_LSE, jnp.log2(jnp.where(empty, 1.0, l)))


def _dq_kernel(
    *refs: Any,
    sm_scale: float,
    causal_offset: int | None,
    kv_len: int,
    block_q: int,
    block_k: int,
    n_kv_blocks: int,
    has_segments: bool,
) -> None:
    if has_segments:
        q_ref, k_ref, v_ref, do_ref, m_ref, ll_ref, delta_ref, qseg_ref, kseg_ref, dq_ref = refs
    else:
        q_ref, k_ref, v_ref, do_ref, m_ref, ll_ref, delta_ref, dq_ref = refs
        qseg_ref = kseg_ref = None
    iq = pl.program_id(0)
    q, do = q_ref[...], do_ref[...]
    m, ll, delta = m_ref[...], ll_ref[...], delta_ref[...]
    q_pos = iq * block_q + jnp.arange(block_q)
    q_seg = qseg_ref[...] if qseg_ref is not None else None
    scale = sm_scale * LOG2E

    def body(j: jax.Array, dq: jax.Array, masked: bool) -> jax.Array:
        ks = pl.ds(j * block_k, block_k)
        k, v = k_ref[ks, :], v_ref[ks, :]
        p = jnp.exp2((_dot(q, k, trans_b=True) * scale - m[:, None]) - ll[:, None])
        if masked:
            k_seg = kseg_ref[ks] if kseg_ref is not None else None
            p = jnp.where(_mask(q_pos, j * block_k + jnp.arange(block_k), kv_len, causal_offset, q_seg, k_seg), p, 0.0)
        ds = p * (_dot(do, v, trans_b=True) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    hi = _kv_blocks_seen(iq, block_q, block_k, n_kv_blocks, causal_offset)
    whole = 0 if has_segments else _kv_blocks_whole(iq, block_q, block_k, kv_len, causal_offset, hi)
    dq = lax.fori_loop(0, whole, functools.partial(body, masked=False), jnp.zeros(q.shape, jnp.float32))
    dq = lax.fori_loop(whole, hi, functools.partial(body, masked=True), dq)
    dq_ref[...] = (dq * sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(
    *refs: Any,
    sm_scale: float,
    causal_offset: int | None,
    kv_len: int,
    block_q: int,
    block_k: int,
    n_q_blocks: int,
    group: int,
    has_segments: bool,
) -> None:
    """One key block of one KV head: loops over the `group` query heads that read it, then over
    their query blocks, so dK/dV are summed in registers (no per-query-head partials)."""
    if has_segments:
        q_ref, k_ref, v_ref, do_ref, m_ref, ll_ref, delta_ref, qseg_ref, kseg_ref, dk_ref, dv_ref = refs
    else:
        q_ref, k_ref, v_ref, do_ref, m_ref, ll_ref, delta_ref, dk_ref, dv_ref = refs
        qseg_ref = kseg_ref = None
    jk = pl.program_id(0)
    k, v = k_ref[...], v_ref[...]
    k_pos = jk * block_k + jnp.arange(block_k)
    k_seg = kseg_ref[...] if kseg_ref is not None else None
    scale = sm_scale * LOG2E
    Carry = tuple[jax.Array, jax.Array]

    def body(i: jax.Array, carry: Carry, hh: jax.Array, masked: bool) -> Carry:
        dk, dv = carry
        qs = pl.ds(i * block_q, block_q)
        q, do = q_ref[qs, hh, :], do_ref[qs, hh, :]
        m, ll, delta = m_ref[hh, qs], ll_ref[hh, qs], delta_ref[hh, qs]
        p = jnp.exp2((_dot(q, k, trans_b=True) * scale - m[:, None]) - ll[:, None])
        if masked:
            q_seg = qseg_ref[qs] if qseg_ref is not None else None
            p = jnp.where(_mask(i * block_q + jnp.arange(block_q), k_pos, kv_len, causal_offset, q_seg, k_seg), p, 0.0)
        dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
        ds = p * (_dot(do, v, trans_b=True) - delta[:, None])
        dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    lo: jax.Array | int = 0
    whole: jax.Array | int = 0  # the first query block that sees this key block whole
    if causal_offset is not None:  # queries before this key block cannot see it
        lo = jnp.minimum(jnp.maximum(lax.div(jk * block_k - causal_offset, block_q), 0), n_q_blocks)
        first = jnp.maximum((jk + 1) * block_k - 1 - causal_offset, 0)
        whole = jnp.minimum(jnp.maximum(lax.div(first + block_q - 1, block_q), lo), n_q_blocks)
    if has_segments:  # any tile may cut a segment
        whole = n_q_blocks
    else:  # a key block holding padded keys is masked throughout
        padded = ((jk + 1) * block_k > kv_len).astype(jnp.int32)
        whole = whole + (n_q_blocks - whole) * padded

    def head(hh: jax.Array, carry: Carry) -> Carry:
        carry = lax.fori_loop(lo, whole, functools.partial(body, hh=hh, masked=True), carry)
        return lax.fori_loop(whole, n_q_blocks, functools.partial(body, hh=hh, masked=False), carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, group, head, (zeros, zeros))
    dk_ref[...] = (dk * sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


@dataclasses.dataclass(frozen=True)
class _Static:
    """Hashable static configuration of one call, with block sizes fitted to its lengths."""

    causal: bool
    sm_scale: float
    interpret: bool
    seq_q: int
    seq_kv: int
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    num_warps: int
    num_stages: int
    num_warps_bwd: int
    num_stages_bwd: int


def _pad_seq(x: jax.Array, length: int, value: Any = 0) -> jax.Array:
    pad = length - x.shape[1]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _common(st: _Static, q: jax.Array, k: jax.Array, block_q: int, block_k: int) -> dict[str, Any]:
    b, sq_p, hq, d = q.shape
    skv_p, hkv = k.shape[1], k.shape[2]
    return dict(
        b=b,
        hq=hq,
        d=d,
        group=hq // hkv,
        nq=sq_p // block_q,
        nk=skv_p // block_k,
        sq_p=sq_p,
        skv_p=skv_p,
        offset=(st.seq_kv - st.seq_q) if st.causal else None,
    )


def _params(st: _Static, backward: bool = False) -> Any:
    if st.interpret:
        return None
    if backward:
        return plgpu.CompilerParams(num_warps=st.num_warps_bwd, num_stages=st.num_stages_bwd)
    return plgpu.CompilerParams(num_warps=st.num_warps, num_stages=st.num_stages)


def _forward(
    st: _Static, q: jax.Array, k: jax.Array, v: jax.Array, qseg: jax.Array | None, kseg: jax.Array | None
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Padded inputs -> (output [B, Sq_p, Hq, D], (base-2 row max, log2 row sum) [B, Hq, Sq_p])."""
    bq, bk = st.block_q, st.block_k
    c = _common(st, q, k, bq, bk)
    g = c["group"]
    in_specs = [
        pl.BlockSpec((None, bq, None, c["d"]), lambda i, b, h: (b, i, h, 0)),
        pl.BlockSpec((None, c["skv_p"], None, c["d"]), lambda i, b, h: (b, 0, h // g, 0)),
        pl.BlockSpec((None, c["skv_p"], None, c["d"]), lambda i, b, h: (b, 0, h // g, 0)),
    ]
    args = [q, k, v]
    if qseg is not None:
        in_specs += [
            pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
            pl.BlockSpec((None, c["skv_p"]), lambda i, b, h: (b, 0)),
        ]
        args += [qseg, kseg]
    kernel = functools.partial(
        _fwd_kernel,
        sm_scale=st.sm_scale,
        causal_offset=c["offset"],
        kv_len=st.seq_kv,
        block_q=bq,
        block_k=bk,
        n_kv_blocks=c["nk"],
        has_segments=qseg is not None,
    )
    stats = jax.ShapeDtypeStruct((c["b"], c["hq"], c["sq_p"]), jnp.float32)
    stats_spec = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    o, m, ll = pl.pallas_call(
        kernel,
        grid=(c["nq"], c["b"], c["hq"]),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, bq, None, c["d"]), lambda i, b, h: (b, i, h, 0)), stats_spec, stats_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), stats, stats],
        compiler_params=_params(st),
        interpret=st.interpret,
        name="genesis_flash_fwd",
    )(*args)
    return o, (m, ll)


def _backward(
    st: _Static,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    qseg: jax.Array | None,
    kseg: jax.Array | None,
    o: jax.Array,
    stats: tuple[jax.Array, jax.Array],
    do: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    bq, bk = st.block_q_bwd, st.block_k_bwd
    c = _common(st, q, k, bq, bk)
    g, d = c["group"], c["d"]
    delta = jnp.einsum("bshd,bshd->bhs", o.astype(jnp.float32), do.astype(jnp.float32))
    seg = qseg is not None
    common = dict(
        sm_scale=st.sm_scale, causal_offset=c["offset"], kv_len=st.seq_kv, block_q=bq, block_k=bk, has_segments=seg
    )

    # dq: one program per (query block, batch, query head), looping over key blocks.
    specs = [
        pl.BlockSpec((None, bq, None, d), lambda i, b, h: (b, i, h, 0)),
        pl.BlockSpec((None, c["skv_p"], None, d), lambda i, b, h: (b, 0, h // g, 0)),
        pl.BlockSpec((None, c["skv_p"], None, d), lambda i, b, h: (b, 0, h // g, 0)),
        pl.BlockSpec((None, bq, None, d), lambda i, b, h: (b, i, h, 0)),
        pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
        pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
        pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
    ]
    args = [q, k, v, do, *stats, delta]
    if seg:
        specs += [
            pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
            pl.BlockSpec((None, c["skv_p"]), lambda i, b, h: (b, 0)),
        ]
        args += [qseg, kseg]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, n_kv_blocks=c["nk"], **common),
        grid=(c["nq"], c["b"], c["hq"]),
        in_specs=specs,
        out_specs=pl.BlockSpec((None, bq, None, d), lambda i, b, h: (b, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(st, backward=True),
        interpret=st.interpret,
        name="genesis_flash_dq",
    )(*args)

    # dk, dv: one program per (key block, batch, KV head), looping over the query heads of its
    # group inside (no atomics, no per-query-head partials).
    specs = [
        pl.BlockSpec((None, c["sq_p"], g, d), lambda j, b, h: (b, 0, h, 0)),
        pl.BlockSpec((None, bk, None, d), lambda j, b, h: (b, j, h, 0)),
        pl.BlockSpec((None, bk, None, d), lambda j, b, h: (b, j, h, 0)),
        pl.BlockSpec((None, c["sq_p"], g, d), lambda j, b, h: (b, 0, h, 0)),
        pl.BlockSpec((None, g, c["sq_p"]), lambda j, b, h: (b, h, 0)),
        pl.BlockSpec((None, g, c["sq_p"]), lambda j, b, h: (b, h, 0)),
        pl.BlockSpec((None, g, c["sq_p"]), lambda j, b, h: (b, h, 0)),
    ]
    args = [q, k, v, do, *stats, delta]
    if seg:
        specs += [
            pl.BlockSpec((None, c["sq_p"]), lambda j, b, h: (b, 0)),
            pl.BlockSpec((None, bk), lambda j, b, h: (b, j)),
        ]
        args += [qseg, kseg]
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, n_q_blocks=c["nq"], group=g, **common),
        grid=(c["nk"], c["b"], c["hq"] // g),
        in_specs=specs,
        out_specs=[pl.BlockSpec((None, bk, None, d), lambda j, b, h: (b, j, h, 0))] * 2,
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(st, backward=True),
        interpret=st.interpret,
        name="genesis_flash_dkv",
    )(*args)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(
    st: _Static, q: jax.Array, k: jax.Array, v: jax.Array, qseg: jax.Array | None, kseg: jax.Array | None
) -> jax.Array:
    return _forward(st, q, k, v, qseg, kseg)[0]


def _flash_fwd(
    st: _Static, q: jax.Array, k: jax.Array, v: jax.Array, qseg: jax.Array | None, kseg: jax.Array | None
) -> tuple[jax.Array, tuple[Any, ...]]:
    o, stats = _forward(st, q, k, v, qseg, kseg)
    return o, (q, k, v, qseg, kseg, o, stats)


def _flash_bwd(st: _Static, res: tuple[Any, ...], do: jax.Array) -> tuple[Any, ...]:
    q, k, v, qseg, kseg, o, stats = res
    dq, dk, dv = _backward(st, q, k, v, qseg, kseg, o, stats, do)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _check(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None) -> None:
    if q.ndim != 4:
        raise ValueError(f"q must be [batch, seq_q, heads_q, head_dim]; got shape {q.shape}")
    if k.ndim != 4 or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(
            f"k must be [batch, seq_kv, heads_kv, head_dim] = [{q.shape[0]}, *, *, {q.shape[3]}]; got {k.shape}"
        )
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {k.shape}; got {v.shape}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"heads_q = {q.shape[2]} must be a multiple of heads_kv = {k.shape[2]} (k)")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name}: dtype {x.dtype} not supported (float32, bfloat16, float16)")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"q: head_dim {q.shape[3]} > {MAX_HEAD_DIM} is not supported")
    if segment_ids is not None:
        if q.shape[1] != k.shape[1]:
            raise ValueError("segment_ids: only for self-attention (seq_q == seq_kv)")
        if segment_ids.shape != q.shape[:2]:
            raise ValueError(f"segment_ids must be [batch, seq] = {q.shape[:2]}; got {segment_ids.shape}")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids: expected an integer dtype, got {segment_ids.dtype}")


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    segment_ids: jax.Array | None = None,
    sm_scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Fused attention with the signature of `reference_attention`; differentiable.

    `interpret=None` runs Pallas interpret mode unless the target is a GPU (`target_platform`:
    tests on CPU interpret, a deviceless GPU compile does not). A query that sees no key returns
    zeros, as the reference does: under a causal mask with seq_q > seq_kv, the first
    seq_q - seq_kv queries (bottom-right alignment) see none.
    """
    _check(q, k, v, segment_ids)
    b, sq, hq, d = q.shape
    skv = k.shape[1]
    if interpret is None:
        interpret = target_platform() != "gpu"
    d_p = max(16, pl.next_power_of_2(d))
    blocks = block_sizes or BlockSizes.for_head_dim(d_p, q.dtype)
    bq, bk = _fit(blocks.block_q, sq), _fit(blocks.block_k, skv)
    bqb, bkb = _fit(blocks.block_q_bwd, sq), _fit(blocks.block_k_bwd, skv)
    # Every sequence is padded to a multiple of every block size it meets.
    lq = math.lcm(bq, bqb)
    lk = math.lcm(bk, bkb)
    sq_p, skv_p = -(-sq // lq) * lq, -(-skv // lk) * lk
    st = _Static(
        causal=causal,
        sm_scale=float(d**-0.5 if sm_scale is None else sm_scale),
        interpret=bool(interpret),
        seq_q=sq,
        seq_kv=skv,
        block_q=bq,
        block_k=bk,
        block_q_bwd=bqb,
        block_k_bwd=bkb,
        num_warps=blocks.num_warps,
        num_stages=blocks.num_stages,
        num_warps_bwd=blocks.num_warps_bwd or blocks.num_warps,
        num_stages_bwd=blocks.num_stages_bwd or blocks.num_stages,
    )

    def prep(x: jax.Array, length: int) -> jax.Array:
        x = _pad_seq(x, length)
        return jnp.pad(x, [(0, 0)] * 3 + [(0, d_p - d)]) if d_p != d else x

    qseg = kseg = None
    if segment_ids is not None:
        seg = segment_ids.astype(jnp.int32)
        qseg = _pad_seq(seg, sq_p, -1)
        kseg = _pad_seq(seg, skv_p, -2)
    out = _flash(st, prep(q, sq_p), prep(k, skv_p), prep(v, skv_p), qseg, kseg)
    return out[:, :sq, :, :d]

"""Flash attention on Pallas Mosaic GPU for Hopper (sm_90a), and its forward kernel: TMA loads
into shared memory, wgmma from shared memory, and warp specialisation (a memory warpgroup keeps
a ring of key/value tiles filled while the compute warpgroup multiplies). Layout `[batch, seq,
heads, head_dim]`, the contract of `flash_attention` (kernels/README.md, "Mosaic GPU kernels").

Differentiable: a custom VJP whose dq and dk/dv passes are Mosaic GPU kernels too
(backward.py; the parts both passes share are in common.py). `model.attention = "mosaic"` uses it on a GPU.

In GPU interpret mode (CPU, `interpret=True` or an `InterpretGPUParams`) the kernels run as
written except where JAX 0.10's interpreter has no rule (ops.Ops): layout casts and
layout-carrying loads become plain reads, and a product with a transposed shared-memory operand
(Q K^T and the like) becomes a jnp dot of the same tiles; the other products run as wgmma.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ..platform import target_platform
from ..reference import check_segments, check_shapes
from .backward import backward
from .common import EMPTY_ROW_LSE, LOG2E, MASK_VALUE, MosaicBlocks, Static, kv_copies, kv_steps, visible
from .ops import (
    COLS,
    ROWS,
    TILED,
    accumulate,
    interpret_params,
    load_tiles,
    produce,
    rows,
    share_registers,
    store_tiles,
)

SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
# Padded head dims: a 128-byte swizzle needs 64 two-byte elements per row. 256 is not offered:
# with one 64-row tile per warpgroup its float32 accumulator spills (296 bytes per thread on sm_90a).
HEAD_DIMS = (64, 128)


def _fwd_kernel(
    st: Static, q_ref: Any, k_ref: Any, v_ref: Any, qseg_ref: Any, kseg_ref: Any, o_ref: Any, lse_ref: Any, scratch: Any
) -> None:
    blocks = st.blocks
    bq, bk, stages, wgs = blocks.block_q, blocks.block_k, blocks.stages, blocks.compute_wgs
    (q_all, k_smem, v_smem, p_all, qseg_all, kseg_smem, lse_all), (q_bar, ready, consumed, schedule) = scratch
    b, h, block, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q"), lax.axis_index("wg")
    kvh = lax.div(h, jnp.int32(st.group))
    n_kv = kv_steps(st, block * wgs + wgs - 1)[0]  # every compute warpgroup takes every tile of the ring
    ops = st.ops

    def sync() -> None:
        """Both compute warpgroups reach this point (the ping-pong's schedule barrier)."""
        plgpu.barrier_arrive(schedule)
        plgpu.barrier_wait(schedule)

    alternate = schedule is not None
    issued = sync if alternate else None

    @pl.when(wg < wgs)
    def _compute() -> None:
        share_registers(wgs, blocks.registers, memory=False)
        qi = block * wgs + wg  # this warpgroup's query tile
        q_smem, lse_smem, q_rows = q_all.at[wg], lse_all.at[wg], pl.ds(qi * bq, bq)
        load_tiles(
            [(q_ref.at[b, q_rows, h], q_smem)] + ([(qseg_ref.at[b, q_rows], qseg_all.at[wg])] if st.segments else []),
            q_bar.at[wg],
        )
        qseg = ops.load(qseg_all.at[wg], ROWS) if st.segments else None
        m, l = ops.full((bq,), MASK_VALUE, ROWS), ops.full((bq,), 0.0, ROWS)
        acc = ops.full((bq, q_smem.shape[-1]), 0.0, plgpu.Layout.WGMMA)
        n_whole = kv_steps(st, qi)[1]
        if alternate:
            pl.when(wg == 1)(sync)  # one phase behind warpgroup 0 from here on

        def step(j: jax.Array, carry: tuple[jax.Array, ...], masked: bool) -> tuple[jax.Array, ...]:
            acc, m, l = carry
            slot = lax.rem(j, jnp.int32(stages))
            plgpu.barrier_wait(ready.at[slot])
            s = ops.mm_t(q_smem, k_smem.at[slot], issued) * st.scale2
            ok = None
            if masked:  # a tile past this warpgroup's diagonal is all masked: its p are 0
                kseg = ops.load(kseg_smem.at[slot], COLS) if st.segments else None
                ok = visible(st, ops, qi * bq, j * bk, (bq, bk), qseg, kseg)
                s = jnp.where(ok, s, MASK_VALUE)
            m_new = jnp.maximum(m, s.max(axis=1))
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - rows(m_new, (bq, bk)))
            if ok is not None:
                p = jnp.where(ok, p, 0.0)
            l = l * alpha + p.sum(axis=1)
            acc = acc * rows(alpha, acc.shape)
            if alternate:
                sync()  # done with softmax; the tensor cores are this warpgroup's again
            acc = accumulate(ops, acc, p, None if p_all is None else p_all.at[wg], v_smem.at[slot])
            plgpu.barrier_arrive(consumed.at[slot])
            return acc, m_new, l

        carry = lax.fori_loop(0, n_whole, functools.partial(step, masked=False), (acc, m, l))
        acc, m, l = lax.fori_loop(n_whole, n_kv, functools.partial(step, masked=True), carry)
        if alternate:
            pl.when(wg == 0)(sync)  # the phase warpgroup 1 went ahead with
        empty = l == 0.0
        acc = acc / rows(jnp.where(empty, 1.0, l), acc.shape)  # a row that sees nothing gives 0
        lse_smem[...] = jnp.where(empty, EMPTY_ROW_LSE, m + jnp.log2(jnp.where(empty, 1.0, l)))
        q_smem[...] = acc.astype(q_smem.dtype)
        store_tiles([(q_smem, o_ref.at[b, q_rows, h]), (lse_smem, lse_ref.at[b, h, q_rows])])

    @pl.when(wg == wgs)
    def _memory() -> None:
        share_registers(wgs, blocks.registers, memory=True)
        produce(
            n_kv,
            stages,
            ready,
            consumed,
            kv_copies(st, (k_ref, v_ref, kseg_ref), (k_smem, v_smem, kseg_smem), ready, b, kvh),
        )


def _forward(
    st: Static, q: jax.Array, k: jax.Array, v: jax.Array, qseg: jax.Array, kseg: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Output (padded) and each row's base-2 log-sum-exp `[batch, heads, seq]`."""
    blocks = st.blocks
    bq, bk, stages, wgs = blocks.block_q, blocks.block_k, blocks.stages, blocks.compute_wgs
    b, sq_pad, hq, d = q.shape
    p_smem = plgpu.SMEM((wgs, bq, bk), q.dtype, transforms=TILED) if st.staged else None
    schedule = plgpu.Barrier(num_arrivals=2) if wgs == 2 and blocks.ping_pong else None

    def genesis_flash_mgpu_fwd(*refs: Any) -> None:
        pl.run_scoped(
            lambda *scratch: _fwd_kernel(st, *refs, scratch),
            (
                plgpu.SMEM((wgs, bq, d), q.dtype, transforms=TILED),
                plgpu.SMEM((stages, bk, d), q.dtype, transforms=TILED),
                plgpu.SMEM((stages, bk, d), q.dtype, transforms=TILED),
                p_smem,
                plgpu.SMEM((wgs, bq), jnp.int32),
                plgpu.SMEM((stages, bk), jnp.int32),
                plgpu.SMEM((wgs, bq), jnp.float32),
            ),
            (
                plgpu.Barrier(num_arrivals=2 if st.segments else 1, num_barriers=wgs),
                plgpu.Barrier(num_arrivals=3 if st.segments else 2, num_barriers=stages),
                plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
                schedule,
            ),
            collective_axes="wg",
        )

    return plgpu.kernel(
        genesis_flash_mgpu_fwd,
        out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, hq, sq_pad), jnp.float32)),
        grid=(hq, sq_pad // blocks.rows, b),
        grid_names=("heads", "q", "batch"),
        num_threads=wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=st.interpret,
    )(q, k, v, qseg, kseg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(st: Static, q: jax.Array, k: jax.Array, v: jax.Array, qseg: jax.Array, kseg: jax.Array) -> jax.Array:
    return _forward(st, q, k, v, qseg, kseg)[0]


def _attend_fwd(
    st: Static, q: jax.Array, k: jax.Array, v: jax.Array, qseg: jax.Array, kseg: jax.Array
) -> tuple[jax.Array, tuple[Any, ...]]:
    o, lse = _forward(st, q, k, v, qseg, kseg)
    return o, (q, k, v, qseg, kseg, o, lse)


def _attend_bwd(st: Static, res: tuple[Any, ...], do: jax.Array) -> tuple[Any, ...]:

    q, k, v, qseg, kseg, o, lse = res
    return (*backward(st, q, k, v, qseg, kseg, o, lse, do), None, None)


_attend.defvjp(_attend_fwd, _attend_bwd)


def _fit(x: jax.Array, length: int) -> jax.Array:
    """Segment ids cut or zero-padded to `length` (a padded position's id is never read unmasked)."""
    return jnp.pad(x, ((0, 0), (0, max(0, length - x.shape[1]))))[:, :length]


def flash_attention_mgpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    segment_ids: jax.Array | None = None,
    sm_scale: float | None = None,
    block_sizes: MosaicBlocks | None = None,
    interpret: Any = None,
) -> jax.Array:
    """Attention forward with `flash_attention`'s contract (bf16/fp16 only; float32 goes to
    `flash_attention`). `interpret=None` interprets off the GPU (GPU interpret mode);
    `True` or an `InterpretGPUParams` forces it (race detection: `detect_races=True`)."""
    check_shapes(q, k, v)
    check_segments(q, k, segment_ids)
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"flash_attention_mgpu: q, k, v must all be bfloat16 or float16 (got {q.dtype}, {k.dtype}, "
            f"{v.dtype}); float32 runs in kernels.flash_attention"
        )
    d = q.shape[3]
    if d > HEAD_DIMS[-1]:
        raise ValueError(
            f"flash_attention_mgpu: head_dim {d} > {HEAD_DIMS[-1]} (kernels.flash_attention takes up to 256)"
        )
    blocks = block_sizes or MosaicBlocks()
    interpret = interpret_params(interpret, target_platform())
    b, sq, hq, _ = q.shape
    skv, hkv = k.shape[1], k.shape[2]
    dp = next(x for x in HEAD_DIMS if x >= d)
    sq_pad = pl.cdiv(sq, blocks.q_multiple) * blocks.q_multiple
    skv_pad = pl.cdiv(skv, blocks.kv_multiple) * blocks.kv_multiple

    def pad(x: jax.Array, length: int) -> jax.Array:
        return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, dp - d)))

    seg = jnp.zeros((b, max(sq, skv)), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    st = Static(
        sq,
        skv,
        hq // hkv,
        causal,
        (d**-0.5 if sm_scale is None else float(sm_scale)) * LOG2E,
        segment_ids is not None,
        blocks,
        interpret,
    )
    out = _attend(st, pad(q, sq_pad), pad(k, skv_pad), pad(v, skv_pad), _fit(seg, sq_pad), _fit(seg, skv_pad))
    return out[:, :sq, :, :d]

"""The backward pass of the Mosaic GPU attention: a dq kernel (one block per query tile and
query head, looping over key tiles) and a dk/dv kernel (one block per key tile and KV head,
looping over the query heads of its group and their query tiles), each fed by a memory
warpgroup through a ring of shared-memory slots like the forward. Probabilities are recomputed
from the forward's base-2 log-sum-exp; delta = rowsum(dO * O) is one XLA op before them."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from .common import Static, kv_copies, kv_steps, visible
from .ops import COLS, ROWS, TILED, accumulate, cols, load_tiles, produce, rows, share_registers, store_tiles, tiled


def _dq_kernel(
    st: Static,
    q_ref: Any,
    k_ref: Any,
    v_ref: Any,
    qseg_ref: Any,
    kseg_ref: Any,
    do_ref: Any,
    lse_ref: Any,
    delta_ref: Any,
    dq_ref: Any,
    scratch: Any,
) -> None:
    bq, bk, stages, wgs = st.blocks.block_q, st.blocks.block_k, st.blocks.stages, st.blocks.compute_wgs_bwd
    (q_all, do_all, ds_all, k_smem, v_smem, qseg_all, kseg_smem, lse_all, delta_all), (q_bar, ready, consumed) = scratch
    b, h, block, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q"), lax.axis_index("wg")
    kvh = lax.div(h, jnp.int32(st.group))
    n_kv = kv_steps(st, block * wgs + wgs - 1)[0]  # every compute warpgroup takes every tile of the ring
    ops = st.ops

    @pl.when(wg < wgs)
    def _compute() -> None:
        share_registers(wgs, st.blocks.registers, memory=False)
        qi = block * wgs + wg
        here = pl.ds(qi * bq, bq)
        q_smem, do_smem, ds_smem = q_all.at[wg], do_all.at[wg], None if ds_all is None else ds_all.at[wg]
        load_tiles(
            [
                (q_ref.at[b, here, h], q_smem),
                (do_ref.at[b, here, h], do_smem),
                (lse_ref.at[b, h, here], lse_all.at[wg]),
                (delta_ref.at[b, h, here], delta_all.at[wg]),
            ]
            + ([(qseg_ref.at[b, here], qseg_all.at[wg])] if st.segments else []),
            q_bar.at[wg],
        )
        lse, delta = ops.load(lse_all.at[wg], ROWS), ops.load(delta_all.at[wg], ROWS)
        qseg = ops.load(qseg_all.at[wg], ROWS) if st.segments else None

        def step(j: jax.Array, dq: jax.Array, masked: bool) -> jax.Array:
            slot = lax.rem(j, jnp.int32(stages))
            plgpu.barrier_wait(ready.at[slot])
            p = jnp.exp2(ops.mm_t(q_smem, k_smem.at[slot]) * st.scale2 - rows(lse, (bq, bk)))
            if masked:  # a tile past this warpgroup's diagonal is all masked: its p are 0
                kseg = ops.load(kseg_smem.at[slot], COLS) if st.segments else None
                p = jnp.where(visible(st, ops, qi * bq, j * bk, (bq, bk), qseg, kseg), p, 0.0)
            ds = p * (ops.mm_t(do_smem, v_smem.at[slot]) - rows(delta, (bq, bk)))
            dq = accumulate(ops, dq, ds, ds_smem, k_smem.at[slot])
            plgpu.barrier_arrive(consumed.at[slot])
            return dq

        n_whole = kv_steps(st, qi)[1]
        dq = ops.full((bq, q_smem.shape[-1]), 0.0, plgpu.Layout.WGMMA)
        dq = lax.fori_loop(0, n_whole, functools.partial(step, masked=False), dq)
        dq = lax.fori_loop(n_whole, n_kv, functools.partial(step, masked=True), dq)
        q_smem[...] = (dq * st.sm_scale).astype(q_smem.dtype)
        store_tiles([(q_smem, dq_ref.at[b, here, h])])

    @pl.when(wg == wgs)
    def _memory() -> None:
        share_registers(wgs, st.blocks.registers, memory=True)
        produce(
            n_kv,
            stages,
            ready,
            consumed,
            kv_copies(st, (k_ref, v_ref, kseg_ref), (k_smem, v_smem, kseg_smem), ready, b, kvh),
        )


def _q_tiles(st: Static, kj: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(first query tile that sees key tile kj, first one that sees all of it unmasked)."""
    bq, bk = st.blocks.block_q_dkv, st.blocks.block_k
    n_q = pl.cdiv(st.sq, bq)
    if not st.causal:
        padded = (kj + 1) * bk > st.skv
        return jnp.int32(0), jnp.where(padded | st.segments, n_q, 0).astype(jnp.int32)
    offset = st.skv - st.sq  # query row r sees keys <= r + offset

    def tile(row: jax.Array, round_up: int) -> jax.Array:
        return jnp.minimum(lax.div(jnp.maximum(row, 0) + round_up, jnp.int32(bq)), n_q)

    first = tile(kj * bk - offset, 0)  # the tile holding the first row that sees the tile's first key
    whole = tile(kj * bk + bk - 1 - offset, bq - 1)  # the first tile whose rows all see its last key
    padded = (kj + 1) * bk > st.skv
    return first, jnp.where(padded | st.segments, n_q, whole)


def _dkv_kernel(
    st: Static,
    q_ref: Any,
    k_ref: Any,
    v_ref: Any,
    qseg_ref: Any,
    kseg_ref: Any,
    do_ref: Any,
    lse_ref: Any,
    delta_ref: Any,
    dk_ref: Any,
    dv_ref: Any,
    scratch: Any,
) -> None:
    """dk and dv of one key tile per compute warpgroup, accumulated in place in two float32
    tiles (wgmma); the warpgroups share the ring of query tiles."""
    bq, bk, stages, g, wgs = (
        st.blocks.block_q_dkv,
        st.blocks.block_k,
        st.blocks.stages,
        st.group,
        st.blocks.compute_wgs_bwd,
    )
    (k_all, v_all, p_all, q_smem, do_smem, kseg_all, qseg_smem, lse_smem, delta_smem), (k_bar, ready, consumed) = (
        scratch
    )
    b, kvh, block, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("k"), lax.axis_index("wg")
    first = _q_tiles(st, block * wgs)[0]  # the block's first key tile is seen first
    n_q = jnp.int32(pl.cdiv(st.sq, bq))
    per_head = n_q - first
    ops = st.ops

    @pl.when(wg < wgs)
    def _compute() -> None:
        share_registers(wgs, st.blocks.registers, memory=False)
        kj = block * wgs + wg
        here = pl.ds(kj * bk, bk)
        k_smem, v_smem, p_smem = k_all.at[wg], v_all.at[wg], None if p_all is None else p_all.at[wg]
        load_tiles(
            [(k_ref.at[b, here, kvh], k_smem), (v_ref.at[b, here, kvh], v_smem)]
            + ([(kseg_ref.at[b, here], kseg_all.at[wg])] if st.segments else []),
            k_bar.at[wg],
        )
        kseg = ops.load(kseg_all.at[wg], ROWS) if st.segments else None
        shape = (bk, bq)

        def step(qi: jax.Array, carry: tuple[Any, ...], masked: bool) -> tuple[Any, ...]:
            t, dk, dv = carry
            slot = lax.rem(t, jnp.int32(stages))
            plgpu.barrier_wait(ready.at[slot])
            lse, delta = ops.load(lse_smem.at[slot], COLS), ops.load(delta_smem.at[slot], COLS)
            p = jnp.exp2(ops.mm_t(k_smem, q_smem.at[slot]) * st.scale2 - cols(lse, shape))  # P^T
            if masked:  # query tiles before this warpgroup's first are all masked: their p are 0
                qseg = ops.load(qseg_smem.at[slot], COLS) if st.segments else None
                p = jnp.where(visible(st, ops, qi * bq, kj * bk, shape, qseg, kseg, keys_on_rows=True), p, 0.0)
            dv = accumulate(ops, dv, p, p_smem, do_smem.at[slot])
            ds = p * (ops.mm_t(v_smem, do_smem.at[slot]) - cols(delta, shape))  # dS^T
            dk = accumulate(ops, dk, ds, p_smem, q_smem.at[slot])
            plgpu.barrier_arrive(consumed.at[slot])
            return t + 1, dk, dv

        masked_end = _q_tiles(st, kj)[1]

        def head(_: jax.Array, carry: tuple[Any, ...]) -> tuple[Any, ...]:
            carry = lax.fori_loop(first, masked_end, functools.partial(step, masked=True), carry)
            return lax.fori_loop(masked_end, n_q, functools.partial(step, masked=False), carry)

        zero = ops.full((bk, k_smem.shape[-1]), 0.0, plgpu.Layout.WGMMA)
        _, dk, dv = lax.fori_loop(0, g, head, (jnp.int32(0), zero, zero))
        k_smem[...] = (dk * st.sm_scale).astype(k_smem.dtype)  # K and V are no longer read
        v_smem[...] = dv.astype(v_smem.dtype)
        store_tiles([(k_smem, dk_ref.at[b, here, kvh]), (v_smem, dv_ref.at[b, here, kvh])])

    @pl.when(wg == wgs)
    def _memory() -> None:
        share_registers(wgs, st.blocks.registers, memory=True)

        def copies(t: jax.Array, slot: jax.Array) -> None:
            h = kvh * g + lax.div(t, per_head)
            rows_ = pl.ds((first + lax.rem(t, per_head)) * bq, bq)
            for src, dst in (
                (q_ref.at[b, rows_, h], q_smem),
                (do_ref.at[b, rows_, h], do_smem),
                (lse_ref.at[b, h, rows_], lse_smem),
                (delta_ref.at[b, h, rows_], delta_smem),
            ):
                plgpu.copy_gmem_to_smem(src, dst.at[slot], ready.at[slot])
            if st.segments:
                plgpu.copy_gmem_to_smem(qseg_ref.at[b, rows_], qseg_smem.at[slot], ready.at[slot])

        produce(g * per_head, stages, ready, consumed, copies)


def backward(
    st: Static,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    qseg: jax.Array,
    kseg: jax.Array,
    o: jax.Array,
    lse: jax.Array,
    do: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """dq, dk, dv of the padded inputs."""
    bq, bk, stages, wgs = st.blocks.block_q, st.blocks.block_k, st.blocks.stages, st.blocks.compute_wgs_bwd
    b, sq_pad, hq, d = q.shape
    skv_pad, hkv = k.shape[1], k.shape[2]
    delta = jnp.einsum("bqhd,bqhd->bhq", o.astype(jnp.float32), do.astype(jnp.float32))
    inputs = (q, k, v, qseg, kseg, do, lse, delta)
    extra = 1 if st.segments else 0
    staged = st.staged
    params = dict(
        num_threads=wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=st.interpret,
    )

    def genesis_flash_mgpu_dq(*refs: Any) -> None:
        pl.run_scoped(
            lambda *scratch: _dq_kernel(st, *refs, scratch),
            (
                plgpu.SMEM((wgs, bq, d), q.dtype, transforms=TILED),
                plgpu.SMEM((wgs, bq, d), q.dtype, transforms=TILED),
                plgpu.SMEM((wgs, bq, bk), q.dtype, transforms=TILED) if staged else None,
                plgpu.SMEM((stages, bk, d), q.dtype, transforms=TILED),
                plgpu.SMEM((stages, bk, d), q.dtype, transforms=TILED),
                plgpu.SMEM((wgs, bq), jnp.int32),
                plgpu.SMEM((stages, bk), jnp.int32),
                plgpu.SMEM((wgs, bq), jnp.float32),
                plgpu.SMEM((wgs, bq), jnp.float32),
            ),
            (
                plgpu.Barrier(num_arrivals=4 + extra, num_barriers=wgs),
                plgpu.Barrier(num_arrivals=2 + extra, num_barriers=stages),
                plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
            ),
            collective_axes="wg",
        )

    bqk = st.blocks.block_q_dkv
    t = tiled(bqk)  # every operand of one wgmma shares a swizzle, and P^T's rows are bqk long

    def genesis_flash_mgpu_dkdv(*refs: Any) -> None:
        pl.run_scoped(lambda *scratch: _dkv_kernel(st, *refs, scratch), *dkv_scratch, collective_axes="wg")

    dkv_scratch = (
        (
            plgpu.SMEM((wgs, bk, d), q.dtype, transforms=t),
            plgpu.SMEM((wgs, bk, d), q.dtype, transforms=t),
            plgpu.SMEM((wgs, bk, bqk), q.dtype, transforms=t) if staged else None,
            plgpu.SMEM((stages, bqk, d), q.dtype, transforms=t),
            plgpu.SMEM((stages, bqk, d), q.dtype, transforms=t),
            plgpu.SMEM((wgs, bk), jnp.int32),
            plgpu.SMEM((stages, bqk), jnp.int32),
            plgpu.SMEM((stages, bqk), jnp.float32),
            plgpu.SMEM((stages, bqk), jnp.float32),
        ),
        (
            plgpu.Barrier(num_arrivals=2 + extra, num_barriers=wgs),
            plgpu.Barrier(num_arrivals=4 + extra, num_barriers=stages),
            plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
        ),
    )
    dq = plgpu.kernel(
        genesis_flash_mgpu_dq,
        out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(hq, sq_pad // (bq * wgs), b),
        grid_names=("heads", "q", "batch"),
        **params,
    )(*inputs)
    dk, dv = plgpu.kernel(
        genesis_flash_mgpu_dkdv,
        out_type=(jax.ShapeDtypeStruct(k.shape, k.dtype),) * 2,
        grid=(hkv, skv_pad // (bk * wgs), b),
        grid_names=("heads", "k", "batch"),
        **params,
    )(*inputs)
    return dq, dk, dv

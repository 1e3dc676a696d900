"""Flash attention forward on Pallas Mosaic GPU, for Hopper (sm_90a): TMA loads into shared
memory, wgmma from shared memory, and warp specialisation (a memory warpgroup keeps a ring of
key/value tiles filled while the compute warpgroup multiplies). Layout `[batch, seq, heads,
head_dim]`, the contract of `flash_attention` (kernels/README.md, "Mosaic GPU kernel").

Only the forward pass exists so far: the function has no VJP yet, and no `model.attention`
backend uses it.

In GPU interpret mode (CPU, `interpret=True` or an `InterpretGPUParams`) the kernel runs as
written except where JAX 0.10's interpreter has no rule: layout casts and layout-carrying loads
become plain reads, and the Q K^T product (a wgmma whose shared-memory operand is transposed)
becomes a jnp dot of the same shared-memory tiles; the P V product runs as wgmma there too.
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
from jax.experimental.pallas import mosaic_gpu as plgpu

from .platform import target_platform
from .reference import check_segments, check_shapes

LOG2E = math.log2(math.e)
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
# Padded head dims: a 128-byte swizzle needs 64 two-byte elements per row. 256 is not offered:
# with one 64-row tile per warpgroup its float32 accumulator spills (296 bytes per thread on sm_90a).
HEAD_DIMS = (64, 128)


@dataclasses.dataclass(frozen=True)
class MosaicBlocks:
    """Tile sizes and the depth of the key/value ring in shared memory."""

    block_q: int = 64  # rows of one wgmma: a warpgroup's M
    block_k: int = 64
    stages: int = 2  # key/value tiles in flight

    def __post_init__(self) -> None:
        if self.block_q != 64 or self.block_k % 64 or self.block_k > 256 or self.stages < 1:
            raise ValueError(f"MosaicBlocks: block_q must be 64, block_k a multiple of 64 up to 256, stages >= 1; got {self}")


@dataclasses.dataclass(frozen=True)
class _Static:
    sq: int  # true lengths (the arrays are padded to the blocks)
    skv: int
    group: int
    causal: bool
    scale2: float  # sm_scale * log2(e)
    segments: bool
    blocks: MosaicBlocks
    interpret: Any  # False or InterpretGPUParams


def _kv_steps(st: _Static, qi: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(key tiles query tile qi reads, of which the first ones need no mask)."""
    bq, bk = st.blocks.block_q, st.blocks.block_k
    total = pl.cdiv(st.skv, bk)
    n = jnp.int32(total)
    whole = jnp.int32(st.skv // bk)  # tiles without padded keys
    if st.causal:
        offset = st.skv - st.sq
        last_row = (qi + 1) * bq - 1 + offset  # the tile's last query sees keys <= last_row
        n = jnp.clip(lax.div(last_row + bk, jnp.int32(bk)), 0, total)
        first_row = qi * bq + offset
        whole = jnp.minimum(whole, jnp.maximum(lax.div(first_row + 1, jnp.int32(bk)), 0))
    if st.segments:
        whole = jnp.int32(0)
    return n, jnp.minimum(whole, n)


def _kernel(st: _Static, q_ref: Any, k_ref: Any, v_ref: Any, qseg_ref: Any, kseg_ref: Any, o_ref: Any,
            scratch: Any) -> None:
    bq, bk, stages = st.blocks.block_q, st.blocks.block_k, st.blocks.stages
    (q_smem, k_smem, v_smem, p_smem, qseg_smem, kseg_smem), (q_bar, ready, consumed) = scratch
    b, h, qi = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q")
    kvh = lax.div(h, jnp.int32(st.group))
    n_kv, n_whole = _kv_steps(st, qi)
    interpreting = st.interpret is not False
    cast = (lambda x, _: x) if interpreting else plgpu.layout_cast
    rows_layout, cols_layout = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)

    def load(ref: Any, layout: Any) -> jax.Array:
        return ref[...] if interpreting else plgpu.load(ref, (), layout=layout)

    def iota(dim: int) -> jax.Array:
        if interpreting:
            return lax.broadcasted_iota(jnp.int32, (bq, bk), dim)
        return plgpu.broadcasted_iota(jnp.int32, (bq, bk), dim, layout=plgpu.Layout.WGMMA)

    @pl.when(lax.axis_index("wg") == 0)
    def _compute() -> None:
        plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(qi * bq, bq), h], q_smem, q_bar)
        if st.segments:
            plgpu.copy_gmem_to_smem(qseg_ref.at[b, pl.ds(qi * bq, bq)], qseg_smem, q_bar)
        plgpu.barrier_wait(q_bar)
        qseg = load(qseg_smem, rows_layout) if st.segments else None
        m = cast(jnp.full((bq,), MASK_VALUE, jnp.float32), rows_layout)
        l = cast(jnp.full((bq,), 0.0, jnp.float32), rows_layout)
        acc = cast(jnp.full((bq, q_smem.shape[-1]), 0.0, jnp.float32), plgpu.Layout.WGMMA)

        def step(j: jax.Array, carry: tuple[jax.Array, ...], masked: bool) -> tuple[jax.Array, ...]:
            acc, m, l = carry
            slot = lax.rem(j, jnp.int32(stages))
            plgpu.barrier_wait(ready.at[slot])
            if interpreting:  # the interpreter has no wgmma with a transposed operand
                s = jnp.dot(q_smem[...], k_smem.at[slot][...].T, preferred_element_type=jnp.float32)
            else:
                def qk(acc_ref: Any) -> jax.Array:
                    plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                    return acc_ref[...]

                s = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))
            s = s * st.scale2
            visible = None
            if masked:
                cols = iota(1) + j * bk
                visible = cols < st.skv
                if st.causal:
                    visible &= iota(0) + qi * bq + (st.skv - st.sq) >= cols
                if st.segments:
                    kseg = load(kseg_smem.at[slot], cols_layout)
                    visible &= (lax.broadcast_in_dim(qseg, (bq, bk), [0])
                                == lax.broadcast_in_dim(kseg, (bq, bk), [1]))
                s = jnp.where(visible, s, MASK_VALUE)
            m_new = jnp.maximum(m, s.max(axis=1))
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, (bq, bk), [0]))
            if visible is not None:
                p = jnp.where(visible, p, 0.0)
            l = l * alpha + p.sum(axis=1)
            p_smem[...] = p.astype(p_smem.dtype)
            plgpu.commit_smem()

            def pv(acc_ref: Any) -> jax.Array:
                plgpu.wgmma(acc_ref, p_smem, v_smem.at[slot])
                return acc_ref[...]

            o = pl.run_scoped(pv, plgpu.ACC(acc.shape, jnp.float32))
            plgpu.barrier_arrive(consumed.at[slot])
            return acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + o, m_new, l

        carry = lax.fori_loop(0, n_whole, functools.partial(step, masked=False), (acc, m, l))
        acc, m, l = lax.fori_loop(n_whole, n_kv, functools.partial(step, masked=True), carry)
        acc = acc / lax.broadcast_in_dim(jnp.where(l == 0.0, 1.0, l), acc.shape, [0])  # empty rows give 0
        q_smem[...] = acc.astype(q_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, o_ref.at[b, pl.ds(qi * bq, bq), h])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(lax.axis_index("wg") == 1)
    def _memory() -> None:
        @pl.loop(0, n_kv)
        def _(j: jax.Array) -> None:
            slot = lax.rem(j, jnp.int32(stages))

            @pl.when(j >= stages)
            def _() -> None:
                plgpu.barrier_wait(consumed.at[slot])  # the compute warpgroup is done with this slot

            rows = pl.ds(j * bk, bk)
            plgpu.copy_gmem_to_smem(k_ref.at[b, rows, kvh], k_smem.at[slot], ready.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[b, rows, kvh], v_smem.at[slot], ready.at[slot])
            if st.segments:
                plgpu.copy_gmem_to_smem(kseg_ref.at[b, rows], kseg_smem.at[slot], ready.at[slot])

        # Before leaving, wait for the compute warpgroup to release the last slots: its waits
        # must not see a barrier whose arrivals outlive the block.
        @pl.loop(jnp.maximum(n_kv - stages, 0), n_kv)
        def _(j: jax.Array) -> None:
            plgpu.barrier_wait(consumed.at[lax.rem(j, jnp.int32(stages))])


def _call(st: _Static, q: jax.Array, k: jax.Array, v: jax.Array, qseg: jax.Array, kseg: jax.Array) -> jax.Array:
    bq, bk, stages = st.blocks.block_q, st.blocks.block_k, st.blocks.stages
    b, sq_pad, hq, d = q.shape
    tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    copies = 3 if st.segments else 2

    def genesis_flash_mgpu_fwd(q_ref: Any, k_ref: Any, v_ref: Any, qseg_ref: Any, kseg_ref: Any, o_ref: Any) -> None:
        pl.run_scoped(
            lambda *scratch: _kernel(st, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, scratch),
            (plgpu.SMEM((bq, d), q.dtype, transforms=tiled),
             plgpu.SMEM((stages, bk, d), q.dtype, transforms=tiled),
             plgpu.SMEM((stages, bk, d), q.dtype, transforms=tiled),
             plgpu.SMEM((bq, bk), q.dtype, transforms=tiled),
             plgpu.SMEM((bq,), jnp.int32),
             plgpu.SMEM((stages, bk), jnp.int32)),
            (plgpu.Barrier(num_arrivals=2 if st.segments else 1),
             plgpu.Barrier(num_arrivals=copies, num_barriers=stages),
             plgpu.Barrier(num_arrivals=1, num_barriers=stages)),
            collective_axes="wg",
        )

    return plgpu.kernel(
        genesis_flash_mgpu_fwd, out_type=jax.ShapeDtypeStruct(q.shape, q.dtype), grid=(hq, sq_pad // bq, b),
        grid_names=("heads", "q", "batch"), num_threads=2, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True), interpret=st.interpret,
    )(q, k, v, qseg, kseg)


def _fit(x: jax.Array, length: int) -> jax.Array:
    """Segment ids cut or zero-padded to `length` (a padded position's id is never read unmasked)."""
    return jnp.pad(x, ((0, 0), (0, max(0, length - x.shape[1]))))[:, :length]


def flash_attention_mgpu(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
                         segment_ids: jax.Array | None = None, sm_scale: float | None = None,
                         block_sizes: MosaicBlocks | None = None, interpret: Any = None) -> jax.Array:
    """Attention forward with `flash_attention`'s contract (bf16/fp16 only; float32 goes to
    `flash_attention`). `interpret=None` interprets off the GPU (GPU interpret mode);
    `True` or an `InterpretGPUParams` forces it (race detection: `detect_races=True`)."""
    check_shapes(q, k, v)
    check_segments(q, k, segment_ids)
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"flash_attention_mgpu: q, k, v must all be bfloat16 or float16 (got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}); float32 runs in kernels.flash_attention")
    d = q.shape[3]
    if d > HEAD_DIMS[-1]:
        raise ValueError(f"flash_attention_mgpu: head_dim {d} > {HEAD_DIMS[-1]} (kernels.flash_attention takes up to 256)")
    blocks = block_sizes or MosaicBlocks()
    if interpret is None:
        interpret = target_platform() != "gpu"
    if interpret is True:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        interpret = InterpretGPUParams()
    b, sq, hq, _ = q.shape
    skv, hkv = k.shape[1], k.shape[2]
    dp = next(x for x in HEAD_DIMS if x >= d)
    sq_pad = pl.cdiv(sq, blocks.block_q) * blocks.block_q
    skv_pad = pl.cdiv(skv, blocks.block_k) * blocks.block_k

    def pad(x: jax.Array, length: int) -> jax.Array:
        return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, dp - d)))

    seg = jnp.zeros((b, max(sq, skv)), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    st = _Static(sq, skv, hq // hkv, causal, (d**-0.5 if sm_scale is None else float(sm_scale)) * LOG2E,
                 segment_ids is not None, blocks, interpret)
    out = _call(st, pad(q, sq_pad), pad(k, skv_pad), pad(v, skv_pad),
                _fit(seg, sq_pad), _fit(seg, skv_pad))
    return out[:, :sq, :, :d]

"""The parts both passes of the Mosaic GPU attention share: the block sizes, the static description of
one call, which key tiles a query tile reads, the visibility mask of a tile, and the memory
warpgroup's key/value copies."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from .ops import Ops, cols, rows

LOG2E = math.log2(math.e)


MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


EMPTY_ROW_LSE = 1e30  # base-2 log-sum-exp of a row with no visible key: its recomputed p are 0


@dataclasses.dataclass(frozen=True)
class MosaicBlocks:
    """Tile sizes, the depth of the key/value ring in shared memory, and the forward's
    warpgroup plan (kernels/README.md, "Mosaic GPU kernels")."""

    block_q: int = 64  # rows of one wgmma: a warpgroup's M
    block_k: int = 64
    stages: int = 2  # key/value tiles in flight
    block_q_dkv: int = 32  # query rows per dk/dv step (64: 254 registers at head_dim 64, spills at 128)
    compute_wgs: int = 2  # forward: warpgroups of block_q query rows that share each key/value tile
    compute_wgs_bwd: int = 2  # backward: dq's warpgroups of block_q rows, dk/dv's of block_k keys, sharing the ring
    ping_pong: bool = True  # forward, 2 compute warpgroups: one's softmax while the other multiplies
    p_in_registers: bool = True  # P (and the backward's dS) as wgmma's register operand, not through shared memory
    registers: tuple[int, int] = (232, 40)  # 2 compute warpgroups: per thread, compute and memory (setmaxnreg)

    def __post_init__(self) -> None:
        if self.block_q != 64 or self.block_k % 64 or self.block_k > 256 or self.stages < 1:
            raise ValueError(
                f"MosaicBlocks: block_q must be 64, block_k a multiple of 64 up to 256, stages >= 1; got {self}"
            )
        if self.block_q_dkv not in (32, 64):
            raise ValueError(f"MosaicBlocks: block_q_dkv must be 32 or 64; got {self.block_q_dkv}")
        if self.compute_wgs not in (1, 2) or self.compute_wgs_bwd not in (1, 2):
            raise ValueError(f"MosaicBlocks: compute_wgs and compute_wgs_bwd must be 1 or 2; got {self}")
        compute, memory = self.registers
        if compute % 8 or memory % 8 or not 24 <= memory <= compute <= 256 or (2 * compute + memory) * 128 > 65536:
            raise ValueError(
                f"MosaicBlocks: registers (compute, memory) must be multiples of 8 in [24, 256] whose "
                f"2 x compute + memory warpgroups fit 65536 registers; got {self.registers}"
            )

    @property
    def rows(self) -> int:
        """Query rows of one forward block."""
        return self.block_q * self.compute_wgs

    @property
    def q_multiple(self) -> int:
        """What the query length is padded to: a forward block and a dq block."""
        return self.block_q * max(self.compute_wgs, self.compute_wgs_bwd)

    @property
    def kv_multiple(self) -> int:
        """What the key length is padded to: a dk/dv block."""
        return self.block_k * self.compute_wgs_bwd


@dataclasses.dataclass(frozen=True)
class Static:
    sq: int  # true lengths (the arrays are padded to the blocks)
    skv: int
    group: int
    causal: bool
    scale2: float  # sm_scale * log2(e)
    segments: bool
    blocks: MosaicBlocks
    interpret: Any  # False or InterpretGPUParams

    @property
    def sm_scale(self) -> float:
        return self.scale2 / LOG2E

    @property
    def ops(self) -> Ops:
        return Ops(self.interpret is not False)

    @property
    def staged(self) -> bool:
        """P and dS go through shared memory: asked for, or interpreted (no register operand there)."""
        return not self.blocks.p_in_registers or self.interpret is not False


def kv_steps(st: Static, qi: jax.Array) -> tuple[jax.Array, jax.Array]:
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


def visible(
    st: Static,
    ops: Ops,
    q0: jax.Array,
    k0: jax.Array,
    shape: tuple[int, int],
    qseg: jax.Array | None,
    kseg: jax.Array | None,
    keys_on_rows: bool = False,
) -> jax.Array:
    """Which (query, key) pairs of a tile may attend: keys inside the true length, the causal
    rule, equal segments. Queries run along the rows (along the columns if `keys_on_rows`)."""
    qd, kd = (1, 0) if keys_on_rows else (0, 1)
    qpos, kpos = ops.iota(shape, qd) + q0, ops.iota(shape, kd) + k0
    ok = kpos < st.skv
    if st.causal:
        ok &= qpos + (st.skv - st.sq) >= kpos
    if st.segments:
        spread = {0: rows, 1: cols}
        ok &= spread[qd](qseg, shape) == spread[kd](kseg, shape)
    return ok


def kv_copies(
    st: Static, refs: tuple[Any, Any, Any], rings: tuple[Any, Any, Any], ready: Any, b: jax.Array, kvh: jax.Array
) -> Callable[[jax.Array, jax.Array], None]:
    """The memory warpgroup's copies of key tile j (keys, values, key segment ids) of KV head
    `kvh` into ring slot `slot`, for the kernels that loop over key tiles."""
    (k_ref, v_ref, kseg_ref), (k_ring, v_ring, kseg_ring), bk = refs, rings, st.blocks.block_k

    def copies(j: jax.Array, slot: jax.Array) -> None:
        keys = pl.ds(j * bk, bk)
        plgpu.copy_gmem_to_smem(k_ref.at[b, keys, kvh], k_ring.at[slot], ready.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[b, keys, kvh], v_ring.at[slot], ready.at[slot])
        if st.segments:
            plgpu.copy_gmem_to_smem(kseg_ref.at[b, keys], kseg_ring.at[slot], ready.at[slot])

    return copies

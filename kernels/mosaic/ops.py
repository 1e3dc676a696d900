"""Building blocks shared by the Mosaic GPU attention kernels, each with its GPU interpret-mode
form where JAX 0.10's interpreter has no rule for the compiled one (kernels/README.md)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ...core.compat import mosaic_load

ROWS = plgpu.Layout.WGMMA.reduce(1)  # one value per row of a wgmma tile
COLS = plgpu.Layout.WGMMA.reduce(0)  # one value per column


def tiled(minor: int) -> tuple[Any, Any]:
    """Shared-memory transforms of a 2-byte tile whose rows hold `minor` elements (32 or more)."""
    swizzle = min(128, 2 * minor)
    return plgpu.TilingTransform((8, swizzle // 2)), plgpu.SwizzleTransform(swizzle)


TILED = tiled(64)  # a 128-byte swizzle of 2-byte rows


@dataclasses.dataclass(frozen=True)
class Ops:
    interpreting: bool

    def cast(self, x: jax.Array, layout: Any) -> jax.Array:
        return x if self.interpreting else plgpu.layout_cast(x, layout)

    def full(self, shape: tuple[int, ...], value: float, layout: Any) -> jax.Array:
        return self.cast(jnp.full(shape, value, jnp.float32), layout)

    def load(self, ref: Any, layout: Any) -> jax.Array:
        return ref[...] if self.interpreting else mosaic_load(ref, layout)

    def iota(self, shape: tuple[int, int], dim: int) -> jax.Array:
        if self.interpreting:
            return lax.broadcasted_iota(jnp.int32, shape, dim)
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)

    def mm(self, a: Any, b: Any) -> jax.Array:
        """a @ b of two shared-memory tiles, float32, by wgmma."""

        def run(acc: Any) -> jax.Array:
            plgpu.wgmma(acc, a, b)
            return acc[...]

        return pl.run_scoped(run, plgpu.ACC((a.shape[0], b.shape[1]), jnp.float32))

    def mm_t(self, a: Any, b: Any, issued: Callable[[], None] | None = None) -> jax.Array:
        """a @ b^T of two shared-memory tiles, float32: wgmma with a transposed operand, which
        the interpreter lacks (there: a jnp dot of the same tiles). `issued` runs while the
        wgmma is in flight (a schedule barrier between warpgroups)."""
        if self.interpreting:
            out = jnp.dot(a[...], b[...].T, preferred_element_type=jnp.float32)
            if issued is not None:
                issued()
            return out

        def run(acc: Any) -> jax.Array:
            plgpu.wgmma(acc, a, b.transpose((1, 0)))  # what plgpu.transpose_ref (gone in JAX 0.12.1) did
            if issued is not None:
                issued()
            return acc[...]

        return pl.run_scoped(run, plgpu.ACC((a.shape[0], b.shape[0]), jnp.float32))

    def mm_acc(self, acc: jax.Array, a: Any, b: Any) -> jax.Array:
        """acc + a @ b accumulated in place by wgmma (no second float32 tile in registers); `a`
        a shared-memory tile or, compiled, a 2-byte register array in the WGMMA layout. The
        interpreter has neither run_state nor a register operand: there `a` must be a tile
        (kernels stage such values in shared memory), and the product is added."""
        if self.interpreting:
            return acc + self.mm(a, b)

        def run(ref: Any) -> None:
            plgpu.wgmma(ref, a, b)

        return pl.run_state(run)(plgpu.ACC.init(acc))


def load_tiles(copies: list[tuple[Any, Any]], barrier: Any) -> None:
    """TMA copies (HBM source, shared-memory tile) that all arrive on `barrier`, then the wait
    for them: a warpgroup's own tiles, loaded once before its loop."""
    for src, dst in copies:
        plgpu.copy_gmem_to_smem(src, dst, barrier)
    plgpu.barrier_wait(barrier)


def store_tiles(copies: list[tuple[Any, Any]]) -> None:
    """The warpgroup's shared-memory writes made visible to TMA, each tile copied to its HBM
    destination, and the wait until they have left shared memory."""
    plgpu.commit_smem()
    for src, dst in copies:
        plgpu.copy_smem_to_gmem(src, dst)
    plgpu.wait_smem_to_gmem(0)


def share_registers(compute_wgs: int, registers: tuple[int, int], memory: bool) -> None:
    """With two compute warpgroups, move registers (per thread: compute, memory) to them from
    the memory warpgroup (setmaxnreg): the first call in each warpgroup's branch."""
    if compute_wgs > 1:
        plgpu.set_max_registers(registers[memory], action="decrease" if memory else "increase")


def accumulate(ops: Ops, acc: jax.Array, a: jax.Array, staging: Any, b: Any) -> jax.Array:
    """acc + a @ b with `a` (float32 in registers) cast to b's dtype: wgmma's register operand
    when there is no `staging` tile, else written to that shared-memory tile first."""
    if staging is None:
        return ops.mm_acc(acc, a.astype(b.dtype), b)
    staging[...] = a.astype(staging.dtype)
    plgpu.commit_smem()
    return ops.mm_acc(acc, staging, b)


def rows(x: jax.Array, shape: tuple[int, int]) -> jax.Array:
    """A per-row vector broadcast over a tile's columns."""
    return lax.broadcast_in_dim(x, shape, [0])


def cols(x: jax.Array, shape: tuple[int, int]) -> jax.Array:
    """A per-column vector broadcast over a tile's rows."""
    return lax.broadcast_in_dim(x, shape, [1])


def produce(
    n: jax.Array, stages: int, ready: Any, consumed: Any, copies: Callable[[jax.Array, jax.Array], None]
) -> None:
    """The memory warpgroup: for steps 0..n, wait until the consumer released the step's slot,
    then issue `copies(step, slot)` (TMA copies that arrive on `ready.at[slot]`). Waits for the
    last slots' release before returning, so that no arrival outlives the block."""

    @pl.loop(0, n)
    def _(j: jax.Array) -> None:
        slot = lax.rem(j, jnp.int32(stages))

        @pl.when(j >= stages)
        def _() -> None:
            plgpu.barrier_wait(consumed.at[slot])

        copies(j, slot)

    @pl.loop(jnp.maximum(n - stages, 0), n)
    def _(j: jax.Array) -> None:
        plgpu.barrier_wait(consumed.at[lax.rem(j, jnp.int32(stages))])


def interpret_params(interpret: Any, platform: str) -> Any:
    """False (compile) or the interpreter's parameters: None interprets off the GPU."""
    if interpret is None:
        interpret = platform != "gpu"
    if interpret is True:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        return InterpretGPUParams()
    return interpret

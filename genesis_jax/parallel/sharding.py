"""Where arrays live on the devices: the mesh from `[parallel]`, the logical axis names the
model's parameters carry, the rules that map them onto mesh axes, and the shardings of the
state, the batches and the device corpus (docs/design.md, "Sharding").

Mesh axes: `data` (batch split, state replicated), `fsdp` (batch split, parameters and Adam
moments sharded, ZeRO-3 style), `tensor` (heads and the SwiGLU hidden dimension split,
Megatron style). Nothing outside this module names a mesh axis.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ..config.checks import check_tensor_split
from ..config.schema import ModelSpec, ParallelConfig
from ..core.errors import ConfigError

DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
AXES = (DATA, FSDP, TENSOR)
BATCH = (DATA, FSDP)  # the mesh axes a batch is split over

# Logical axis names (model/llama.py puts them on every parameter) -> mesh axis (None: not split).
RULES: dict[str, str | None] = {
    "layers": None,  # the stacked blocks' leading axis
    "vocab": None,
    "embed": FSDP,  # the model width: every matrix has it once, so FSDP shards every matrix
    "heads": TENSOR,  # query heads x head_dim
    "kv": TENSOR,  # key/value heads x head_dim
    "mlp": TENSOR,  # the SwiGLU hidden dimension
}


def mesh_shape(p: ParallelConfig, n_devices: int) -> dict[str, int]:
    """Axis sizes with -1 resolved; ConfigError naming the key when they cannot fit."""
    sizes = {DATA: p.data, FSDP: p.fsdp, TENSOR: p.tensor}
    fixed = math.prod(n for n in sizes.values() if n != -1)
    for axis, n in sizes.items():
        if n == -1:
            if n_devices % fixed:
                raise ConfigError(
                    f"parallel.{axis} = -1: the other axes ({fixed} devices) do not divide the device count {n_devices}"
                )
            sizes[axis] = n_devices // fixed
    if math.prod(sizes.values()) != n_devices:
        raise ConfigError(
            f"parallel: data x fsdp x tensor = {sizes[DATA]} x {sizes[FSDP]} x {sizes[TENSOR]} = "
            f"{math.prod(sizes.values())}, but there are {n_devices} devices"
        )
    return sizes


def make_mesh(
    n_devices: int | None = None, parallel: ParallelConfig | None = None, devices: list[jax.Device] | None = None
) -> Mesh:
    """The (data, fsdp, tensor) mesh over the first `n_devices` of `devices` (default: all of
    JAX's; `plan` passes the compile-only devices of a GPU it compiles for); without `parallel`,
    every device on `data`."""
    pool = jax.devices() if devices is None else devices
    n = n_devices or len(pool)
    sizes = mesh_shape(parallel or ParallelConfig(), n)
    grid = np.asarray(pool[:n]).reshape(tuple(sizes[a] for a in AXES))
    return Mesh(grid, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def check_devices(batch_size: int, model: ModelSpec, mesh: Mesh) -> None:
    """Checks that need the mesh: the batch (training.batch_size) splits over data x fsdp, heads
    and hidden over tensor."""
    split = batch_split(mesh)
    if batch_size % split:
        raise ConfigError(
            f"training.batch_size = {batch_size} is not divisible by "
            f"parallel.data x parallel.fsdp = {split} (the devices a batch is split over)"
        )
    check_tensor_split(mesh.shape[TENSOR], model)


def batch_split(mesh: Mesh) -> int:
    """How many ways a batch is split (data x fsdp)."""
    return math.prod(mesh.shape[a] for a in BATCH)


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (the device corpus, step counters, metrics)."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, leading_axes: int = 0) -> NamedSharding:
    """The batch axis split over data x fsdp, after `leading_axes` unsplit axes (micro-batches)."""
    return NamedSharding(mesh, P(*([None] * leading_axes), BATCH))


def attention_spec() -> P:
    """`[batch, seq, heads, head_dim]` as each device holds it under the mesh."""
    return P(BATCH, None, TENSOR, None)


def mesh_spec(logical: P) -> P:
    """A partition spec of logical names as one of mesh axes (RULES)."""
    return P(*(RULES[name] if isinstance(name, str) else None for name in logical))


def state_shardings(mesh: Mesh, state: Any) -> Any:
    """The sharding of every leaf of a state pytree (train state, optimizer state or params)
    from the logical names its parameters carry; leaves without names are replicated."""
    specs = nnx.get_partition_spec(state)
    return jax.tree.map(lambda s: NamedSharding(mesh, mesh_spec(s)), specs, is_leaf=lambda x: isinstance(x, P))


def put(tree: Any, shardings: Any) -> Any:
    """Host values onto the mesh (one sharding, or a tree of them): each process fills the
    blocks of its own devices from its copy of the same value, so this works across processes."""

    def one(x: Any, s: jax.sharding.Sharding) -> jax.Array:
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # a typed PRNG key: place its raw bits
            return jax.random.wrap_key_data(one(jax.random.key_data(x), s), impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: one(x, shardings), tree)
    return jax.tree.map(one, tree, shardings)


def bytes_per_device(tree: Any) -> dict[int, int]:
    """Bytes each device holds of a pytree of arrays, measured from their addressable shards."""
    out: dict[int, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device.id] = out.get(shard.device.id, 0) + shard.data.nbytes
    return out


def shard_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded shapes (`jax.ShapeDtypeStruct`s with a
    sharding, nothing allocated: `bytes_per_device` measures placed arrays), from each leaf's
    shard shape; PRNG keys, a few bytes each, are not counted."""
    total = 0
    for x in jax.tree.leaves(tree):
        if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            total += math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
    return total

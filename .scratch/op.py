import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(np.array(jax.devices()), ("data",))
x = jax.device_put(jnp.ones((4, 2, 16, 8)), NamedSharding(mesh, P("data")))
case = sys.argv[1]
def inner(x):
    if case == "atadd":
        z = jnp.zeros((*x.shape[:2], x.shape[3], x.shape[2]), jnp.float32)
        return jnp.swapaxes(z.at[..., :16].add(jnp.swapaxes(x, 2, 3)), 2, 3)
    if case == "atadd_part":
        z = jnp.zeros((*x.shape[:2], x.shape[3], x.shape[2]), jnp.float32)
        return jnp.swapaxes(z.at[..., :8].add(jnp.swapaxes(x, 2, 3)[..., :8]), 2, 3)
    if case == "einsum":
        return jnp.einsum("bhqd,bhqk->bhdk", x, x, preferred_element_type=jnp.float32)[:, :, :, :8].swapaxes(2, 3).repeat(2, axis=2)
    if case == "delta":
        d = jnp.sum(x * x, axis=-1)
        return x - d[..., None]
spec = P("data", None, None, None)
print(jax.jit(lambda x: jax.shard_map(inner, mesh=mesh, in_specs=(spec,), out_specs=spec, check_vma=False)(x).sum())(x))

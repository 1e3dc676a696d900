import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import functools, jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(np.array(jax.devices()), ("data",))
x = jax.device_put(jnp.ones((4, 8)), NamedSharding(mesh, P("data")))
case = sys.argv[1]
@jax.custom_vjp
def f(x, s):
    return jnp.sin(x)
def f_fwd(x, s):
    return jnp.sin(x), (x, s)
def f_bwd(res, g):
    x, s = res
    return (g * jnp.cos(x), None)
f.defvjp(f_fwd, f_bwd)
@jax.custom_vjp
def h(x):
    return jnp.sin(x)
h.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (g * jnp.cos(x),))
spec = P("data", None)
if case == "none":
    g = lambda x: jax.shard_map(lambda x: f(x, None), mesh=mesh, in_specs=(spec,), out_specs=spec, check_vma=False)(x)
elif case == "plain":
    g = lambda x: jax.shard_map(h, mesh=mesh, in_specs=(spec,), out_specs=spec, check_vma=False)(x)
elif case == "nocv":
    g = lambda x: jax.shard_map(jnp.sin, mesh=mesh, in_specs=(spec,), out_specs=spec, check_vma=False)(x)
elif case == "vma":
    g = lambda x: jax.shard_map(h, mesh=mesh, in_specs=(spec,), out_specs=spec)(x)
print(jax.jit(jax.grad(lambda x: g(x).sum()))(x).sum())

import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import faulthandler; faulthandler.enable()
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from genesis_jax.kernels.blocked_attention import blocked_attention
mesh = Mesh(np.array(jax.devices()), ("data",))
sh = NamedSharding(mesh, P("data"))
B, S, H, D = 4, int(os.environ.get("S", 32)), 2, 16
q = jax.device_put(jnp.ones((B, S, H, D)), sh)
case = sys.argv[1]
causal = os.environ.get("CAUSAL", "1") == "1"
spec = P("data", None, None, None)
if case == "fwd":
    f = jax.jit(lambda q: jax.shard_map(lambda q: blocked_attention(q, q, q, causal=causal), mesh=mesh, in_specs=(spec,), out_specs=spec, check_vma=False)(q).sum())
elif case in ("bfwd", "bbwd"):
    from genesis_jax.kernels import blocked_attention as B
    st = B._Static(causal, 0.25, 64, 1)
    def inner(q):
        r = B._to_rows(q, H)
        o, lse = B._forward(st, r, r, r, None)
        if case == "bbwd":
            dq, dk, dv = B._backward(st, r, r, r, None, o, lse, o)
            return B._from_rows(dq + dk + dv, 1)
        return B._from_rows(o, 1)
    f = jax.jit(lambda q: jax.shard_map(inner, mesh=mesh, in_specs=(spec,), out_specs=spec, check_vma=False)(q).sum())
    print(f(q))
elif case == "bwd":
    spec = P("data", None, None, None)
    att = lambda q, k, v, causal: jax.shard_map(lambda q, k, v: blocked_attention(q, k, v, causal=causal), mesh=mesh, in_specs=(spec,)*3, out_specs=spec, check_vma=False)(q, k, v)
    if os.environ.get("SM") != "1":
        att = blocked_attention
    f = jax.jit(jax.grad(lambda q: att(q, q, q, causal=causal).sum()))
    print(f(q).sum())
else:
    w = jnp.ones((3, D, D)) * 0.1
    spec = P("data", None, None, None)
    att = lambda q, k, v, causal: jax.shard_map(lambda q, k, v: blocked_attention(q, k, v, causal=causal), mesh=mesh, in_specs=(spec,)*3, out_specs=spec, check_vma=False)(q, k, v)
    if os.environ.get("SM") != "1":
        att = blocked_attention
    def loss(w, q):
        def layer(h, wl):
            if case == "scanremat":
                return jax.checkpoint(lambda h, wl: h + att(h @ wl, h, h, causal=causal))(h, wl), None
            return h + att(h @ wl, h, h, causal=causal), None
        h, _ = jax.lax.scan(layer, q, w)
        return h.sum()
    f = jax.jit(jax.grad(loss), out_shardings=NamedSharding(mesh, P()))
    print(f(w, q).sum())

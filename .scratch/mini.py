import os, sys, subprocess, socket
if len(sys.argv) == 1:
    with socket.socket() as s:
        s.bind(("localhost", 0)); port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONFAULTHANDLER": "1"}
    ps = [subprocess.Popen([sys.executable, __file__, str(i), str(port), os.environ.get("CASE", "sum")], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    for p in ps:
        out, _ = p.communicate(timeout=120); print("rc", p.returncode, out[-800:] if p.returncode else out[-200:])
    sys.exit()
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"localhost:{sys.argv[2]}", num_processes=2, process_id=int(sys.argv[1]))
case = sys.argv[3]
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(np.array(jax.devices()), ("data",))
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), np.ones((4, 8), np.float32))
w = jax.device_put(np.ones((8, 8), np.float32), NamedSharding(mesh, P()))
if case == "sum":
    f = jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, P()))
    print(f(x))
elif case == "grad":
    f = jax.jit(jax.grad(lambda w, x: jnp.tanh(x @ w).sum()), out_shardings=NamedSharding(mesh, P()))
    print(f(w, x).sum())
elif case == "scan":
    def loss(w, x):
        h, _ = jax.lax.scan(lambda h, _: (jnp.tanh(h @ w), None), x, None, length=3)
        return h.sum()
    f = jax.jit(jax.grad(loss), out_shardings=NamedSharding(mesh, P()))
    print(f(w, x).sum())

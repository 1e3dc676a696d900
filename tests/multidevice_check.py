"""Run by test_step in a subprocess with 4 simulated CPU devices: losses on 1 and 4 devices."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from genesis_jax import config as C
from genesis_jax.sampler import MaskParams, build_device_corpus
from genesis_jax.sharding import make_mesh
from genesis_jax.step import StepControls, init_model, init_state, make_train_step


def losses(n_devices: int, steps: int = 4) -> list[float]:
    cfg = C.from_dict({"model": {"preset": "test", "compute_dtype": "float32"}, "data": {"seq_len": 16},
                       "training": {"batch_size": 8, "grad_accum_steps": 2, "max_steps": 10},
                       "optim": {"warmup_steps": 0, "lr": 1e-2}})
    mesh = make_mesh(n_devices)
    rng = np.random.default_rng(0)
    tokens = rng.integers(97, 123, size=4000).astype(np.uint8)
    corpus = build_device_corpus(tokens, (tokens == 97).astype(np.uint8), np.array([0, 1500, 4000]), 16,
                                 NamedSharding(mesh, P()))
    model = init_model(cfg)
    state = jax.device_put(init_state(cfg, model), NamedSharding(mesh, P()))
    step = jax.jit(make_train_step(cfg, nnx.graphdef(model), mesh), donate_argnums=0)
    out = []
    for _ in range(steps):
        state, m = step(state, corpus, jax.random.key(3), StepControls.make(mask=MaskParams.make("wwm", 0.2)))
        out.append(float(m["loss"]))
    return out


if __name__ == "__main__":
    assert jax.device_count() == 4, jax.devices()
    json.dump({"one": losses(1), "four": losses(4)}, sys.stdout)

"""Run by the tests in a subprocess with 4 simulated CPU devices: losses and per-device bytes
on meshes of 1 and 4 devices (parallel/sharding.py), from the same seed and the same batches."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax
import numpy as np

from genesis_jax import config as C
from genesis_jax.data.device import build_device_corpus
from genesis_jax.data.masks import MaskParams
from genesis_jax.parallel.sharding import bytes_per_device, make_mesh, replicated
from genesis_jax.training.build import placed_state
from genesis_jax.training.step import StepControls, make_train_step

# name -> (devices, [parallel], accumulation steps, mask kind)
MESHES = {
    "one": (1, {}, 2, "wwm"),
    "data4": (4, {}, 2, "wwm"),
    "fsdp4": (4, {"data": 1, "fsdp": 4}, 2, "wwm"),
    "data2_tensor2": (4, {"data": 2, "tensor": 2}, 2, "wwm"),
    "fsdp2_tensor2": (4, {"data": 1, "fsdp": 2, "tensor": 2}, 2, "wwm"),
    "one_plain": (1, {}, 1, "none"),
    "fsdp2_tensor2_plain": (4, {"data": 1, "fsdp": 2, "tensor": 2}, 1, "none"),
}


def run(n_devices: int, parallel: dict, accum: int, mask: str, attention: str, steps: int = 4) -> dict:
    cfg = C.from_dict(
        {
            "model": {"preset": "test", "compute_dtype": "float32", "n_kv_heads": 2, "attention": attention},
            "data": {"seq_len": 16},
            "training": {"batch_size": 8, "grad_accum_steps": accum, "max_steps": 10},
            "optim": {"warmup_steps": 0, "lr": 1e-2},
            "parallel": parallel,
        }
    )
    mesh = make_mesh(n_devices, cfg.parallel)
    rng = np.random.default_rng(0)
    tokens = rng.integers(97, 123, size=4000).astype(np.uint8)
    corpus = build_device_corpus(
        tokens, (tokens == 97).astype(np.uint8), np.array([0, 1500, 4000]), 16, replicated(mesh)
    )
    graphdef, state, shardings = placed_state(cfg, mesh)
    per_device = bytes_per_device((state.params, state.opt_state))
    everywhere = replicated(mesh)
    step = jax.jit(
        make_train_step(cfg, graphdef, mesh),
        donate_argnums=0,
        in_shardings=(shardings, everywhere, everywhere, everywhere),
        out_shardings=(shardings, everywhere),
    )
    losses = []
    for _ in range(steps):
        state, m = step(state, corpus, jax.random.key(3), StepControls.make(mask=MaskParams.make(mask, 0.2)))
        losses.append(float(m["loss"]))
    return {"losses": losses, "max_bytes_per_device": max(per_device.values()), "devices": len(per_device)}


def local_attention_shape() -> list[int]:
    """The q shape the attention backend sees inside per_shard on a data=1, fsdp=2, tensor=2 mesh."""
    import jax.numpy as jnp

    from genesis_jax.model import attention
    from genesis_jax.model.attention import per_shard

    seen = []

    def probe(q, k, v, *, causal=True, segment_ids=None, sm_scale=None):
        seen.append(list(q.shape))
        return attention.BACKENDS["xla"].fn(q, k, v, causal=causal, segment_ids=segment_ids, sm_scale=sm_scale)

    mesh = make_mesh(4, C.from_dict({"parallel": {"data": 1, "fsdp": 2, "tensor": 2}}).parallel)
    wrapped = per_shard(attention.Backend("probe", probe, attention.BACKENDS["xla"].decode, None, "probe"), mesh)
    q = jnp.ones((8, 16, 4, 8))
    kv = jnp.ones((8, 16, 2, 8))
    jax.jit(lambda q, k, v: wrapped.fn(q, k, v))(q, kv, kv)
    return seen[0]


if __name__ == "__main__":
    assert jax.device_count() == 4, jax.devices()
    out = {name: run(*MESHES[name], "xla") for name in MESHES}
    out["pallas_fsdp2_tensor2"] = run(*MESHES["fsdp2_tensor2"], "pallas")
    out["local_shape"] = local_attention_shape()
    json.dump(out, sys.stdout)

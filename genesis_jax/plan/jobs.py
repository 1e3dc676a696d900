"""What `plan` compiles, built from shapes alone on the target's (compile-only) devices: the
train and validation steps of a config, or one attention kernel call. Runs in the compiler
process (worker.py); nothing here executes on a device."""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from .. import config as config_lib
from ..data.masks import MaskParams
from ..evaluation.suite import jit_validation_step
from ..kernels.flash_attention import BlockSizes
from ..model import attention
from ..model.flops import train_flops_per_token
from ..parallel.sharding import batch_sharding, batch_split, check_devices, make_mesh, replicated, shard_bytes
from ..training.build import abstract_state, jit_step, load_data
from ..training.step import StepControls


@dataclass
class Program:
    name: str
    fn: jax.stages.Wrapped
    args: tuple[Any, ...]


def shaped(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """Shape-and-dtype stand-ins for a tree of arrays, placed by one sharding."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def train_job(job: dict[str, Any], devices: list[jax.Device]) -> tuple[list[Program], dict[str, Any]]:
    """The config's train step and validation step, with the state, corpus and batches a run
    would hold, sharded over `devices` as `[parallel]` says."""
    cfg = config_lib.load(job["config"], job["set"])
    mesh = make_mesh(len(devices), cfg.parallel, devices)
    check_devices(cfg.training.batch_size, cfg.model, mesh)
    data = load_data(cfg)
    graphdef, state, shardings = abstract_state(cfg, mesh)
    everywhere = replicated(mesh)
    corpus = shaped(data.arrays, everywhere)
    key = shaped(jax.eval_shape(lambda: jax.random.key(cfg.training.seed)), everywhere)
    controls = shaped(
        jax.eval_shape(lambda: StepControls.make(mask=MaskParams.make(mask_id=cfg.data.mask_id))), everywhere
    )
    rows = batch_sharding(mesh)
    window = jax.ShapeDtypeStruct((cfg.training.batch_size, cfg.data.seq_len), jnp.int32, sharding=rows)
    t, m = cfg.training, cfg.model
    split = batch_split(mesh)
    info = {
        "parameters": shard_bytes(state.params),
        "optimizer": shard_bytes((state.opt_state, state.step, state.loss_ema)),
        "corpus": shard_bytes(corpus),
        "validation_batch": 2 * shard_bytes(window),
        "n_parameters": sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)),
        "attention": attention.backend(m.attention).name,
        "n_layers": m.n_layers,
        "remat": m.remat,
        "model": f"{m.preset} (dim {m.dim}, {m.n_layers} layers, {m.n_heads}/{m.n_kv_heads} heads of {m.head_dim}, "
        f"{m.compute_dtype})",
        "batch": f"{t.grad_accum_steps} x {t.batch_size} x {cfg.data.seq_len} tokens per step "
        f"({t.batch_size // split} sequences per device per micro-batch)",
        "rows_per_device": t.batch_size // split,
        # inputs and labels (int32), mask (bool) per token, a locale (int32) per row: drawn on the device
        "batch_bytes": t.grad_accum_steps * (t.batch_size // split) * (cfg.data.seq_len * 9 + 4),
        "mesh": dict(mesh.shape),
        # what the speed prediction needs (speed.py)
        "devices": len(devices),
        "batch_size": t.batch_size,
        "tokens_per_step": t.grad_accum_steps * t.batch_size * cfg.data.seq_len,
        "model_flops_per_token": train_flops_per_token(m, cfg.data.seq_len),
        "max_steps": t.max_steps,
        "val_interval": t.val_interval,
        "val_windows": len(data.windows.inputs),
    }
    programs = [
        Program(
            "train step", jit_step(cfg, graphdef, mesh, shardings, len(data.locales)), (state, corpus, key, controls)
        ),
        Program(
            "validation step",
            jit_validation_step(graphdef, rows, shardings.params, everywhere),
            (state.params, window, window),
        ),
    ]
    return programs, info


KERNEL_MODULES = {"flash_attention": "flash_attention", "flash_attention_mgpu": "mosaic.forward"}  # kernel -> module


def attention_job(job: dict[str, Any], devices: list[jax.Device]) -> tuple[list[Program], dict[str, Any]]:
    """One kernel call (`job["kernel"]`: a kernel function of `genesis_jax.kernels`, found through
    KERNEL_MODULES), forward or forward and backward, compiled
    (never interpreted) at the job's shape, dtype and block sizes."""
    b, sq, skv, hq, hkv, d = job["shape"]
    dtype = jnp.dtype(job["dtype"])
    on = jax.sharding.make_single_device_sharding(devices[0])
    q = jax.ShapeDtypeStruct((b, sq, hq, d), dtype, sharding=on)
    kv = jax.ShapeDtypeStruct((b, skv, hkv, d), dtype, sharding=on)
    seg = jax.ShapeDtypeStruct((b, sq), jnp.int32, sharding=on) if job.get("segments") else None
    options: dict[str, Any] = {"causal": job.get("causal", True), "interpret": False}
    if job.get("block_sizes"):
        options["block_sizes"] = BlockSizes(**job["block_sizes"])
    name = job.get("kernel", "flash_attention")
    module = importlib.import_module(f"..kernels.{KERNEL_MODULES[name]}", __package__)
    kernel = functools.partial(getattr(module, name), **options)

    def forward(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array | None) -> jax.Array:
        return kernel(q, k, v, segment_ids=seg)

    def loss(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array | None) -> jax.Array:
        return forward(q, k, v, seg).astype(jnp.float32).sum()

    fn: Callable[..., Any] = jax.grad(loss, argnums=(0, 1, 2)) if job.get("backward", True) else forward
    return [Program("attention", jax.jit(fn), (q, kv, kv, seg))], {}


JOBS = {"train": train_job, "attention": attention_job}

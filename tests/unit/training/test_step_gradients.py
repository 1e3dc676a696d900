"""The whole jitted train step's gradients, on every CPU code path we ship, against a float64
NumPy reference: the step draws its batch on the device, runs the model forward and backward
under jit (with the XLA:CPU settings the engine sets) and takes one AdamW update; with
clipping and decay off, Adam's first moment after one update is (1 - beta1) x the gradient.
For each parameter, a random direction's central difference of the float64 NumPy loss must
equal the gradient's projection on it. XLA:CPU has miscompiled reduction gradients before
(YNNPACK fusion on 0.11.2); a flag or a program-shape change that does so again fails here."""

from __future__ import annotations

import dataclasses
import types

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from reference import np_llama_logits

from genesis_jax import config as C
from genesis_jax.corpus.store import open_corpus
from genesis_jax.data.device import build_device_corpus
from genesis_jax.data.sampler import lm_batch
from genesis_jax.parallel.sharding import make_mesh
from genesis_jax.training.state import init_model, init_state
from genesis_jax.training.step import StepControls, make_train_step

BETA1 = 0.9
SEQ = 130  # three query blocks of the blocked attention (64 positions each), the last one short

# The CPU paths: each attention backend, both norms, remat, an unrolled layer scan, and
# accumulation over micro-batches.
PATHS = {
    "xla-deepnorm": {"model": {"attention": "xla", "norm_type": "deepnorm"}},
    "xla-rmsnorm-gqa-remat": {"model": {"attention": "xla", "norm_type": "rmsnorm", "n_kv_heads": 2, "remat": True}},
    "reference-deepnorm-unrolled-accum": {
        "model": {"attention": "reference", "norm_type": "deepnorm", "scan_unroll": 2},
        "training": {"grad_accum_steps": 2},
    },
}


def namespace(tree: object) -> object:
    """Attribute access over a nested dict of arrays, as np_llama_logits reads a model."""
    if isinstance(tree, dict):
        return types.SimpleNamespace(**{k: namespace(v) for k, v in tree.items()})
    return tree


def np_loss(params: dict, cfg: C.Config, inputs: np.ndarray, labels: np.ndarray) -> float:
    logits = np_llama_logits(namespace(params), cfg, inputs)
    top = logits.max(-1, keepdims=True)
    logz = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    picked = np.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return float((logz - picked).mean())


@pytest.mark.parametrize("path", list(PATHS))
def test_jitted_train_step_gradients_match_float64_numpy(fixture_corpus, path):
    keys = PATHS[path]
    cfg = C.from_dict(
        {
            "model": {"preset": "test", "compute_dtype": "float32", "n_layers": 2, **keys["model"]},
            "data": {"seq_len": SEQ},
            "training": {"batch_size": 2, "max_steps": 3, **keys.get("training", {})},
            "optim": {"lr": 1e-3, "warmup_steps": 0, "beta1": BETA1, "weight_decay": 0.0, "grad_clip": 0.0},
        }
    )
    c = open_corpus(fixture_corpus)
    dc = build_device_corpus(*c.stream(c.locales, heldout=False), SEQ)
    model = init_model(cfg)
    graphdef = nnx.graphdef(model)
    state = jax.device_put(init_state(cfg, model), NamedSharding(make_mesh(), P()))
    rng = np.random.default_rng(7)
    # Norm scales and biases away from 1 and 0, so that their gradients and uses are all felt.
    params = jax.tree.map(lambda x: np.asarray(x, np.float64), nnx.to_pure_dict(state.params))
    for name in ("norm1", "norm2"):
        for leaf, v in params["blocks"][name].items():
            params["blocks"][name][leaf] = v + rng.normal(0, 0.2, v.shape)
    moved = jax.tree.map(lambda x: x, state.params)
    nnx.replace_by_pure_dict(moved, jax.tree.map(lambda p: np.asarray(p, np.float32), params))
    state = dataclasses.replace(state, params=jax.device_put(moved, NamedSharding(make_mesh(), P())))
    key = jax.random.key(11)
    ctl = StepControls.make(1.0, 1.0)
    step = jax.jit(make_train_step(cfg, graphdef, make_mesh()))
    after, _ = step(state, dc, key, ctl)
    (adam,) = [
        s
        for s in jax.tree.leaves(after.opt_state, is_leaf=lambda n: isinstance(n, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)
    ]
    grads = jax.tree.map(lambda m: np.asarray(m, np.float64) / (1 - BETA1), nnx.to_pure_dict(adam.mu))
    batch = lm_batch(dc, jax.random.fold_in(key, 0), cfg.training.grad_accum_steps * 2, SEQ, ctl.mask)
    inputs, labels = np.asarray(batch.inputs), np.asarray(batch.labels)

    flat, tree = jax.tree_util.tree_flatten_with_path(params)
    gflat = jax.tree.leaves(grads)
    checked = 0
    for (where, p), g in zip(flat, gflat, strict=True):
        u = rng.normal(size=p.shape)
        u /= np.linalg.norm(u)
        eps = 1e-4 * max(1.0, float(np.abs(p).max()))
        loss_at = []
        for sign in (1, -1):
            moved = [v + sign * eps * u if w == where else v for w, v in flat]
            loss_at.append(np_loss(jax.tree_util.tree_unflatten(tree, moved), cfg, inputs, labels))
        fd = (loss_at[0] - loss_at[1]) / (2 * eps)
        got = float((g * u).sum())
        scale = float(np.linalg.norm(g)) / np.sqrt(g.size)  # a random unit direction's typical projection
        assert abs(got - fd) <= 1e-4 * scale, (path, jax.tree_util.keystr(where), got, fd, scale)
        checked += 1
    assert checked == len(gflat) >= 9

"""AdamW with a decay mask, global-norm clipping, the warmup+cosine schedule and the stun multiplier (docs/design.md, "The step")."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ..config.schema import OptimConfig

Schedule = Callable[[jax.Array | int], jax.Array]


def lr_schedule(o: OptimConfig, max_steps: int) -> Schedule:
    """lr(s) = base (s+1)/(warmup+1) for s < warmup, then cosine to base * min_lr_ratio at max_steps."""
    base, warm, floor = o.lr, o.warmup_steps, o.lr * o.min_lr_ratio

    def schedule(step: jax.Array | int) -> jax.Array:
        s = jnp.asarray(step, jnp.float32)
        warmup = base * (s + 1.0) / (warm + 1.0)
        if o.schedule == "constant":
            after = jnp.float32(base)
        else:
            span = max(max_steps - warm, 1)
            progress = jnp.clip((s - warm) / span, 0.0, 1.0)
            after = floor + (base - floor) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
        return jnp.where(s < warm, warmup, after)

    return schedule


def _path_names(path: tuple[Any, ...]) -> list[str]:
    return [str(getattr(p, "key", getattr(p, "name", p))) for p in path]


def decay_mask(params: nnx.State, decay_embedding: bool) -> nnx.State:
    """True for linear kernels (and the tied embedding when asked); norms never decay."""

    def want(path: tuple[Any, ...], _: Any) -> bool:
        names = _path_names(path)
        return "kernel" in names or (decay_embedding and "embed" in names)

    return jax.tree_util.tree_map_with_path(want, params)


def make_optimizer(o: OptimConfig, max_steps: int) -> optax.GradientTransformation:
    """Clip -> AdamW(schedule) -> scale(stun multiplier); the last is an injectable hyperparameter."""
    parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
    parts.append(
        optax.adamw(
            lr_schedule(o, max_steps),
            b1=o.beta1,
            b2=o.beta2,
            eps=o.eps,
            weight_decay=o.weight_decay,
            mask=lambda p: decay_mask(p, o.decay_embedding),
        )
    )
    parts.append(optax.inject_hyperparams(optax.scale)(step_size=1.0))
    return optax.chain(*parts)


def set_lr_multiplier(opt_state: optax.OptState, multiplier: jax.Array) -> optax.OptState:
    """Write the stun multiplier into the last chain element's hyperparameters."""
    *head, last = opt_state
    hp = dict(last.hyperparams)
    hp["step_size"] = jnp.asarray(multiplier, jnp.float32)
    return (*head, last._replace(hyperparams=hp))


def scale_first_moment(opt_state: optax.OptState, factor: jax.Array) -> optax.OptState:
    """Multiply Adam's `mu` by `factor` wherever it occurs in the optimizer state (the stun's
    momentum reset, beside the LR multiplier it comes with)."""

    def visit(node: Any) -> Any:
        if isinstance(node, optax.ScaleByAdamState):
            return node._replace(mu=jax.tree.map(lambda m: m * factor, node.mu))
        return node

    return jax.tree.map(visit, opt_state, is_leaf=lambda n: isinstance(n, optax.ScaleByAdamState))

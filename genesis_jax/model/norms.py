"""RMSNorm and LayerNorm with hand-written backward passes.

Autodiff of the textbook formulas keeps every intermediate (the centred input, its square, the
normalised output) for the backward, and XLA stacks each of them per layer in the layer scan;
its backward reduces them one by one. These keep the normalised input and the reciprocal
standard deviation only, and the backward is the closed form: for x_hat = (x - mean) * rstd and
g = dy * scale,

    LayerNorm: dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))
    RMSNorm:   dx = rstd * (g - x_hat * mean(g * x_hat))

with d scale = sum(dy * x_hat) and d bias = sum(dy) over every axis but the last. Statistics are
taken in float32 whatever the compute dtype.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

RMS_EPS, LAYER_NORM_EPS = 1e-6, 1e-5  # the norms' epsilons (an export's config.json states them)

Residuals = tuple[jax.Array, jax.Array, jax.Array]  # x_hat, rstd, scale


def _batch_axes(x: jax.Array) -> tuple[int, ...]:
    return tuple(range(x.ndim - 1))


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """(x - mean) / sqrt(var + eps) * scale + bias over the last axis, in float32."""
    return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> tuple[jax.Array, Residuals]:
    xf = x.astype(jnp.float32)
    centred = xf - jnp.mean(xf, axis=-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)
    x_hat = centred * rstd
    return (x_hat * scale + bias).astype(x.dtype), (x_hat, rstd, scale)


def _layer_norm_bwd(eps: float, res: Residuals, dy: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    x_hat, rstd, scale = res
    dyf = dy.astype(jnp.float32)
    g = dyf * scale
    mean_g = jnp.mean(g, axis=-1, keepdims=True)
    mean_gx = jnp.mean(g * x_hat, axis=-1, keepdims=True)
    dx = rstd * (g - mean_g - x_hat * mean_gx)
    axes = _batch_axes(dy)
    return dx.astype(dy.dtype), jnp.sum(dyf * x_hat, axis=axes), jnp.sum(dyf, axis=axes)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) * scale over the last axis, in float32."""
    return _rms_norm_fwd(x, scale, eps)[0]


def _rms_norm_fwd(x: jax.Array, scale: jax.Array, eps: float) -> tuple[jax.Array, Residuals]:
    xf = x.astype(jnp.float32)
    rstd = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    x_hat = xf * rstd
    return (x_hat * scale).astype(x.dtype), (x_hat, rstd, scale)


def _rms_norm_bwd(eps: float, res: Residuals, dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    x_hat, rstd, scale = res
    dyf = dy.astype(jnp.float32)
    g = dyf * scale
    dx = rstd * (g - x_hat * jnp.mean(g * x_hat, axis=-1, keepdims=True))
    return dx.astype(dy.dtype), jnp.sum(dyf * x_hat, axis=_batch_axes(dy))


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float = RMS_EPS):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float = LAYER_NORM_EPS):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, self.scale[...], self.bias[...], self.eps)

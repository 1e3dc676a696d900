"""The multi-task heads (docs/design.md, "Multi-task learning") on mean-pooled final hidden states
(padding excluded): coherence is an MLP on [a; b], cross_ref and paraphrase are projections
compared by cosine."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ..config.schema import ModelSpec, MTLConfig
from .attention import Backend
from .llama import Llama


class TaskHeads(nnx.Module):
    """Small MLPs on pooled hidden states; float32, outside the decoder."""

    def __init__(self, dim: int, cfg: MTLConfig, rngs: nnx.Rngs):
        h = cfg.head_dim
        self.coh_in = nnx.Linear(2 * dim, h, rngs=rngs)
        self.coh_out = nnx.Linear(h, 1, rngs=rngs)
        self.xref_in = nnx.Linear(dim, h, rngs=rngs)
        self.xref_out = nnx.Linear(h, h, rngs=rngs)
        self.para_in = nnx.Linear(dim, h, rngs=rngs)
        self.para_out = nnx.Linear(h, h, rngs=rngs)

    def coherence(self, a: jax.Array, b: jax.Array) -> jax.Array:
        return self.coh_out(jax.nn.gelu(self.coh_in(jnp.concatenate([a, b], axis=-1))))[..., 0]

    def cross_ref(self, x: jax.Array) -> jax.Array:
        return self.xref_out(jax.nn.gelu(self.xref_in(x)))

    def paraphrase(self, x: jax.Array) -> jax.Array:
        return self.para_out(jax.nn.gelu(self.para_in(x)))


class MultiTaskLlama(Llama):
    """The decoder with the task heads trained beside it; the heads sit under `heads` in the
    parameter tree, where checkpoints keep them."""

    def __init__(
        self, cfg: ModelSpec, mtl: MTLConfig, rngs: nnx.Rngs, head_rngs: nnx.Rngs, attn: Backend | None = None
    ):
        super().__init__(cfg, rngs, attn)
        self.heads = TaskHeads(cfg.dim, mtl, head_rngs)


def pooled(hidden: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean of the hidden states over valid (non-padding) positions, float32."""
    v = valid[..., None].astype(jnp.float32)
    return (hidden.astype(jnp.float32) * v).sum(axis=1) / jnp.maximum(v.sum(axis=1), 1.0)


def _cos(a: jax.Array, b: jax.Array) -> jax.Array:
    return (a * b).sum(-1) / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-6)

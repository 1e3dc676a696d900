"""Next-byte cross-entropy of the language model, per batch or per sequence, and the jitted
evaluation step that validation and the evaluation suite share."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import optax
from flax import nnx

from ..data.sampler import Batch


def sequence_losses(graphdef: nnx.GraphDef, params: nnx.State, inputs: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean next-byte cross-entropy of each window (float32): the loss training and evaluation share."""
    logits = nnx.merge(graphdef, params)(inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(axis=-1)


def make_loss_fn(graphdef: nnx.GraphDef, per_sequence: bool = False) -> Callable[[nnx.State, Batch], jax.Array]:
    """Mean next-byte cross-entropy of a batch (or one value per sequence)."""

    def loss_fn(params: nnx.State, batch: Batch) -> jax.Array:
        per_seq = sequence_losses(graphdef, params, batch.inputs, batch.labels)
        return per_seq if per_sequence else per_seq.mean()

    return loss_fn


def make_eval_step(graphdef: nnx.GraphDef) -> Callable[[nnx.State, jax.Array, jax.Array], jax.Array]:
    """`eval(params, inputs, labels) -> per-window mean cross-entropy` (float32)."""
    return functools.partial(sequence_losses, graphdef)

"""The jitted train and eval steps over one state pytree (nanodo style)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .config import Config
from .model import Llama
from .optim import lr_schedule, make_optimizer, set_lr_multiplier
from .sampler import Batch, DeviceCorpus, MaskParams, lm_batch


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class TrainState:
    params: Any  # nnx.State of the model's Params, float32
    opt_state: Any
    step: jax.Array  # int32 number of updates done
    loss_ema: jax.Array  # float32 0.99 * ema + 0.01 * loss (first value = first loss)


def make_mesh(n_devices: int | None = None) -> Mesh:
    """A 1-D mesh with a `data` axis over the devices; batches are sharded along it."""
    n = n_devices or jax.device_count()
    return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def init_model(cfg: Config, attn_fn: Callable[..., jax.Array] | None = None) -> Llama:
    return Llama(cfg.model, nnx.Rngs(params=cfg.training.seed), attn_fn=attn_fn)


def init_state(cfg: Config, model: Llama) -> TrainState:
    params = nnx.state(model, nnx.Param)
    tx = make_optimizer(cfg.optim, cfg.training.max_steps)
    # Strongly typed leaves, so the state returned by the step never retraces it.
    opt_state = set_lr_multiplier(tx.init(params), jnp.float32(1.0))
    return TrainState(params=params, opt_state=opt_state, step=jnp.asarray(0, jnp.int32),
                      loss_ema=jnp.asarray(0.0, jnp.float32))


def make_loss_fn(graphdef: nnx.GraphDef, per_sequence: bool = False) -> Callable[[Any, Batch], jax.Array]:
    """Mean next-byte cross-entropy of a batch (or one value per sequence)."""

    def loss_fn(params: Any, batch: Batch) -> jax.Array:
        logits = nnx.merge(graphdef, params)(batch.inputs)
        per_seq = optax.softmax_cross_entropy_with_integer_labels(logits, batch.labels).mean(axis=-1)
        return per_seq if per_sequence else per_seq.mean()

    return loss_fn


def accumulate_grads(grad_fn: Callable[[Any, Batch], tuple[tuple[jax.Array, Any], Any]], params: Any,
                     batches: Batch) -> tuple[jax.Array, Any, Any]:
    """Mean loss and gradient over the leading micro-batch axis: one update for all of them.

    `grad_fn` is `value_and_grad(..., has_aux=True)`; the auxiliary outputs are stacked.
    """

    def micro_step(carry: tuple[jax.Array, Any], batch: Batch) -> tuple[tuple[jax.Array, Any], Any]:
        l_acc, g_acc = carry
        (loss, aux), g = grad_fn(params, batch)
        return (l_acc + loss, jax.tree.map(jnp.add, g_acc, g)), aux

    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss_sum, grads), aux = jax.lax.scan(micro_step, (jnp.float32(0.0), zeros), batches)
    n = jax.tree.leaves(batches)[0].shape[0]
    return loss_sum / n, jax.tree.map(lambda g: g / n, grads), aux


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class StepControls:
    """Runtime scalars of one step: new values never retrace it."""

    lr_mult: jax.Array  # float32 stun multiplier on the learning rate
    mu_scale: jax.Array  # float32 scale of Adam's first moment before this update (stun)
    mask: MaskParams

    @staticmethod
    def make(lr_mult: float = 1.0, mu_scale: float = 1.0, mask: MaskParams | None = None) -> "StepControls":
        return StepControls(jnp.float32(lr_mult), jnp.float32(mu_scale), mask or MaskParams.make())


def scale_first_moment(opt_state: Any, factor: jax.Array) -> Any:
    """Multiply Adam's `mu` by `factor` wherever it occurs in the optimizer state."""

    def visit(node: Any) -> Any:
        if isinstance(node, optax.ScaleByAdamState):
            return node._replace(mu=jax.tree.map(lambda m: m * factor, node.mu))
        return node

    return jax.tree.map(visit, opt_state, is_leaf=lambda n: isinstance(n, optax.ScaleByAdamState))


def make_train_step(cfg: Config, graphdef: nnx.GraphDef, mesh: Mesh,
                    n_locales: int = 1) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """Build `step(state, corpus, seed_key, controls) -> (state, metrics)` (not yet jitted).

    The batch of update s is drawn from fold_in(seed_key, s) as accum x B windows, so an
    accumulated step sees exactly the windows of one big batch of accum * B. Metrics carry the
    summed per-sequence loss and the window count per locale, for per-locale telemetry.
    """
    t = cfg.training
    tx = make_optimizer(cfg.optim, t.max_steps)
    schedule = lr_schedule(cfg.optim, t.max_steps)
    accum, micro, seq_len = t.grad_accum_steps, t.batch_size, cfg.data.seq_len
    batch_sharding = NamedSharding(mesh, P(None, "data"))

    graph_loss = make_loss_fn(graphdef, per_sequence=True)

    def loss_fn(params: Any, batch: Batch) -> tuple[jax.Array, jax.Array]:
        per_seq = graph_loss(params, batch)
        return per_seq.mean(), per_seq

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, corpus: DeviceCorpus, seed_key: jax.Array,
             controls: StepControls) -> tuple[TrainState, dict[str, jax.Array]]:
        key = jax.random.fold_in(seed_key, state.step)
        flat = lm_batch(corpus, key, accum * micro, seq_len, controls.mask)
        batches = jax.tree.map(lambda x: x.reshape(accum, micro, *x.shape[1:]), flat)
        batches = jax.lax.with_sharding_constraint(batches, jax.tree.map(lambda _: batch_sharding, batches))

        loss, grads, per_seq = accumulate_grads(grad_fn, state.params, batches)
        grad_norm = optax.tree.norm(grads)
        opt_state = set_lr_multiplier(scale_first_moment(state.opt_state, controls.mu_scale), controls.lr_mult)
        updates, opt_state = tx.update(grads, opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = jnp.where(state.step == 0, loss, 0.99 * state.loss_ema + 0.01 * loss)
        locale = batches.locale.reshape(-1)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step) * controls.lr_mult,
                   "loss_ema": ema, "step": state.step, "mask_frac": flat.masked.mean(),
                   "locale_loss_sum": jax.ops.segment_sum(per_seq.reshape(-1), locale, num_segments=n_locales),
                   "locale_count": jax.ops.segment_sum(jnp.ones_like(per_seq.reshape(-1)), locale, num_segments=n_locales)}
        return TrainState(params=params, opt_state=opt_state, step=state.step + 1, loss_ema=ema), metrics

    return step


def make_eval_step(graphdef: nnx.GraphDef) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    """`eval(params, inputs, labels) -> per-window mean cross-entropy` (float32)."""

    def evaluate(params: Any, inputs: jax.Array, labels: jax.Array) -> jax.Array:
        logits = nnx.merge(graphdef, params)(inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(axis=-1)

    return evaluate

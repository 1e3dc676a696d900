"""The jitted train step over one state pytree (nanodo style): gradient accumulation over
micro-batches, the task mixture when multi-task learning is on, the AdamW update with the
curriculum's runtime controls (learning-rate multiplier, first-moment scale, masking), and the
non-finite guard."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from ..config.schema import Config
from ..data.device import DeviceCorpus
from ..data.masks import MaskParams
from ..data.sampler import Batch, lm_batch
from ..data.verses import N_TASKS, TASK_IDS, TASK_NAMES
from ..model.heads import MultiTaskLlama
from ..model.loss import make_loss_fn
from ..parallel.sharding import batch_sharding as batch_sharding_of
from .objectives import task_loss
from .optim import lr_schedule, make_optimizer, scale_first_moment, set_lr_multiplier
from .state import TrainState

TASK_STREAM = 7  # fold_in constant of the multi-task draws (task choice, examples), apart from the LM batch's


GradFn = Callable[[nnx.State, Batch], tuple[tuple[jax.Array, jax.Array], nnx.State]]  # ((loss, per-sequence), grads)


MixtureOut = tuple[jax.Array, nnx.State, jax.Array, jax.Array, dict[str, jax.Array], jax.Array]


def accumulate_grads(grad_fn: GradFn, params: nnx.State, batches: Batch) -> tuple[jax.Array, nnx.State, jax.Array]:
    """Mean loss and gradient over the leading micro-batch axis: one update for all of them.

    `grad_fn` is `value_and_grad(..., has_aux=True)`; the auxiliary outputs are stacked.
    """

    def micro_step(carry: tuple[jax.Array, nnx.State], batch: Batch) -> tuple[tuple[jax.Array, nnx.State], jax.Array]:
        l_acc, g_acc = carry
        (loss, aux), g = grad_fn(params, batch)
        return (l_acc + loss, jax.tree.map(jnp.add, g_acc, g)), aux

    n = jax.tree.leaves(batches)[0].shape[0]
    if n == 1:  # no loop: a one-trip loop still zero-fills the layer scan's saved activations on CPU
        (loss, aux), grads = grad_fn(params, jax.tree.map(lambda x: x[0], batches))
        return loss, grads, jax.tree.map(lambda x: x[None], aux)
    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss_sum, grads), aux = jax.lax.scan(micro_step, (jnp.float32(0.0), zeros), batches)
    return loss_sum / n, jax.tree.map(lambda g: g / n, grads), aux


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class StepControls:
    """Runtime scalars of one step: new values never retrace it."""

    lr_mult: jax.Array  # float32 stun multiplier on the learning rate
    mu_scale: jax.Array  # float32 scale of Adam's first moment before this update (stun)
    mask: MaskParams

    @staticmethod
    def make(lr_mult: float = 1.0, mu_scale: float = 1.0, mask: MaskParams | None = None) -> StepControls:
        return StepControls(jnp.float32(lr_mult), jnp.float32(mu_scale), mask or MaskParams.make())


def make_train_step(cfg: Config, graphdef: nnx.GraphDef, mesh: Mesh, n_locales: int = 1) -> StepFn:
    """Build `step(state, corpus, seed_key, controls) -> (state, metrics)` (not yet jitted).

    The batch of update s is drawn from fold_in(seed_key, s) as accum x B windows, so an
    accumulated step sees exactly the windows of one big batch of accum * B. Metrics carry the
    summed per-sequence loss and the window count per locale, for per-locale telemetry.
    """
    t = cfg.training
    tx = make_optimizer(cfg.optim, t.max_steps)
    schedule = lr_schedule(cfg.optim, t.max_steps)
    decay = cfg.curriculum.loss_ema_decay
    accum, micro, seq_len = t.grad_accum_steps, t.batch_size, cfg.data.seq_len
    batch_sharding = batch_sharding_of(mesh, leading_axes=1)

    graph_loss = make_loss_fn(graphdef, per_sequence=True)

    def loss_fn(params: nnx.State, batch: Batch) -> tuple[jax.Array, jax.Array]:
        per_seq = graph_loss(params, batch)
        return per_seq.mean(), per_seq

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    mixed = make_task_mixture(cfg, graphdef, grad_fn) if cfg.mtl.enabled else None

    def step(
        state: TrainState, corpus: DeviceCorpus, seed_key: jax.Array, controls: StepControls
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        key = jax.random.fold_in(seed_key, state.step)
        flat = lm_batch(corpus, key, accum * micro, seq_len, controls.mask)
        batches = jax.tree.map(lambda x: x.reshape(accum, micro, *x.shape[1:]), flat)
        batches = jax.lax.with_sharding_constraint(batches, jax.tree.map(lambda _: batch_sharding, batches))

        task_metrics: dict[str, jax.Array] = {}
        if mixed is None:
            loss, grads, per_seq = accumulate_grads(grad_fn, state.params, batches)
            is_lm = jnp.ones(per_seq.shape, jnp.float32)
            losses_finite = jnp.isfinite(loss)
        else:
            loss, grads, per_seq, is_lm, task_metrics, losses_finite = mixed(state.params, batches, corpus, key)
        grad_norm = optax.tree.norm(grads)
        controlled = set_lr_multiplier(scale_first_moment(state.opt_state, controls.mu_scale), controls.lr_mult)
        updates, opt_state = tx.update(grads, controlled, state.params)
        params = optax.apply_updates(state.params, updates)
        # The divergence guard: an update whose loss, gradient norm or result is not finite is not
        # applied, so the state (and every checkpoint of it) stays finite; the host reads `nonfinite`.
        ok = losses_finite & jnp.isfinite(grad_norm) & tree_all_finite(params)
        params = jax.tree.map(lambda new, old: jnp.where(ok, new, old), params, state.params)
        opt_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), opt_state, state.opt_state)
        loss_ok = ok & ~jnp.isnan(loss)  # NaN LM loss with multi-task learning: no LM micro-batch this step
        ema = jnp.where(
            loss_ok,
            jnp.where(jnp.isnan(state.loss_ema), loss, decay * state.loss_ema + (1 - decay) * loss),
            state.loss_ema,
        )
        locale = batches.locale.reshape(-1)
        lm_rows = is_lm.reshape(-1)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "nonfinite": ~ok,
            "lr": schedule(state.step) * controls.lr_mult,
            "loss_ema": ema,
            "locale_loss_sum": jax.ops.segment_sum(per_seq.reshape(-1) * lm_rows, locale, num_segments=n_locales),
            "locale_count": jax.ops.segment_sum(lm_rows, locale, num_segments=n_locales),
            **task_metrics,
        }
        return TrainState(params=params, opt_state=opt_state, step=state.step + 1, loss_ema=ema), metrics

    return step


StepFn = Callable[[TrainState, DeviceCorpus, jax.Array, "StepControls"], tuple[TrainState, dict[str, jax.Array]]]


def tree_all_finite(tree: Any) -> jax.Array:
    """One boolean: every element of every floating leaf is finite."""
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def make_task_mixture(
    cfg: Config, graphdef: nnx.GraphDef, lm_grad_fn: GradFn
) -> Callable[[nnx.State, Batch, DeviceCorpus, jax.Array], MixtureOut]:
    """Multi-task accumulation: each micro-batch is one task drawn by the mixture weights; the
    update is the mean over micro-batches of (task loss weight x task loss) gradients."""
    m = cfg.mtl
    mixture = jnp.log(jnp.asarray([m.lm_weight, m.coherence_weight, m.cross_ref_weight, m.paraphrase_weight]))
    loss_w = (m.lm_loss_weight, m.coherence_loss_weight, m.cross_ref_loss_weight, m.paraphrase_loss_weight)
    micro = cfg.training.batch_size

    def run(params: nnx.State, batches: Batch, corpus: DeviceCorpus, key: jax.Array) -> MixtureOut:
        accum = batches.inputs.shape[0]
        k_task, k_ex = jax.random.split(jax.random.fold_in(key, TASK_STREAM))
        tasks = jax.random.categorical(k_task, mixture, shape=(accum,))

        Branch = tuple[
            nnx.State, jax.Array, jax.Array, jax.Array
        ]  # (weighted grads, loss, accuracy, per-sequence loss)

        def lm_branch(batch: Batch, k: jax.Array) -> Branch:
            (loss, per_seq), g = lm_grad_fn(params, batch)
            return jax.tree.map(lambda x: x * loss_w[0], g), loss, jnp.float32(jnp.nan), per_seq

        def aux_branch(task: int) -> Callable[[Batch, jax.Array], Branch]:
            def branch(batch: Batch, k: jax.Array) -> Branch:
                def weighted(p: nnx.State) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
                    model = nnx.merge(graphdef, p)
                    assert isinstance(model, MultiTaskLlama)
                    loss, acc = task_loss(model, task, corpus, corpus.verses, k, micro, m)
                    return loss_w[task] * loss, (loss, acc)

                (_, (loss, acc)), g = jax.value_and_grad(weighted, has_aux=True)(params)
                return g, loss, acc, jnp.zeros((micro,), jnp.float32)

            return branch

        branches = [lm_branch] + [aux_branch(t) for t in TASK_IDS[1:]]

        def micro_step(
            g_acc: nnx.State, x: tuple[Batch, jax.Array, jax.Array]
        ) -> tuple[nnx.State, tuple[jax.Array, jax.Array, jax.Array]]:
            batch, task, k = x
            g, loss, acc, per_seq = jax.lax.switch(task, branches, batch, k)
            return jax.tree.map(jnp.add, g_acc, g), (loss, acc, per_seq)

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, (losses, accs, per_seq) = jax.lax.scan(
            micro_step, zeros, (batches, tasks, jax.random.split(k_ex, accum))
        )
        grads = jax.tree.map(lambda g: g / accum, grads)
        onehot = jax.nn.one_hot(tasks, N_TASKS)
        count = onehot.sum(axis=0)
        is_lm = (tasks == 0).astype(jnp.float32)
        lm_loss = jnp.where(count[0] > 0, (losses * is_lm).sum() / jnp.maximum(count[0], 1.0), jnp.nan)
        metrics = {}
        for i, name in enumerate(TASK_NAMES):
            metrics[f"task/{name}/count"] = count[i]
            metrics[f"task/{name}/loss"] = jnp.where(
                count[i] > 0, (losses * onehot[:, i]).sum() / jnp.maximum(count[i], 1.0), jnp.nan
            )
            if i:
                metrics[f"task/{name}/acc"] = jnp.where(
                    count[i] > 0, (jnp.nan_to_num(accs) * onehot[:, i]).sum() / jnp.maximum(count[i], 1.0), jnp.nan
                )
        losses_finite = jnp.isfinite(losses).all()  # every micro-batch's loss, whatever its task
        return lm_loss, grads, per_seq, jnp.broadcast_to(is_lm[:, None], per_seq.shape), metrics, losses_finite

    return run

"""The training state (parameters, optimizer state, step) and how a model and its state are
initialised, on one device or across a mesh, or started from an export's weights."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from ..config.schema import Config
from ..hf.pretrained import read_pretrained
from ..model import attention
from ..model.attention import per_shard
from ..model.heads import MultiTaskLlama
from ..model.llama import Llama
from ..parallel.sharding import put
from .optim import make_optimizer, set_lr_multiplier


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class TrainState:
    params: nnx.State  # the model's Params, float32
    opt_state: optax.OptState
    step: jax.Array  # int32 number of updates done
    loss_ema: (
        jax.Array
    )  # float32 d * ema + (1 - d) * LM loss, d = curriculum.loss_ema_decay (first = first loss; NaN before)


def init_model(cfg: Config, mesh: Mesh | None = None) -> Llama:
    """The decoder, with the task heads when multi-task learning is on (seeded apart from it).
    On a mesh of several devices, attention runs per shard (sharding.per_shard)."""
    rngs = nnx.Rngs(params=cfg.training.seed)
    attn = attention.backend(cfg.model.attention)
    if mesh is not None and mesh.size > 1:
        attn = per_shard(attn, mesh)
    if cfg.mtl.enabled:
        return MultiTaskLlama(cfg.model, cfg.mtl, rngs, nnx.Rngs(params=cfg.training.seed + 1), attn)
    return Llama(cfg.model, rngs, attn)


def init_state(cfg: Config, model: Llama) -> TrainState:
    params = nnx.state(model, nnx.Param)
    tx = make_optimizer(cfg.optim, cfg.training.max_steps)
    # Strongly typed leaves, so the state returned by the step never retraces it.
    opt_state = set_lr_multiplier(tx.init(params), jnp.float32(1.0))
    # loss_ema starts as NaN: "no LM loss seen yet" (with multi-task learning a step may have none).
    return TrainState(
        params=params, opt_state=opt_state, step=jnp.asarray(0, jnp.int32), loss_ema=jnp.asarray(jnp.nan, jnp.float32)
    )


def start_from_pretrained(state: TrainState, shardings: Any, cfg: Config) -> TrainState:
    """`state` with the decoder's parameters read from `training.init_from` (task heads and the
    optimizer state stay as initialised), placed like the parameters they replace."""
    loaded = read_pretrained(Path(cfg.training.init_from).expanduser(), cfg.model)
    pure = nnx.to_pure_dict(state.params)

    def merge(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
        for key, value in theirs.items():
            if isinstance(value, dict):
                merge(ours[key], value)
            else:
                ours[key] = value

    merge(pure, loaded)
    params = jax.tree.map(lambda x: x, state.params)  # a new State to fill
    nnx.replace_by_pure_dict(params, pure)
    return dataclasses.replace(state, params=put(params, shardings.params))

"""The masking kinds (docs/design.md, "Data"), one registry: each kind is a jittable function
of (key, word starts, parameters), chosen at run time by an integer id, so the curriculum
switches kinds without a retrace."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class MaskParams:
    """Masking settings as runtime values: changing them never retraces the step."""

    kind: jax.Array  # int32 position of the kind in MASK_KINDS (its branch of the switch)
    prob: jax.Array  # float32 target masked fraction p
    span_min: jax.Array  # int32 shortest span, in words
    span_max: jax.Array  # int32 longest span, in words
    mask_id: jax.Array  # int32 id written over masked inputs

    @staticmethod
    def make(
        kind: str = "none", prob: float = 0.0, span_min: int = 1, span_max: int = 1, mask_id: int = 0
    ) -> MaskParams:
        return MaskParams(
            jnp.int32(mask_kind_id(kind)),
            jnp.float32(prob),
            jnp.int32(span_min),
            jnp.int32(span_max),
            jnp.int32(mask_id),
        )


def _word_ids(starts_BxL: jax.Array) -> jax.Array:
    return jnp.cumsum(starts_BxL.astype(jnp.int32), axis=-1)


def _mask_random(key: jax.Array, words: jax.Array, p: MaskParams) -> jax.Array:
    return jax.random.uniform(key, words.shape) < p.prob


def _mask_wwm(key: jax.Array, words: jax.Array, p: MaskParams) -> jax.Array:
    wid = _word_ids(words)
    chosen = jax.random.uniform(key, words.shape) < p.prob  # one draw per word id
    return jnp.take_along_axis(chosen, wid, axis=-1)


def _mask_span(key: jax.Array, words: jax.Array, p: MaskParams) -> jax.Array:
    k_len, k_seed = jax.random.split(key)
    k = jax.random.randint(k_len, (), p.span_min, p.span_max + 1)
    seeds = jax.random.uniform(k_seed, words.shape) < p.prob / k.astype(jnp.float32)
    c = jnp.cumsum(seeds.astype(jnp.int32), axis=-1)
    n = words.shape[-1]
    idx = jnp.arange(n, dtype=jnp.int32)
    before = jnp.where(idx >= k, jnp.take(c, jnp.clip(idx - k, 0, n - 1), axis=-1), 0)
    covered = (c - before) > 0  # a seed within the k words ending at this word id
    return jnp.take_along_axis(covered, _word_ids(words), axis=-1)


MaskFn = Callable[[jax.Array, jax.Array, MaskParams], jax.Array]  # (key, word starts [B, L], params) -> bool [B, L]


@dataclass(frozen=True)
class MaskKind:
    name: str
    fn: MaskFn
    reconstruction: bool  # scored by the evaluation suite's masked reconstruction (recon/<name>/*)
    summary: str


MASK_KINDS: dict[str, MaskKind] = {}  # in branch order: a kind's id is its position


def register_mask(kind: MaskKind) -> MaskKind:
    """Add a masking kind: the step's switch, `MaskParams.make`, the reconstruction suite and the
    step benchmark pick it up from here (the curriculum's phases name the kinds they use)."""
    if kind.name in MASK_KINDS:
        raise ValueError(f"mask kind {kind.name!r} is already registered")
    MASK_KINDS[kind.name] = kind
    return kind


def mask_kind_id(name: str) -> int:
    if name not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {name!r}; known: {', '.join(MASK_KINDS)}")
    return list(MASK_KINDS).index(name)


def _mask_none(key: jax.Array, words: jax.Array, p: MaskParams) -> jax.Array:
    return jnp.zeros(words.shape, bool)


register_mask(MaskKind("none", _mask_none, False, "no masking (the BYTE phase)"))
register_mask(MaskKind("random", _mask_random, True, "each byte independently with probability p"))
register_mask(MaskKind("wwm", _mask_wwm, False, "whole words, each with probability p"))
register_mask(MaskKind("span", _mask_span, True, "spans of k words (k uniform in [span_min, span_max]) covering ~p"))


def make_mask(key: jax.Array, words: jax.Array, params: MaskParams) -> jax.Array:
    """Bool mask over input positions for the runtime-selected masking kind."""
    return jax.lax.switch(params.kind, [k.fn for k in MASK_KINDS.values()], key, words, params)

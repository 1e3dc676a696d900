"""Jitted batch sampling: windows of the device corpus (optionally within one locale), their
mask, and the token windows of verses for the multi-task examples. A batch is a pure function
of a PRNG key, so the batch of step s depends on (seed, s) alone and a resumed run draws
exactly the same batches."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from ..core.tokenizer import BYTE_OFFSET, PAD_ID
from .device import DeviceCorpus
from .masks import MaskParams, make_mask
from .verses import VerseIndex


def verse_tokens(corpus: DeviceCorpus, idx: VerseIndex, recs: jax.Array, max_len: int) -> tuple[jax.Array, jax.Array]:
    """Token ids `[n, max_len]` of records (truncated, PAD-filled) and their validity mask."""
    pos = jnp.arange(max_len, dtype=jnp.int32)[None, :]
    valid = pos < idx.length[recs][:, None]
    ids = jnp.take(corpus.tokens, idx.start[recs][:, None] + pos, mode="clip").astype(jnp.int32) + BYTE_OFFSET
    return jnp.where(valid, ids, PAD_ID), valid


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Batch:
    inputs: jax.Array  # [..., L] int32 token ids, masked positions replaced by the mask id
    labels: jax.Array  # [..., L] int32 clean next tokens
    locale: jax.Array  # [...] int32 locale of each window
    masked: jax.Array  # [..., L] bool which inputs were masked


def window_starts(corpus: DeviceCorpus, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """n window starts drawn uniformly over every valid start, and their locales."""
    total = corpus.valid_cum[-1]
    u = jax.random.randint(key, (n,), 0, jnp.maximum(total, 1), dtype=jnp.int32)
    loc = jnp.searchsorted(corpus.valid_cum, u, side="right").astype(jnp.int32) - 1
    return corpus.locale_starts[loc] + (u - corpus.valid_cum[loc]), loc


def locale_window_starts(
    corpus: DeviceCorpus, key: jax.Array, n: int, locale: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """n starts inside one locale, clamped so a window never reads past the locale's end, and
    their locale: -1 when the locale is shorter than one window (those rows are to be skipped;
    per-locale sums by segment drop negative ids)."""
    count = corpus.valid_cum[locale + 1] - corpus.valid_cum[locale]
    u = jax.random.randint(key, (n,), 0, jnp.maximum(count, 1), dtype=jnp.int32)
    return corpus.locale_starts[locale] + u, jnp.full((n,), jnp.where(count > 0, locale, -1), jnp.int32)


def _gather(arr: jax.Array, starts: jax.Array, length: int) -> jax.Array:
    idx = starts[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :]
    return jnp.take(arr, idx, axis=0, mode="clip")


def lm_batch(
    corpus: DeviceCorpus, key: jax.Array, n: int, seq_len: int, mask: MaskParams, locale: jax.Array | None = None
) -> Batch:
    """n LM windows (optionally from one locale): inputs x[t:t+L] (masked), labels x[t+1:t+L+1]."""
    k_start, k_mask = jax.random.split(key)
    if locale is None:
        starts, loc = window_starts(corpus, k_start, n)
    else:
        starts, loc = locale_window_starts(corpus, k_start, n, locale)
    ids = _gather(corpus.tokens, starts, seq_len + 1).astype(jnp.int32) + BYTE_OFFSET
    words = _gather(corpus.word_starts, starts, seq_len)
    masked = make_mask(k_mask, words, mask)
    inputs = jnp.where(masked, mask.mask_id, ids[:, :-1])
    return Batch(inputs=inputs, labels=ids[:, 1:], locale=loc, masked=masked)

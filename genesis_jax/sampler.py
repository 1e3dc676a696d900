"""Device-resident corpus, jitted batch sampling and the masking kinds (docs/design.md, "Data").

The training split lives on the accelerator as `uint8` bytes (token id - 4) with per-byte
word-start flags and locale ids. A batch is a pure function of a PRNG key, so the batch of
step s depends on (seed, s) alone and a resumed run draws exactly the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import jax
import jax.numpy as jnp
import numpy as np

from .sharding import put
from .tokenizer import BYTE_OFFSET

if TYPE_CHECKING:  # tasks.py builds on this module
    from .tasks import VerseIndex


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class DeviceCorpus:
    """One split of the corpus on the device; locales laid end to end."""

    tokens: jax.Array  # [N] uint8 byte values
    word_starts: jax.Array  # [N] uint8 1 at the first byte of a word
    locale_starts: jax.Array  # [n_locales + 1] int32 offsets of each locale's range
    valid_cum: jax.Array  # [n_locales + 1] int32 cumulative count of window starts per locale
    verses: VerseIndex | None = None  # when multi-task learning is on


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
    def make(kind: str = "none", prob: float = 0.0, span_min: int = 1, span_max: int = 1, mask_id: int = 0) -> "MaskParams":
        return MaskParams(jnp.int32(mask_kind_id(kind)), jnp.float32(prob), jnp.int32(span_min),
                          jnp.int32(span_max), jnp.int32(mask_id))


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Batch:
    inputs: jax.Array  # [..., L] int32 token ids, masked positions replaced by the mask id
    labels: jax.Array  # [..., L] int32 clean next tokens
    locale: jax.Array  # [...] int32 locale of each window
    masked: jax.Array  # [..., L] bool which inputs were masked


def corpus_arrays(tokens: np.ndarray, word_starts: np.ndarray, locale_starts: np.ndarray, seq_len: int) -> DeviceCorpus:
    """One split as the host arrays the device will hold; a locale shorter than seq_len + 1
    bytes gets no windows."""
    starts = np.asarray(locale_starts, dtype=np.int64)
    lengths = np.diff(starts)
    valid = np.maximum(lengths - seq_len, 0)
    if starts[-1] >= 2**31:
        raise ValueError(f"corpus split of {starts[-1]} bytes exceeds the int32 index range")
    # A window's locale comes from these ranges (no per-byte locale ids: one byte per corpus
    # byte of device memory saved, and no 256-locale limit).
    return DeviceCorpus(
        tokens=np.asarray(tokens, dtype=np.uint8), word_starts=np.asarray(word_starts, dtype=np.uint8),
        locale_starts=starts.astype(np.int32),
        valid_cum=np.concatenate([[0], np.cumsum(valid)]).astype(np.int32))


def build_device_corpus(tokens: np.ndarray, word_starts: np.ndarray, locale_starts: np.ndarray,
                        seq_len: int, device: jax.sharding.Sharding | None = None) -> DeviceCorpus:
    """Put one split on the device (`corpus_arrays` placed)."""
    arrays = corpus_arrays(tokens, word_starts, locale_starts, seq_len)
    return put(arrays, device) if device is not None else jax.tree.map(jnp.asarray, arrays)


def window_starts(corpus: DeviceCorpus, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """n window starts drawn uniformly over every valid start, and their locales."""
    total = corpus.valid_cum[-1]
    u = jax.random.randint(key, (n,), 0, jnp.maximum(total, 1), dtype=jnp.int32)
    loc = jnp.searchsorted(corpus.valid_cum, u, side="right").astype(jnp.int32) - 1
    return corpus.locale_starts[loc] + (u - corpus.valid_cum[loc]), loc


def locale_window_starts(corpus: DeviceCorpus, key: jax.Array, n: int, locale: jax.Array) -> tuple[jax.Array, jax.Array]:
    """n starts inside one locale, clamped so a window never reads past the locale's end, and
    their locale: -1 when the locale is shorter than one window (those rows are to be skipped;
    per-locale sums by segment drop negative ids)."""
    count = corpus.valid_cum[locale + 1] - corpus.valid_cum[locale]
    u = jax.random.randint(key, (n,), 0, jnp.maximum(count, 1), dtype=jnp.int32)
    return corpus.locale_starts[locale] + u, jnp.full((n,), jnp.where(count > 0, locale, -1), jnp.int32)


def _gather(arr: jax.Array, starts: jax.Array, length: int) -> jax.Array:
    idx = starts[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :]
    return jnp.take(arr, idx, axis=0, mode="clip")


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


def lm_batch(corpus: DeviceCorpus, key: jax.Array, n: int, seq_len: int, mask: MaskParams,
             locale: jax.Array | None = None) -> Batch:
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

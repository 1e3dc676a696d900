"""The corpus on the accelerator: the training split as `uint8` bytes (token id - 4) with
per-byte word-start flags and locale ids, placed on the mesh."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from ..parallel.sharding import put
from .verses import VerseIndex


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class DeviceCorpus:
    """One split of the corpus on the device; locales laid end to end."""

    tokens: jax.Array  # [N] uint8 byte values
    word_starts: jax.Array  # [N] uint8 1 at the first byte of a word
    locale_starts: jax.Array  # [n_locales + 1] int32 offsets of each locale's range
    valid_cum: jax.Array  # [n_locales + 1] int32 cumulative count of window starts per locale
    verses: VerseIndex | None = None  # when multi-task learning is on


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
        tokens=np.asarray(tokens, dtype=np.uint8),
        word_starts=np.asarray(word_starts, dtype=np.uint8),
        locale_starts=starts.astype(np.int32),
        valid_cum=np.concatenate([[0], np.cumsum(valid)]).astype(np.int32),
    )


def build_device_corpus(
    tokens: np.ndarray,
    word_starts: np.ndarray,
    locale_starts: np.ndarray,
    seq_len: int,
    device: jax.sharding.Sharding | None = None,
) -> DeviceCorpus:
    """Put one split on the device (`corpus_arrays` placed)."""
    arrays = corpus_arrays(tokens, word_starts, locale_starts, seq_len)
    return put(arrays, device) if device is not None else jax.tree.map(jnp.asarray, arrays)

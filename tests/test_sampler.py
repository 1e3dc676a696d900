"""Device sampler: determinism in (seed, step), no locale straddling, locale batches, masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genesis_jax.corpus.store import open_corpus
from genesis_jax.sampler import MaskParams, build_device_corpus, lm_batch

L = 16


@pytest.fixture(scope="module")
def setup(fixture_corpus):
    c = open_corpus(fixture_corpus)
    tokens, words, starts = c.stream(c.locales, heldout=False)
    dc = build_device_corpus(tokens, words, starts, L)
    fn = jax.jit(lm_batch, static_argnums=(2, 3))
    return c, tokens, starts, dc, fn


def test_device_arrays_are_compact(setup):
    _, _, _, dc, _ = setup
    assert dc.tokens.dtype == jnp.uint8 and dc.word_starts.dtype == jnp.uint8 and dc.locale_ids.dtype == jnp.uint8


def test_batches_are_a_function_of_the_key(setup):
    _, _, _, dc, fn = setup
    k = jax.random.fold_in(jax.random.key(7), 3)
    a = fn(dc, k, 32, L, MaskParams.make())
    b = fn(dc, k, 32, L, MaskParams.make())
    c = fn(dc, jax.random.fold_in(jax.random.key(7), 4), 32, L, MaskParams.make())
    assert np.array_equal(a.inputs, b.inputs) and not np.array_equal(a.inputs, c.inputs)


def test_windows_never_straddle_locales_and_labels_shift(setup):
    _, tokens, starts, dc, fn = setup
    b = fn(dc, jax.random.key(0), 512, L, MaskParams.make())
    inputs, labels, loc = np.asarray(b.inputs), np.asarray(b.labels), np.asarray(b.locale)
    assert np.array_equal(inputs[:, 1:], labels[:, :-1])
    ids = tokens.astype(np.int64) + 4
    for row in range(len(loc)):
        lo, hi = starts[loc[row]], starts[loc[row] + 1]
        window = np.concatenate([inputs[row], labels[row, -1:]])
        # The window occurs inside its own locale's range.
        seg = ids[lo:hi]
        hits = np.flatnonzero(seg[: len(seg) - L] == window[0])
        assert any(np.array_equal(seg[h:h + L + 1], window) for h in hits), row
    assert set(loc.tolist()) == set(range(len(starts) - 1))  # every locale is drawn


def test_locale_targeted_batch_is_clamped(setup):
    _, tokens, starts, dc, _ = setup
    fn = jax.jit(lm_batch, static_argnums=(2, 3))
    for i in range(len(starts) - 1):
        b = fn(dc, jax.random.key(i), 256, L, MaskParams.make(), jnp.int32(i))
        assert (np.asarray(b.locale) == i).all()
        text = bytes(tokens[starts[i]:starts[i + 1]])
        for row in np.asarray(b.labels)[:20]:
            assert bytes((row - 4).astype(np.uint8)) in text


def test_masks_corrupt_inputs_only(setup):
    _, _, _, dc, fn = setup
    k = jax.random.key(1)
    clean = fn(dc, k, 64, L, MaskParams.make())
    for kind in ("random", "wwm", "span"):
        m = fn(dc, k, 64, L, MaskParams.make(kind, 0.5, 1, 3, mask_id=0))
        masked = np.asarray(m.masked)
        assert masked.any()
        assert np.array_equal(m.labels, clean.labels)
        assert np.array_equal(np.where(masked, 0, clean.inputs), m.inputs)

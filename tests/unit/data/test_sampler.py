"""Device sampler: determinism in (seed, step), no locale straddling, locale batches, masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genesis_jax.corpus.store import open_corpus
from genesis_jax.data.device import build_device_corpus
from genesis_jax.data.masks import MaskParams
from genesis_jax.data.sampler import lm_batch

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
    assert dc.tokens.dtype == jnp.uint8 and dc.word_starts.dtype == jnp.uint8
    assert not hasattr(dc, "locale_ids")  # a window's locale comes from the ranges


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
        assert any(np.array_equal(seg[h : h + L + 1], window) for h in hits), row
    assert set(loc.tolist()) == set(range(len(starts) - 1))  # every locale is drawn


def test_locale_targeted_batch_is_clamped(setup):
    _, tokens, starts, dc, _ = setup
    fn = jax.jit(lm_batch, static_argnums=(2, 3))
    for i in range(len(starts) - 1):
        b = fn(dc, jax.random.key(i), 256, L, MaskParams.make(), jnp.int32(i))
        assert (np.asarray(b.locale) == i).all()
        text = bytes(tokens[starts[i] : starts[i + 1]])
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


def _corpus_from_text(text: str, seq_len: int):
    from genesis_jax.corpus.words import word_starts

    data = np.frombuffer(text.encode("utf-8"), np.uint8)
    return build_device_corpus(data, word_starts(text), np.array([0, len(data)]), seq_len)


def _word_decisions(masked: np.ndarray, words: np.ndarray, skip_first: int = 1) -> np.ndarray:
    """One masked/unmasked decision per word (word id >= skip_first), checking it is the same for
    every byte of the word and the separators that follow it."""
    out = []
    for m_row, w_row in zip(masked, words):
        ids = np.cumsum(w_row)
        for wid in range(skip_first, ids.max() + 1):
            flags = m_row[ids == wid]
            assert flags.all() or not flags.any(), "a word was partly masked"
            out.append(bool(flags[0]))
    return np.array(out)


@pytest.fixture(scope="module")
def latin():
    rng = np.random.default_rng(0)
    vocab = ["".join(rng.choice(list("abcdefghij"), size=rng.integers(1, 8))) for _ in range(300)]
    text = " ".join(rng.choice(vocab, size=20000)) + "."
    return _corpus_from_text(text, 64)


_WINDOW_INDEX: dict[int, tuple[object, dict[bytes, int]]] = {}  # id -> (corpus kept alive, index)


def _window_words(corpus, b):
    # Recover each window's word-start flags from its start offset (labels are x[t+1:]), found
    # through an index of every window's bytes (built once per corpus).
    tokens = np.asarray(corpus.tokens).astype(np.int64) + 4
    flags = np.asarray(corpus.word_starts)
    index = _WINDOW_INDEX.get(id(corpus), (None, None))[1]
    if index is None:
        views = np.lib.stride_tricks.sliding_window_view(tokens[1:], 64)
        index = {}
        for c in range(len(views) - 1, -1, -1):  # the first start wins for a repeated window
            index[views[c].tobytes()] = c
        _WINDOW_INDEX[id(corpus)] = (corpus, index)
    out = []
    for row in np.asarray(b.labels):
        t = index.get(row.astype(np.int64).tobytes())
        assert t is not None, "window not found"
        out.append(flags[t : t + 64])
    return np.array(out)


@pytest.mark.parametrize("p", [0.15, 0.4])
def test_wwm_masks_whole_words_with_probability_p(latin, p):
    b = jax.jit(lm_batch, static_argnums=(2, 3))(latin, jax.random.key(1), 400, 64, MaskParams.make("wwm", p))
    words = _window_words(latin, b)
    decisions = _word_decisions(np.asarray(b.masked), words)
    sigma = np.sqrt(p * (1 - p) / len(decisions))
    assert abs(decisions.mean() - p) < 4 * sigma, (decisions.mean(), p, len(decisions))


@pytest.mark.parametrize("p, k", [(0.15, 3), (0.3, 2)])
def test_span_masks_expected_word_fraction(latin, p, k):
    b = jax.jit(lm_batch, static_argnums=(2, 3))(latin, jax.random.key(2), 400, 64, MaskParams.make("span", p, k, k))
    words = _window_words(latin, b)
    # Words with id >= k have all k possible seeds inside the window.
    decisions = _word_decisions(np.asarray(b.masked), words, skip_first=k)
    expected = 1 - (1 - p / k) ** k
    sigma = np.sqrt(expected * (1 - expected) / len(decisions))
    # Neighbouring words share seeds, so allow a wider band than for independent draws.
    assert abs(decisions.mean() - expected) < 8 * sigma, (decisions.mean(), expected)


def _interior_runs(corpus, b) -> list[int]:
    """Lengths, in words, of the masked runs that end inside a window and do not touch its start."""
    runs = []
    for m_row, w_row in zip(np.asarray(b.masked), _window_words(corpus, b)):
        r = 0
        for i, d in enumerate(_word_decisions(m_row[None], w_row[None], skip_first=1)):
            if d:
                r += 1
                continue
            if r and i - r > 0:
                runs.append(r)
            r = 0
    return runs


def test_span_length_is_one_draw_per_batch(latin):
    # lm_batch splits its key into (start, mask) keys and the span masker splits the mask key
    # into (length, seeds): recompute this batch's k and check that every masked run of words
    # away from the window edges is at least k long in every window of the batch. A k drawn per
    # window would leave shorter runs.
    seen = set()
    for seed in range(8):
        key = jax.random.key(seed)
        k_len = jax.random.split(jax.random.split(key)[1])[0]
        k = int(jax.random.randint(k_len, (), 1, 5))
        seen.add(k)
        b = jax.jit(lm_batch, static_argnums=(2, 3))(latin, key, 64, 64, MaskParams.make("span", 0.3, 1, 4))
        runs = _interior_runs(latin, b)
        assert runs and min(runs) >= k, (k, sorted(runs)[:5])
    assert len(seen) > 1


def test_cjk_characters_are_masked_one_by_one():
    text = "日本語のテキストです。" * 400
    c = _corpus_from_text(text, 64)
    b = jax.jit(lm_batch, static_argnums=(2, 3))(c, jax.random.key(3), 300, 64, MaskParams.make("wwm", 0.3))
    words = _window_words(c, b)
    decisions = _word_decisions(np.asarray(b.masked), words)
    assert int(words.sum(axis=1).mean()) >= 19  # ~21 one-character words in 64 bytes
    sigma = np.sqrt(0.3 * 0.7 / len(decisions))
    assert abs(decisions.mean() - 0.3) < 4 * sigma


def test_masks_are_a_function_of_the_key(latin):
    f = jax.jit(lm_batch, static_argnums=(2, 3))
    m = MaskParams.make("wwm", 0.3)
    a, b = f(latin, jax.random.key(9), 32, 64, m), f(latin, jax.random.key(9), 32, 64, m)
    c = f(latin, jax.random.key(10), 32, 64, m)
    assert np.array_equal(a.masked, b.masked) and not np.array_equal(a.masked, c.masked)


@pytest.mark.parametrize("p", [0.15, 0.4])
def test_random_masking_masks_each_position_with_probability_p(latin, p):
    b = jax.jit(lm_batch, static_argnums=(2, 3))(latin, jax.random.key(3), 400, 64, MaskParams.make("random", p))
    masked = np.asarray(b.masked)
    sigma = np.sqrt(p * (1 - p) / masked.size)  # independent Bernoulli(p) per position
    assert abs(masked.mean() - p) < 4 * sigma, (masked.mean(), p)


def test_a_locale_shorter_than_one_window_is_skipped_not_read_past():
    data = np.frombuffer(b"abcdefghij" * 20 + b"xyz", np.uint8)  # locale 1 has 3 bytes
    dc = build_device_corpus(data, np.zeros_like(data), np.array([0, 200, 203]), 16)
    fn = jax.jit(lm_batch, static_argnums=(2, 3))
    assert (np.asarray(fn(dc, jax.random.key(0), 8, 16, MaskParams.make(), jnp.int32(1)).locale) == -1).all()
    assert (np.asarray(fn(dc, jax.random.key(0), 8, 16, MaskParams.make(), jnp.int32(0)).locale) == 0).all()
    # The segment sums of per-locale telemetry drop the skipped rows.
    summed = jax.ops.segment_sum(jnp.ones(8), -jnp.ones(8, jnp.int32), num_segments=2)
    assert float(summed.sum()) == 0.0


def test_a_registered_mask_kind_reaches_the_step_switch_and_the_evaluation(monkeypatch):
    """One `register_mask` entry is all a new kind needs: MaskParams names it, the switch runs
    it, and the reconstruction suite and its metrics list it."""
    from genesis_jax.data.masks import MASK_KINDS, MaskKind, make_mask
    from genesis_jax.evaluation.metrics import eval_metrics, reconstruction_kinds

    def odd_positions(key, words, p):
        return jnp.broadcast_to(jnp.arange(words.shape[-1]) % 2 == 1, words.shape)

    monkeypatch.setitem(MASK_KINDS, "odd", MaskKind("odd", odd_positions, True, "every odd position"))
    m = jax.jit(make_mask)(jax.random.key(0), jnp.zeros((2, 8), jnp.uint8), MaskParams.make("odd"))
    assert (np.asarray(m) == (np.arange(8) % 2 == 1)).all()
    assert reconstruction_kinds() == ["random", "span", "odd", "verse"]
    assert {"recon/odd/accuracy", "recon/odd/cer"} <= {x.key for x in eval_metrics()}
    with pytest.raises(ValueError, match="unknown mask kind 'even'; known: none, random, wwm, span, odd"):
        MaskParams.make("even")


def test_span_lengths_are_uniform_over_min_to_max_words(latin):
    """k ~ uniform{span_min_len .. span_max_len}, one draw per batch (closed form: each value
    with probability 1 / (max - min + 1)). A batch's k is read back from its masks: at this
    density most spans stand alone, so the shortest masked run of words away from the window
    edges is k. 160 batches: each of the 4 counts is 40 +- 6.1 (binomial), held to +-4 sigma."""
    lo, hi, n = 2, 5, 160
    draw = jax.jit(lm_batch, static_argnums=(2, 3))
    counts = dict.fromkeys(range(lo, hi + 1), 0)
    for seed in range(n):
        b = draw(latin, jax.random.key(1000 + seed), 32, 64, MaskParams.make("span", 0.25, lo, hi))
        runs = _interior_runs(latin, b)
        assert runs, seed
        k = min(runs)
        assert k in counts, (seed, k)
        counts[k] += 1
    sigma = (n * (1 / 4) * (3 / 4)) ** 0.5
    assert all(abs(c - n / 4) <= 4 * sigma for c in counts.values()), counts


def test_locale_targeted_starts_are_uniform_over_exactly_the_valid_ones():
    """A locale of L + k bytes has k valid window starts: targeted draws are uniform over
    exactly those (the first included, none past the last), a locale of L + 1 bytes always
    gives its one start, and a locale shorter than a window gives locale id -1 (skipped)."""
    from genesis_jax.data.sampler import locale_window_starts

    seq = 8
    lengths = [seq + 1, seq + 4, seq]
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    data = np.full(bounds[-1], ord("a"), np.uint8)
    corpus = build_device_corpus(data, np.zeros(len(data), bool), bounds, seq)
    draw = jax.jit(locale_window_starts, static_argnums=2)
    one, loc0 = (np.asarray(x) for x in draw(corpus, jax.random.key(0), 400, jnp.int32(0)))
    assert (one == bounds[0]).all() and (loc0 == 0).all()
    four, loc1 = (np.asarray(x) for x in draw(corpus, jax.random.key(1), 400, jnp.int32(1)))
    counts = np.bincount(four - bounds[1], minlength=4)
    assert len(counts) == 4 and (loc1 == 1).all()
    assert all(abs(c - 100) <= 4 * (400 * 0.25 * 0.75) ** 0.5 for c in counts), counts
    _, loc2 = draw(corpus, jax.random.key(2), 16, jnp.int32(2))
    assert (np.asarray(loc2) == -1).all()


def test_a_split_beyond_the_int32_index_range_is_refused_at_its_first_byte_too_many():
    """Window starts are int32 on the device: a split of 2**31 bytes or more is refused by name
    (checked on the split's end, whatever the locales before it), one byte less is accepted."""
    from genesis_jax.data.device import corpus_arrays

    small = np.zeros(4, np.uint8)
    assert int(corpus_arrays(small, small, np.array([0, 5, 2**31 - 1]), 8).locale_starts[-1]) == 2**31 - 1
    for bounds in ([0, 2**31], [0, 5, 2**31]):
        with pytest.raises(ValueError, match="exceeds the int32 index range"):
            corpus_arrays(small, small, np.array(bounds), 8)


def test_window_starts_are_uniform_over_every_valid_start_of_every_locale():
    """With locales of L + 1, L + 4, L and L + 2 bytes there are 1 + 4 + 0 + 2 = 7 valid
    starts: draws cover exactly those 7, each with probability 1/7 (within 4 sigma over 1,400
    draws), each with the locale whose bytes it starts in (a start drawn at a locale boundary
    belongs to the next locale, never to the end of the previous one)."""
    from genesis_jax.data.sampler import window_starts

    seq = 8
    lengths = [seq + 1, seq + 4, seq, seq + 2]
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    data = np.full(bounds[-1], ord("a"), np.uint8)
    corpus = build_device_corpus(data, np.zeros(len(data), bool), bounds, seq)
    valid = {int(bounds[i]) + j: i for i, n in enumerate(lengths) for j in range(n - seq)}
    assert len(valid) == 7
    starts, locs = (np.asarray(x) for x in jax.jit(window_starts, static_argnums=2)(corpus, jax.random.key(0), 1400))
    assert {int(s): int(l) for s, l in zip(starts, locs)} == valid
    counts = np.array([np.sum(starts == s) for s in valid])
    assert all(abs(c - 200) <= 4 * (1400 / 7 * 6 / 7) ** 0.5 for c in counts), counts

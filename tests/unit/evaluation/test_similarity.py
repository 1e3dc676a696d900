"""Evaluation metrics on inputs built to have known values."""

import numpy as np
import pytest

from genesis_jax.evaluation.similarity import (
    char_error_rate,
    levenshtein,
    linear_cka,
    procrustes_residual,
    retrieval_top1,
)


def test_retrieval_perfect_and_broken():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 16))
    assert retrieval_top1(a, a * 3.0) == 1.0  # cosine ignores scale
    assert retrieval_top1(a, np.roll(a, 1, axis=0)) == 0.0  # every match points at a neighbour
    b = a.copy()
    b[:10] = np.roll(a[:10], 1, axis=0)
    assert retrieval_top1(a, b) == pytest.approx(0.8)


def test_procrustes_of_a_rotated_copy_is_zero():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(40, 8))
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    assert procrustes_residual(a, a @ q) == pytest.approx(0.0, abs=1e-10)
    assert procrustes_residual(a, 5 * a @ q + 2.0) == pytest.approx(0.0, abs=1e-10)  # centred and scaled
    assert procrustes_residual(a, rng.normal(size=(40, 8))) > 0.5


def test_cka_known_values():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 10))
    q, _ = np.linalg.qr(rng.normal(size=(10, 10)))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3 * x @ q) == pytest.approx(1.0)  # invariant to rotation and scale
    assert linear_cka(x, rng.normal(size=(200, 10))) < 0.2


def test_edit_distance_and_cer():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3 and levenshtein("abc", "abc") == 0
    assert char_error_rate([("abc", "abd"), ("xy", "xy")]) == pytest.approx(1 / 5)
    assert char_error_rate([("日本", "日木")]) == pytest.approx(0.5)

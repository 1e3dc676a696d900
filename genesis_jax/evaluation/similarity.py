"""Evaluation metrics on host arrays (NumPy, float64): retrieval, Procrustes, CKA, edit distance."""

from __future__ import annotations

import numpy as np


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def retrieval_top1(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of rows i of `a` whose most cosine-similar row of `b` is row i."""
    sims = _unit_rows(a) @ _unit_rows(b).T
    return float(np.mean(np.argmax(sims, axis=1) == np.arange(len(a))))


def _center_scale(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    return x / max(np.linalg.norm(x), 1e-12)


def procrustes_residual(a: np.ndarray, b: np.ndarray) -> float:
    """min over orthogonal R of ||A R - B||_F after centring and scaling both to unit norm:
    0 when one is a rotation (or reflection) of the other, at most 2."""
    a, b = _center_scale(a), _center_scale(b)
    u, _, vt = np.linalg.svd(a.T @ b)
    return float(np.linalg.norm(a @ (u @ vt) - b))


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear centred kernel alignment: ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), in [0, 1]."""
    x = np.asarray(x, np.float64) - np.mean(x, axis=0)
    y = np.asarray(y, np.float64) - np.mean(y, axis=0)
    num = np.linalg.norm(y.T @ x) ** 2
    den = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(num / den) if den > 0 else 0.0


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions) between two strings."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def char_error_rate(pairs: list[tuple[str, str]]) -> float:
    """Summed edit distance over summed reference length, for (predicted, reference) pairs."""
    total = sum(len(ref) for _, ref in pairs)
    return sum(levenshtein(p, r) for p, r in pairs) / total if total else 0.0

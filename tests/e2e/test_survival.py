"""What survives what, without training: corpus import and identity, the run lock, damaged
run files, and bad command-line input, each ending in one line and a non-zero exit code."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, exit_code, one_error_line, write_textdir

from genesis_jax import generate, report, verify
from genesis_jax.core import cli
from genesis_jax.core.errors import CorpusError, ResumeError, UserError
from genesis_jax.corpus import __main__ as corpus_cli
from genesis_jax.corpus.store import open_corpus
from genesis_jax.telemetry.sqlite import MetricsDB
from genesis_jax.training.checkpoint import read_pinned
from genesis_jax.training.rundir import RunLock, RunLockedError, prepare


def tree_digest(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_import_refuses_a_directory_that_is_not_a_corpus_and_the_source(tmp_path, capsys):
    src = write_textdir(tmp_path / "src", repeat=2)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.tex").write_text("years of work")
    before_src, before_other = tree_digest(src), tree_digest(other)
    for out in (other, src, src / "sub"):
        code = corpus_cli.main(["import", "--source", "textdir", "--path", str(src), "--out", str(out)])
        assert code == 2
        one_error_line(capsys.readouterr().err)
    assert tree_digest(src) == before_src and tree_digest(other) == before_other


def test_replacing_a_corpus_needs_force(tmp_path, capsys):
    src = write_textdir(tmp_path / "src", repeat=2)
    out = tmp_path / "corpus"
    args = ["import", "--source", "textdir", "--path", str(src), "--out", str(out)]
    assert corpus_cli.main(args) == 0
    first = open_corpus(out).manifest["content_sha256"]
    capsys.readouterr()
    assert corpus_cli.main(args + ["--split-seed", "7"]) == 2
    assert "--force" in one_error_line(capsys.readouterr().err)
    assert open_corpus(out).manifest["content_sha256"] == first
    assert corpus_cli.main(args + ["--split-seed", "7", "--force"]) == 0
    assert open_corpus(out).manifest["split"]["seed"] == 7


@pytest.fixture()
def corpus_copy(fixture_corpus, tmp_path):
    return Path(shutil.copytree(fixture_corpus, tmp_path / "corpus"))


def test_bytes_altered_in_place_are_refused(corpus_copy, capsys):
    open_corpus(corpus_copy, verify=True)
    with open(corpus_copy / "text.bin", "r+b") as f:  # same size, one byte changed
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    open_corpus(corpus_copy)  # the cheap checks cannot see it ...
    with pytest.raises(CorpusError, match="content hash .* does not match"):
        open_corpus(corpus_copy, verify=True)  # ... the content hash does
    assert corpus_cli.main(["info", str(corpus_copy), "--verify"]) == 2
    assert "changed after import" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    "damage",
    ["truncated records", "invalid keys", "offset out of range", "locale out of range", "manifest without fields"],
)
def test_damaged_index_files_are_one_line_errors(corpus_copy, damage):
    if damage == "truncated records":
        data = (corpus_copy / "records.npy").read_bytes()
        (corpus_copy / "records.npy").write_bytes(data[: len(data) // 2])
    elif damage == "invalid keys":
        (corpus_copy / "keys.json").write_text("[1, 2,")
    elif damage == "manifest without fields":
        (corpus_copy / "manifest.json").write_text(json.dumps({"format": "genesis-jax-corpus", "version": 1}))
    else:
        records = np.load(corpus_copy / "records.npy")
        field, value = ("offset", 10**9) if damage == "offset out of range" else ("locale", 99)
        records[3][field] = value
        np.save(corpus_copy / "records.npy", records)
    with pytest.raises(CorpusError) as e:
        open_corpus(corpus_copy)
    assert "\n" not in str(e.value)


def test_second_lock_is_refused_naming_the_holder(tmp_path):
    first = RunLock(tmp_path)
    assert first.acquire() is None
    with pytest.raises(RunLockedError) as e:
        RunLock(tmp_path).acquire()
    assert f"pid {os.getpid()}" in str(e.value) and "in use" in str(e.value)
    # From another process too (a flock, so it holds across processes).
    probe = (
        "import sys; from pathlib import Path\n"
        "from genesis_jax.training.rundir import RunLock; from genesis_jax.core.errors import UserError\n"
        "try:\n    RunLock(Path(sys.argv[1])).acquire()\nexcept UserError as e:\n    print(e); sys.exit(3)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 3 and f"pid {os.getpid()}" in r.stdout
    first.release()
    again = RunLock(tmp_path)
    assert again.acquire() is None  # a clean release leaves nothing stale behind
    again.release()


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_message(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / "train.lock").write_text(json.dumps({"pid": pid, "host": os.uname().nodename, "started": 0}))
    lock = RunLock(tmp_path)
    msg = lock.acquire()
    assert msg is not None and f"stale lock left by pid {pid}" in msg
    assert json.loads((tmp_path / "train.lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_run_dir_that_is_a_file_is_a_one_line_error(tmp_path):
    f = tmp_path / "run"
    f.write_text("")
    with pytest.raises(UserError, match="exists and is not a directory"):
        prepare(f)


def test_damaged_run_files_are_user_errors(tmp_path):
    db = tmp_path / "metrics.sqlite"
    db.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(UserError, match="not a usable metrics database"):
        MetricsDB(db)
    pinned = tmp_path / "pinned.json"
    pinned.write_text("{broken")
    with pytest.raises(ResumeError, match="damaged list of pinned checkpoint steps"):
        read_pinned(pinned)


def test_report_on_a_corrupt_database(tmp_path, capsys):
    (tmp_path / "metrics.sqlite").write_bytes(b"\0garbage" * 512)
    assert report.main(["--run", str(tmp_path)]) == 2
    one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("args", [["--temperature", "nan"], ["--max-tokens", "100000000"], ["--top-p", "0"]])
def test_generate_refuses_bad_arguments_before_loading(tmp_path, capsys, args):
    assert exit_code(generate.main, ["--run", str(tmp_path / "none"), "--prompt", "x", *args]) == 2
    assert args[0] in one_error_line(capsys.readouterr().err)  # the argument, not the missing run, is named


def test_verify_refuses_a_missing_output_directory_before_checking(tmp_path, capsys):
    assert verify.main(["--out", str(tmp_path / "missing" / "v.csv")]) == 2
    out = capsys.readouterr()
    one_error_line(out.err)
    assert "backend" not in out.out  # refused before any check ran


def test_an_internal_error_is_one_line_and_a_traceback_file(tmp_path, capsys):
    def body() -> int:
        raise ZeroDivisionError("a bug")

    assert cli.run_cli("genesis_jax.demo", body, lambda: tmp_path / "logs") == 1
    line = one_error_line(capsys.readouterr().err)
    assert "ZeroDivisionError: a bug" in line
    trace = Path(line.rsplit("traceback in ", 1)[1])
    assert trace.parent == tmp_path / "logs" and "raise ZeroDivisionError" in trace.read_text()

    def disk() -> int:
        raise OSError(28, "No space left on device", "/data/run/x")

    assert cli.run_cli("genesis_jax.demo", disk) == 2
    assert one_error_line(capsys.readouterr().err) == "error: /data/run/x: No space left on device"

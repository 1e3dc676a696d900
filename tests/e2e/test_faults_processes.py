"""Fault class 1, processes of one run that disagree or never meet: every case ends within
seconds in one line and exit code 2 in each process, before anything is written (the cases run
side by side, each pair on its own port)."""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, one_error_line, write_small_run_config, write_textdir
from test_multiprocess import env, free_port

from genesis_jax.core.errors import UserError
from genesis_jax.parallel import processes as distributed

pytestmark = pytest.mark.slow

TIMEOUT = 60  # every case ends within this, or the test fails


LONE_JOIN_S = 4  # a process alone gives up after this; a pair has time to meet even on a busy machine


def train_cmd(cfg: Path, run: Path, *extra: str, join: int = 40) -> list[str]:
    return [
        sys.executable,
        "-m",
        "genesis_jax.train",
        "--config",
        str(cfg),
        "--run-dir",
        str(run),
        "--set",
        "logging.tensorboard=false",
        "--join-timeout",
        str(join),
        *extra,
    ]


def pair(
    cfg: Path,
    run: Path,
    extra0: list[str],
    extra1: list[str],
    cwd: tuple[Path, Path] = (ROOT, ROOT),
    n: tuple[str, str] = ("2", "2"),
) -> list[list[str] | Path]:
    port = str(free_port())
    return [
        [
            *train_cmd(cfg, run, *extra0),
            "--coordinator",
            f"localhost:{port}",
            "--num-processes",
            n[0],
            "--process-id",
            "0",
        ],
        cwd[0],
        [
            *train_cmd(cfg, run, *extra1),
            "--coordinator",
            f"localhost:{port}",
            "--num-processes",
            n[1],
            "--process-id",
            "1",
        ],
        cwd[1],
    ]


@pytest.fixture(scope="module")
def outcomes(fixture_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[tuple[int, str, float]]]:
    """Each case's processes, started together: (exit code, stderr, seconds) of each; "base":
    the directory that holds every case's run directory."""
    base = tmp_path_factory.mktemp("faults_mp")
    cfg = write_small_run_config(base / "run.toml", fixture_corpus, 4, 0)
    # The same relative data.corpus read in two directories holding different corpora (two hosts).
    from genesis_jax.corpus.importers import import_textdir
    from genesis_jax.corpus.store import CorpusWriter

    hosts = (base / "host0", base / "host1")
    for i, host in enumerate(hosts):
        w = CorpusWriter()
        import_textdir(w, write_textdir(host / "src", repeat=20 + i))
        w.write(host / "corpus", val_fraction=0.1, split_seed=0)
    rel_cfg = write_small_run_config(base / "rel.toml", Path("corpus"), 4, 0)
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    busy = held.getsockname()[1]
    run = lambda name: base / name  # noqa: E731
    cases: dict[str, list] = {
        "optim.lr": pair(cfg, run("lr"), ["--set", "optim.lr=0.001"], ["--set", "optim.lr=0.003"]),
        "corpus content": pair(rel_cfg, run("corpus"), [], [], cwd=hosts),
        "lone process 0": [
            train_cmd(
                cfg,
                run("lone0"),
                "--coordinator",
                f"localhost:{free_port()}",
                "--num-processes",
                "2",
                "--process-id",
                "0",
                join=LONE_JOIN_S,
            ),
            ROOT,
        ],
        "lone process 1": [
            train_cmd(
                cfg,
                run("lone1"),
                "--coordinator",
                f"localhost:{free_port()}",
                "--num-processes",
                "2",
                "--process-id",
                "1",
                join=LONE_JOIN_S,
            ),
            ROOT,
        ],
        "port in use": [
            train_cmd(
                cfg, run("busy"), "--coordinator", f"localhost:{busy}", "--num-processes", "2", "--process-id", "0"
            ),
            ROOT,
        ],
    }
    procs = {
        name: [
            (
                subprocess.Popen(
                    c[i],
                    cwd=c[i + 1],
                    env={**env(1), "PYTHONPATH": str(ROOT)},
                    text=True,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                ),
                time.time(),
            )
            for i in range(0, len(c), 2)
        ]
        for name, c in cases.items()
    }
    out = {}
    for name, ps in procs.items():
        out[name] = []
        for p, t0 in ps:
            try:
                _, err = p.communicate(timeout=max(1.0, t0 + TIMEOUT - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                _, err = p.communicate()
                err += "\n(hung: killed by the test)"
            out[name].append((p.returncode, err, time.time() - t0))
    held.close()
    out["base"] = base
    return out


@pytest.mark.parametrize("key", ["optim.lr", "corpus content"])
def test_processes_that_disagree_all_stop_naming_the_first_difference(outcomes, key):
    for code, err, seconds in outcomes[key]:
        lines = [x for x in err.splitlines() if "Gloo" not in x and "peer ranks" not in x and x.strip()]
        assert code == 2 and seconds < TIMEOUT, err[-1500:]
        line = one_error_line("\n".join(lines))
        assert f"the processes disagree: {key} is " in line and "in process 1 and" in line, line
    for name in ("lr", "corpus"):
        assert not (outcomes["base"] / name).exists()  # stopped before the run directory was made


@pytest.mark.parametrize("case", ["lone process 0", "lone process 1"])
def test_a_process_whose_peers_never_come_says_whom_it_waits_for_and_gives_up(outcomes, case):
    ((code, err, seconds),) = outcomes[case]
    assert code == 2 and seconds < TIMEOUT, err[-1500:]
    assert "waiting for" in err and "--join-timeout" in err
    assert f"gave up after {LONE_JOIN_S} s" in one_error_line(err)


def test_a_coordinator_port_in_use_is_one_line(outcomes):
    ((code, err, seconds),) = outcomes["port in use"]
    assert code == 2, err[-1500:]
    assert "is in use on this host" in one_error_line(err)


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            dict(coordinator="localhost:1", num_processes=2, process_id=2),
            "--process-id 2: must be within [0, --num-processes 2)",
        ),
        (dict(coordinator="localhost", num_processes=2, process_id=0), "expected HOST:PORT"),
        (dict(coordinator="localhost:70000", num_processes=2, process_id=0), "expected HOST:PORT"),
        (dict(coordinator="localhost:1", num_processes=None, process_id=0), "go together"),
    ],
)
def test_launch_flags_that_cannot_form_a_run(flags, message):
    args = argparse.Namespace(distributed=False, heartbeat_timeout=10, join_timeout=5, **flags)
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        distributed.initialize(args)


@pytest.mark.parametrize(
    "differs, key",
    [
        (dict(run_dir="b"), "--run-dir"),
        (dict(num_processes=3), "--num-processes"),
        (dict(overrides=["data.seq_len=16"]), "data.seq_len"),
        (dict(overrides=["training.max_steps=5"]), "training.max_steps"),
    ],
)
def test_the_fingerprint_holds_the_run_directory_the_process_count_and_every_key(tmp_path, monkeypatch, differs, key):
    """The comparison every process makes once joined (two real processes above), here with
    process 1's fingerprint handed over by a stand-in for the all-gather."""
    from jax.experimental import multihost_utils

    from genesis_jax import config as C
    from genesis_jax.training.run import fingerprint

    def of(run_dir: str = "a", num_processes: int = 2, overrides: list[str] = []) -> dict[str, str]:  # noqa: B006
        return fingerprint(C.from_dict(C.apply_overrides({}, overrides)), tmp_path / run_dir, num_processes)

    mine, theirs = of(), of(**differs)
    blobs = [np.frombuffer(json.dumps(list(f.items())).encode(), np.uint8) for f in (mine, theirs)]

    def allgather(x: np.ndarray) -> np.ndarray:
        if x.ndim == 0:
            return np.array([b.size for b in blobs], np.int32)
        return np.stack([np.pad(b, (0, x.size - b.size)) for b in blobs])

    monkeypatch.setattr(distributed.jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
    with pytest.raises(
        distributed.DisagreementError, match=f"the processes disagree: {key} is .* in process 1 and .* in process 0"
    ):
        distributed.agree(mine, None)


def test_the_same_fingerprint_on_every_process_passes(tmp_path, monkeypatch):
    from jax.experimental import multihost_utils

    blob = np.frombuffer(json.dumps([["optim.lr", "0.1"]]).encode(), np.uint8)
    monkeypatch.setattr(distributed.jax, "process_count", lambda: 3)
    monkeypatch.setattr(
        multihost_utils,
        "process_allgather",
        lambda x: np.full(3, blob.size, np.int32) if x.ndim == 0 else np.stack([blob] * 3),
    )
    distributed.agree({"optim.lr": "0.1"}, None)

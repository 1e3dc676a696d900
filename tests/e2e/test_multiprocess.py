"""Two processes x 2 simulated CPU devices (jax.distributed with gloo on localhost) against one
process x 4 devices; a process killed mid-run ends its peer within a bound, and the same
commands resume both exactly."""

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
from conftest import ROOT, write_small_run_config
from test_resume import logged

STEPS = 40


def env(devices: int) -> dict:
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(ROOT),
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}",
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def gloo_notice(line: str) -> bool:
    """A line of gloo's connection notice, or a piece of one."""
    return "[Gloo]" in line or "peer ranks" in line


def command(cfg, run) -> list[str]:
    return [
        sys.executable,
        "-m",
        "genesis_jax.train",
        "--config",
        str(cfg),
        "--run-dir",
        str(run),
        "--set",
        "checkpoint.save_interval=20",
        "--set",
        "logging.tensorboard=false",
        "--set",
        "eval.interval=20",  # the quick suite runs in every process of a multi-process run too
    ]


def launch(cfg, run, port: int) -> list[subprocess.Popen]:
    extra = ["--coordinator", f"localhost:{port}", "--num-processes", "2", "--heartbeat-timeout", "10"]
    return [
        subprocess.Popen(
            command(cfg, run) + extra + ["--process-id", str(i)],
            env=env(2),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in (1, 0)
    ]


def test_two_processes_match_one_and_survive_a_killed_peer(fixture_corpus, tmp_path):
    cfg = write_small_run_config(tmp_path / "run.toml", fixture_corpus, STEPS, 10)
    ref = tmp_path / "ref"  # one process x 4 devices, beside the two-process run
    ref_proc = subprocess.Popen(
        command(cfg, ref), env=env(4), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    run = tmp_path / "run"
    p1, p0 = launch(cfg, run, free_port())
    deadline = time.time() + 240
    while time.time() < deadline and p0.poll() is None:
        rows = logged(run, cols="step") if (run / "metrics.sqlite").exists() else []
        # past the checkpoint at 20, and its background write finished (Orbax renames it into place)
        if rows and rows[-1][0] >= 25 and (run / "checkpoints" / "20").is_dir():
            break
        time.sleep(0.05)
    p1.send_signal(signal.SIGKILL)
    killed = time.time()
    p0.wait(timeout=120)
    assert p0.returncode != 0 and time.time() - killed < 60  # the peer notices within the heartbeat bound
    p1.wait(timeout=30)
    assert not (run / "checkpoints" / str(STEPS)).exists()

    procs = launch(cfg, run, free_port())  # the same commands resume both
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert "resuming" in outs[1][1] and "from step 20" in outs[1][1]
    # Process 1 writes no console lines (gloo's own connection notices aside, which its threads
    # may write in pieces: "[Gloo] Rank 1" and " is connected to 1 peer ranks..." on two lines).
    assert [x for x in outs[0][0].splitlines() if x.strip() and not gloo_notice(x)] == []
    assert "step      39/40" in outs[1][0]
    _, err = ref_proc.communicate(timeout=300)
    assert ref_proc.returncode == 0, err[-2000:]
    ra, rb = logged(ref), logged(run)
    assert [x[0] for x in rb] == [x[0] for x in ra] and ra[-1][0] == STEPS - 1
    np.testing.assert_allclose(np.array(rb, dtype=float)[:, 1:], np.array(ra, dtype=float)[:, 1:], rtol=1e-5)
    val = lambda d: logged(d, "evaluation_logs", "step, name, value")  # noqa: E731
    assert [x[:2] for x in val(run)] == [x[:2] for x in val(ref)]
    # atol: quick/align/procrustes is a small residual; 2 x 2 and 1 x 4 devices sum in other orders
    np.testing.assert_allclose([x[2] for x in val(run)], [x[2] for x in val(ref)], rtol=1e-5, atol=1e-6)
    assert {x[0] for x in val(run) if x[1].startswith("quick/align")} == {20, 40}


def test_sigterm_to_either_process_stops_both_with_a_checkpoint(fixture_corpus, tmp_path):
    cfg = write_small_run_config(tmp_path / "run.toml", fixture_corpus, 400, 0)
    run = tmp_path / "run"
    p1, p0 = launch(cfg, run, free_port())
    deadline = time.time() + 240
    while time.time() < deadline and p0.poll() is None:
        rows = logged(run, cols="step") if (run / "metrics.sqlite").exists() else []
        if rows and rows[-1][0] >= 25:
            break
        time.sleep(0.05)
    p1.send_signal(signal.SIGTERM)  # not the process that writes the logs
    outs = [p.communicate(timeout=120) for p in (p1, p0)]
    assert [p.returncode for p in (p1, p0)] == [128 + signal.SIGTERM] * 2, [o[1][-2000:] for o in outs]
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] > 25 and f"after step {steps[-1]}; checkpoint saved" in outs[1][1]  # saved where both stopped

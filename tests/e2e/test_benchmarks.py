"""The benchmark scripts run end to end on the CPU (no timing claims: plumbing only)."""

import csv
import os
import subprocess
import sys

import pytest
from conftest import ROOT, compiles, toolchain_missing

pytestmark = pytest.mark.slow
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}


def script(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """A benchmark script run from the checkout on the CPU, its output captured."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def test_attention_benchmark_dry_run():
    # The Mosaic variants' dry run (GPU interpret mode, half a minute more) is the GPU suite
    # rehearsal's (benchmarks/gpu_suite.sh --rehearse); their numerics are test_flash_attention_mgpu's.
    r = script("benchmarks/attention.py", "--dry-run", "--backends", "xla,reference,pallas,cudnn,jax_xla,jax_mha")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [x for x in r.stdout.splitlines() if x.startswith(("pallas", "xla", "jax_mha"))]
    assert len(lines) == 12
    # The bundled mha is only a baseline (its backward is NaN at seq 40, not a block multiple).
    for line in (x for x in lines if not x.startswith("jax_mha")):
        err = float(line.split("|")[12])
        assert err < 1e-5, line
    # Timing is refused off the GPU rather than reporting interpret-mode speed.
    r = subprocess.run([sys.executable, "benchmarks/attention.py"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert r.returncode == 2 and "needs a GPU" in r.stderr
    # A misspelt backend is an error, not a table without it.
    r = subprocess.run(
        [sys.executable, "benchmarks/attention.py", "--dry-run", "--backends", "pallas,mosaic_1wgg"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "unknown mosaic_1wgg" in r.stderr and "mosaic_no_pingpong" in r.stderr


def test_attention_sweep_dry_run(tmp_path):
    r = script("benchmarks/attention.py", "--dry-run", "--sweep", "--sweep-limit", "2", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("best q") == 4 and "2 settings" in r.stdout
    assert (tmp_path / "attention_sweep.csv").read_text().count("\n") == 5


def test_train_step_benchmark_runs(tmp_path):
    """With the plan extra, each variant's predicted peak memory and step time come along, with a
    calibration file's too (the GPU suite sets them beside the measured ones; here the dry run of
    benchmarks/calibrate.py writes one of this CPU's rates); the CPU reports no measured peak."""
    plan = [] if toolchain_missing() else ["--plan-target", "h200", "--calibration", str(tmp_path / "cal.json")]
    if plan:
        r = script("benchmarks/calibrate.py", "--dry-run", "--iters", "2", "--out", str(tmp_path / "cal.json"))
        assert r.returncode == 0, r.stderr[-2000:]
        assert "gemm_efficiency" in r.stdout and "kernel_gap_s" in r.stdout
    r = script(
        "benchmarks/train_step.py",
        "--set",
        "model.preset=test",
        "--set",
        "data.seq_len=32",
        "--set",
        "training.batch_size=4",
        "--steps",
        "2",
        "--loop-steps",
        "8",
        *plan,
        "--variant",
        "a:",
        "--variant",
        "wwm:model.remat=true",
        "--out",
        str(tmp_path / "t.csv"),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rows = list(csv.DictReader((tmp_path / "t.csv").open()))
    assert len(rows) == 2 and rows[0]["variant"] == "a" and "model" in rows[0]
    if plan:
        for row in rows:
            assert float(row["plan_peak_mib"]) > 0 and float(row["plan_step_ms"]) > 0, row
            # this CPU's rates are far below an H200's: the calibrated prediction is slower
            assert float(row["plan_step_ms_calibrated"]) > float(row["plan_step_ms"]), row
            assert float(row["measured_over_plan"]) > 0, row


@compiles
def test_kernel_resources_benchmark_chooses_a_setting(tmp_path):
    r = script(
        "benchmarks/kernel_resources.py",
        "--quick",
        "--head-dims",
        "64",
        "--dtypes",
        "bfloat16",
        "--seq",
        "256",
        "--out",
        str(tmp_path),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "chosen bfloat16 hd64 forward: " in r.stdout and "chosen bfloat16 hd64 backward: " in r.stdout
    rows = list(csv.DictReader((tmp_path / "kernel_resources.csv").open()))
    assert {row["kernel"] for row in rows} == {"genesis_flash_fwd", "genesis_flash_dq", "genesis_flash_dkv"}
    assert all(row["registers"] and row["spill_stores"] for row in rows)


# a model small enough to time against PyTorch in a second: dims, sequence, batch, one round
TINY_AGAINST_TORCH = ("--dims", "32,2,2,64", "--seq", "16", "--batch", "2", "--rounds", "1")


def test_torch_step_benchmark_ends_with_the_ratio():
    pytest.importorskip("torch", reason="PyTorch is an optional benchmark dependency")
    r = script("benchmarks/torch_step.py", *TINY_AGAINST_TORCH, "--steps", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert lines[-3].startswith("jax ") and lines[-2].startswith("torch ") and lines[-1].startswith("ratio ")
    assert float(lines[-1].split()[1]) > 0


def test_block_parts_benchmark_times_every_part_on_both_sides():
    pytest.importorskip("torch", reason="PyTorch is an optional benchmark dependency")
    r = script("benchmarks/block_parts.py", *TINY_AGAINST_TORCH, "--iters", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()[2:]}
    assert set(rows) == {"qkv+rope", "attention", "wo", "swiglu", "norms", "embed+head+loss", "optimizer", "sum"}
    for name, cells in rows.items():
        if name != "sum":
            assert float(cells[1]) > 0 and float(cells[2]) > 0 and int(cells[4]) in (1, 2), cells


def test_profile_step_charges_self_time_to_our_functions():
    r = script(
        "benchmarks/profile_step.py",
        "--dims",
        "32,2,2,64",
        "--seq",
        "32",
        "--batch",
        "2",
        "--steps",
        "1",
        "--top",
        "50",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {
        (parts := line.rsplit(maxsplit=4))[0]: parts[1:]
        for line in r.stdout.splitlines()
        if line.strip() and not line.startswith(("#", "function "))
    }  # a name may hold spaces
    # The operations of the model, the attention, the sampler and the step are charged to functions
    # of this repo (which of the model's functions a matmul lands in depends on the JAX version's
    # stack frames), and both columns are filled. How the time splits between ours and JAX's own
    # operations at these shapes depends on the machine's load, so it is not asserted.
    ours = {fn: float(v[2]) for fn, v in rows.items() if fn != "(jax internals)"}
    assert any(fn.startswith("model.") and t > 0 for fn, t in ours.items()), rows
    assert ours.get("blocked_attention.blocked_attention", 0) > 0, rows
    for module in ("model.llama.", "data.sampler.", "training.step."):
        assert any(fn.startswith(module) for fn in ours), (module, rows)
    assert sum(float(v[0]) for v in rows.values()) > 0 and sum(float(v[1]) for v in rows.values()) > 0
    assert sum(float(v[3].rstrip("%")) for v in rows.values()) == pytest.approx(100, abs=0.5)


def test_profile_self_times_subtract_nested_events_per_thread():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from profile_step import self_times

    events = [  # a loop (0-100) holding two ops, one of which holds another; a second thread apart
        {"ph": "X", "tid": 1, "name": "while", "ts": 0, "dur": 100},
        {"ph": "X", "tid": 1, "name": "dot", "ts": 10, "dur": 30},
        {"ph": "X", "tid": 1, "name": "exp", "ts": 15, "dur": 5},
        {"ph": "X", "tid": 1, "name": "add", "ts": 50, "dur": 20},
        {"ph": "X", "tid": 2, "name": "dot", "ts": 20, "dur": 40},
        {"ph": "M", "tid": 2, "name": "thread_name"},
    ]
    assert self_times(events) == {"while": 50, "dot": 65, "exp": 5, "add": 20}

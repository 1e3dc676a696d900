"""Compile jobs for a GPU in a separate process and collect what each compile reported: the
library interface of `plan` (the CLI, the tests and benchmarks/kernel_resources.py use it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from . import target as targets

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # holds genesis_jax/ and kernels/


def program_total(p: dict[str, Any]) -> int:
    """Peak bytes of one program: its arguments, outputs that are not donated inputs, temporaries."""
    m = p["memory"]
    return (
        m["argument_size_in_bytes"]
        + m["output_size_in_bytes"]
        - m["alias_size_in_bytes"]
        + m["temp_size_in_bytes"]
        + m["generated_code_size_in_bytes"]
    )


@dataclass
class JobResult:
    job: dict[str, Any]
    ok: bool
    error: str = ""
    user_error: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    programs: list[dict[str, Any]] = field(default_factory=list)

    def memory_rows(self) -> tuple[list[tuple[str, int]], int]:
        """A train job's (label, bytes) rows per device and its peak: the train step, and
        validation, which runs while the whole train state and corpus stay on the device."""
        info, (train, val) = self.info, self.programs
        held = info["parameters"] + info["optimizer"] + info["corpus"]
        train_total = program_total(train)
        val_total = (
            held
            + val["memory"]["temp_size_in_bytes"]
            + info["validation_batch"]
            + val["memory"]["output_size_in_bytes"]
        )
        temps = train["memory"]["temp_size_in_bytes"]
        rows = [
            ("parameters", info["parameters"]),
            ("optimizer state", info["optimizer"]),
            ("corpus", info["corpus"]),
            ("train step temporaries", temps),
            ("  of which the batch, drawn on the device", info["batch_bytes"]),
            ("other (PRNG key, controls, metrics)", train_total - held - temps),
            ("train step total", train_total),
            ("validation total (state, corpus, its batch and temporaries)", val_total),
        ]
        return rows, max(train_total, val_total)

    def kernels(self, pallas_only: bool = True) -> list[dict[str, Any]]:
        """Each kernel once (the first program that has it), Pallas kernels only by default."""
        seen: dict[str, dict[str, Any]] = {}
        for p in self.programs:
            for k in p["kernels"]:
                if (k["pallas"] or not pallas_only) and k["name"] not in seen:
                    seen[k["name"]] = k
        return list(seen.values())


@dataclass
class Compiled:
    target: targets.Target | None  # None for the local GPU
    device_kind: str
    memory_limit: int  # bytes JAX's allocator may use per device
    results: list[JobResult]


def _crash_reason(where: Path, stderr: str) -> str:
    """The last line of the job's compile log (or of the process's own output) that looks like
    the fatal error."""
    logs = sorted(where.glob("*/compile.log"))
    text = logs[-1].read_text(encoding="utf-8", errors="replace") if logs else stderr
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith(("I", "W"))]
    fatal = [ln for ln in lines if "error" in ln.lower() or "fatal" in ln.lower() or "abort" in ln.lower()]
    return (fatal or lines or ["no message"])[-1][:300]


def run(
    jobs: list[dict[str, Any]], target: str, devices: int = 1, workdir: Path | None = None, timeout_s: float = 1800.0
) -> Compiled:
    """Compile every job for `target` (a shipped spec name, or "local") on `devices` devices.

    A compiler crash fails only the job that caused it; UserError for a missing toolchain or a
    target that cannot be opened."""
    spec = None if target == targets.LOCAL else targets.load(target)
    if spec is not None:
        targets.check_toolchain()
    own = workdir is None
    root = Path(tempfile.mkdtemp(prefix="genesis_plan_")) if own else workdir
    assert root is not None
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("job[0-9]*"):  # an earlier run's, in a kept directory
        shutil.rmtree(stale)
    for stale in (root / "fatal.json", root / "device.json"):
        stale.unlink(missing_ok=True)
    (root / "jobs.json").write_text(json.dumps({"target": target, "devices": devices, "jobs": jobs}), encoding="utf-8")
    env = targets.worker_env(target, dict(os.environ))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "genesis_jax.plan.worker", str(root)]
    results: list[JobResult | None] = [None] * len(jobs)
    while True:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        fatal = root / "fatal.json"
        if fatal.exists():
            f = json.loads(fatal.read_text(encoding="utf-8"))
            raise UserError(f["error"] if f["user_error"] else f"--target {target}: {f['error']}")
        progressed = False
        for i, job in enumerate(jobs):
            where = root / f"job{i:03d}"
            if results[i] is not None:
                continue
            if (where / "result.json").exists():
                results[i] = JobResult(job, **json.loads((where / "result.json").read_text(encoding="utf-8")))
                progressed = True
            elif (where / "started").exists():  # it ended the process
                reason = _crash_reason(where, proc.stderr)
                results[i] = JobResult(
                    job, ok=False, error=f"the compiler process died (exit {proc.returncode}): {reason}"
                )
                (where / "result.json").write_text(
                    json.dumps({"ok": False, "error": results[i].error}), encoding="utf-8"
                )
                progressed = True
        if all(r is not None for r in results):
            break
        if not progressed:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"plan's compiler process failed before compiling (exit {proc.returncode}): {tail}")
    device = json.loads((root / "device.json").read_text(encoding="utf-8"))
    if own:
        shutil.rmtree(root, ignore_errors=True)
    limit = device["bytes_limit"]
    if limit is None:
        assert spec is not None
        limit = int(spec.memory_bytes * targets.memory_fraction())
    return Compiled(spec, device["kind"], int(limit), [r for r in results if r is not None])

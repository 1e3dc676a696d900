"""`python -m genesis_jax.plan.worker DIR`: the compiler process of `plan`.

Reads DIR/jobs.json, compiles each job's programs for the target and writes DIR/<i>/result.json.
A compile can end the process (LLVM fatal errors do), so each program's native log goes to its
own file and the parent (compile.py) restarts this process after the job that killed it.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jax

from ..core.errors import UserError
from . import hlo, resources, target as targets
from .jobs import JOBS, Program


def open_target(name: str, n: int) -> tuple[list[jax.Device], int | None]:
    """`n` devices to compile for, and the bytes JAX's allocator may use on each (None: from
    the target's spec, computed by the parent)."""
    if name != targets.LOCAL:
        return targets.compile_only_devices(name, n), None
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if len(gpus) < n:
        raise UserError(
            f"--target local: {len(gpus)} GPU(s) here, {n} asked for (use --target h100 or h200 "
            "to compile for absent GPUs)"
        )
    stats = gpus[0].memory_stats() or {}
    return gpus[:n], stats.get("bytes_limit")


@contextmanager
def native_log(path: Path) -> Iterator[None]:
    """Route file descriptor 2 (XLA's and ptxas's log, Python's stderr) to `path`."""
    sys.stderr.flush()
    saved = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def compile_program(p: Program, where: Path, devices: int) -> dict[str, Any]:
    dump = where / "dump"
    options = {"xla_dump_to": str(dump), "xla_gpu_enable_libnvptxcompiler": False}  # ptxas as a process: it logs
    log = where / "compile.log"
    t0 = time.perf_counter()
    with native_log(log):
        lowered = p.fn.trace(*p.args).lower()
        compiled = lowered.compile(compiler_options=options)
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    memory = {
        k: int(getattr(mem, k))
        for k in (
            "argument_size_in_bytes",
            "output_size_in_bytes",
            "alias_size_in_bytes",
            "temp_size_in_bytes",
            "generated_code_size_in_bytes",
        )
    }
    text = log.read_text(encoding="utf-8", errors="replace")
    launches = resources.mosaic_launches(lowered.compiler_ir("stablehlo"))
    return {
        "name": p.name,
        "compile_s": seconds,
        "memory": memory,
        "kernels": [k.to_json() for k in resources.kernels(text, dump, launches)],
        "largest": resources.largest_temporaries(dump),
        "profile": hlo.profile(resources.latest(dump, "_gpu_after_optimizations.txt"), devices).to_json(),
    }


def run_job(job: dict[str, Any], devices: list[jax.Device], where: Path) -> dict[str, Any]:
    try:
        with jax.default_device(devices[0]):  # kernels read the target (GPU kind, interpret or not) from it
            programs, info = JOBS[job["kind"]](job, devices)
            compiled = []
            for i, p in enumerate(programs):
                (where / str(i)).mkdir(parents=True, exist_ok=True)
                compiled.append(compile_program(p, where / str(i), len(devices)))
        return {"ok": True, "info": info, "programs": compiled}
    except UserError as e:
        return {"ok": False, "user_error": True, "error": str(e)}
    except Exception as e:  # noqa: BLE001 - a compile that fails is a result to report
        (where / "traceback.txt").write_text(traceback.format_exc(), encoding="utf-8")
        return {"ok": False, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}


def main(argv: list[str]) -> int:
    root = Path(argv[0])
    spec = json.loads((root / "jobs.json").read_text(encoding="utf-8"))
    try:
        devices, limit = open_target(spec["target"], spec["devices"])
    except Exception as e:  # noqa: BLE001 - reported by the parent in one line
        text = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        fatal = {"error": text.strip().splitlines()[0], "user_error": isinstance(e, UserError)}
        (root / "fatal.json").write_text(json.dumps(fatal), encoding="utf-8")
        return 1
    (root / "device.json").write_text(
        json.dumps({"kind": devices[0].device_kind, "bytes_limit": limit}), encoding="utf-8"
    )
    for i, job in enumerate(spec["jobs"]):
        where = root / f"job{i:03d}"
        if (where / "result.json").exists() or (where / "started").exists():
            continue  # done, or the job that ended the previous process
        where.mkdir(parents=True, exist_ok=True)
        (where / "started").touch()
        result = run_job(job, devices, where)
        (where / "result.json").write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Where the Python and JAX versions we support differ, bridged in one place.

Supported: Python 3.11 to 3.13; JAX 0.10.2 to 0.12.x (what pyproject.toml admits, each tested).
Every branch below names the JAX range it covers. Nothing here imports JAX at module load, so the
package imports (and `module_available` answers) before JAX starts.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import re
from collections.abc import Iterator
from typing import Any


def module_available(name: str) -> bool:
    """Whether `name` can be imported, without importing it: False also when a parent package is
    absent (importlib.util.find_spec("a.b") raises ModuleNotFoundError when `a` is missing)."""
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def version_tuple(text: str) -> tuple[int, ...]:
    """(0, 11, 2) from "0.11.2", "0.11.2.dev20260101" or "0.12.0rc1": the leading numbers."""
    return tuple(int(n) for n in re.findall(r"\d+", text.split("+")[0])[:3])


@functools.cache
def jax_version() -> tuple[int, ...]:
    return version_tuple(importlib.metadata.version("jax"))


def fast_cpu_compile_flags() -> list[str]:
    """XLA flags that trade some CPU run time for faster compilation, for workloads of many small
    programs (the test suite). JAX 0.10: the older fusion emitters compile the `test` preset's
    train step in about half the time (3.3 s -> 1.7 s; runs 12 -> 14 ms a step). From JAX 0.11
    XLA has only the new emitters and aborts on the flag."""
    return ["--xla_cpu_use_fusion_emitters=false"] if jax_version() < (0, 11) else []


def mosaic_load(ref: Any, layout: Any) -> Any:
    """`plgpu.load` of a whole shared-memory ref into registers with `layout`. Its index argument
    was required up to JAX 0.10, optional in 0.11 and is gone in 0.12."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if jax_version() < (0, 11):
        return plgpu.load(ref, (), layout=layout)
    return plgpu.load(ref, layout=layout)


# Operand segments of the gpu.launch in a Mosaic GPU kernel module: 11 with JAX 0.10 (async
# tokens, grid x y z, block x y z, cluster x y z, dynamic shared memory), 12 from JAX 0.11 (the
# same, then one more); the first 11 mean the same in both.
GPU_LAUNCH_SEGMENTS = (11, 12)

# XLA's thunk-sequence dump, one kernel launch per line: (name, grid, threads per block, dynamic
# shared memory bytes) in each format the supported JAX versions write.
THUNK_LAUNCHES = (
    # JAX 0.10 and 0.11: "NAME grid: [x, y, z] threads: [x, y, z]  shared_memory: N bytes"
    re.compile(
        r"(?P<name>\S+) grid: \[(?P<grid>\d+, \d+, \d+)\] threads: \[(?P<threads>\d+, \d+, \d+)\]"
        r"\s+shared_memory: (?P<shared>\d+) bytes"
    ),
    # JAX 0.12: "kernel=NAME, ... launch dimensions=blocks: {x, y, z}, threads/block: {x, y, z}, ... shmem_bytes=N"
    re.compile(
        r"kernel=(?P<name>[^,\s]+),.*?launch dimensions=blocks: \{(?P<grid>\d+, \d+, \d+)\}, "
        r"threads/block: \{(?P<threads>\d+, \d+, \d+)\}.*?shmem_bytes=(?P<shared>\d+)"
    ),
)


def thunk_launches(text: str) -> Iterator[tuple[str, tuple[int, int, int], tuple[int, int, int], int]]:
    """Every kernel launch in a thunk-sequence dump, whichever supported format it is in."""
    for pattern in THUNK_LAUNCHES:
        for m in pattern.finditer(text):
            grid = tuple(int(n) for n in m.group("grid").split(","))
            threads = tuple(int(n) for n in m.group("threads").split(","))
            yield m.group("name"), grid, threads, int(m.group("shared"))  # type: ignore[misc]


def add_into_prefix(acc: Any, update: Any) -> Any:
    """`acc[..., :n] += update` (n = update's last dimension). When n is the whole axis this is
    a plain add: JAX 0.11.2's Shardy partitioner crashes XLA (SIGSEGV in its shardy-xla pass)
    on the scatter-add `.at[..., :n].add` lowers to when it spans the whole axis inside
    `jax.shard_map`, which is where the attention kernels run on a mesh. The plain add is also
    what every version should run there."""
    n = update.shape[-1]
    return acc + update if n == acc.shape[-1] else acc.at[..., :n].add(update)


def persistent_cache_unsafe(platform: str, processes: int) -> str:
    """Why JAX's persistent compilation cache must stay off for this run ("" when it may be on).
    JAX 0.12 on the CPU: the processes of a run resumed after one of them was killed deadlock
    in their first collective when they load programs that the killed run cached (seen with
    gloo on JAX 0.12.1; 0.10.2 and 0.11.2 resume fine)."""
    if platform == "cpu" and processes > 1 and jax_version() >= (0, 12):
        return "JAX >= 0.12 multi-process CPU runs can deadlock on programs a killed run cached"
    return ""

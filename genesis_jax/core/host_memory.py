"""Transparent huge pages for the host heap, by relaunching the process with glibc's tunable.

XLA:CPU allocates each execution's temporaries afresh (about 0.5 GB for the 192/16/6/768 model's
training step), and glibc maps an allocation that large with mmap: with 4 KiB pages a step
takes some 10^5 page faults and its buffers overflow the TLB. With `glibc.malloc.hugetlb=1`
(glibc >= 2.35) malloc asks the kernel for transparent huge pages on those mappings; that made
the CPU training step about 10% faster (benchmarks/README.md). glibc reads tunables once, when
the process starts, so a command that wants them execs itself again with the tunable set.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb"
THP_MODE_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
MIN_GLIBC = (2, 35)


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library when it is glibc, else None (musl, macOS, Windows)."""
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, ValueError, OSError):
        return None
    name, _, version = text.partition(" ")
    parts = version.split(".")
    if name != "glibc" or len(parts) < 2 or not all(p.isdigit() for p in parts[:2]):
        return None
    return int(parts[0]), int(parts[1])


def thp_mode(path: Path = THP_MODE_FILE) -> str | None:
    """The kernel's transparent huge page mode (`always`, `madvise`, `never`), None when unknown."""
    try:
        text = path.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def tunable_value(env: Mapping[str, str]) -> str | None:
    """The value GLIBC_TUNABLES gives the huge-page tunable, None when it does not name it."""
    for item in env.get("GLIBC_TUNABLES", "").split(":"):
        key, sep, value = item.partition("=")
        if sep and key == TUNABLE:
            return value
    return None


def relaunch_environment(
    env: Mapping[str, str], glibc: tuple[int, int] | None, mode: str | None
) -> dict[str, str] | None:
    """The environment to exec again with, or None when a relaunch would change nothing: not
    glibc >= 2.35, huge pages `always` (every large mapping has them) or off, or the tunable
    already given a value (the launcher's choice, `0` included)."""
    if not tunable_applies(glibc, mode) or tunable_value(env) is not None:
        return None
    return with_huge_pages(env, True)


def tunable_applies(glibc: tuple[int, int] | None, mode: str | None) -> bool:
    """Whether the tunable changes anything: glibc >= 2.35 and the kernel's mode `madvise`."""
    return glibc is not None and glibc >= MIN_GLIBC and mode == "madvise"


def with_huge_pages(env: Mapping[str, str], on: bool) -> dict[str, str]:
    """`env` with the huge-page tunable set to 1 (`on`) or removed, other tunables kept."""
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and t.partition("=")[0] != TUNABLE]
    tunables += [f"{TUNABLE}=1"] if on else []
    out = {k: v for k, v in env.items() if k != "GLIBC_TUNABLES"}
    return out | ({"GLIBC_TUNABLES": ":".join(tunables)} if tunables else {})


def huge_pages_state(env: Mapping[str, str] | None = None) -> str:
    """One phrase for a run's first line: whether host allocations get huge pages, and why."""
    env = os.environ if env is None else env
    glibc, mode = glibc_version(), thp_mode()
    if mode == "always":
        return "on (kernel: always)"
    value = tunable_value(env)
    if tunable_applies(glibc, mode) and value == "1":
        return f"on ({TUNABLE}=1)"
    if value is not None and value != "1":
        return f"off ({TUNABLE}={value})"
    return "off" if mode is None else f"off (kernel: {mode})"


def relaunch_with_huge_pages() -> None:
    """Exec this command again with the huge-page tunable when that changes anything; returns only
    when it does not. Call it first thing in a command's own process (never in a library call:
    the exec replaces the process, same pid, same arguments)."""
    env = relaunch_environment(os.environ, glibc_version(), thp_mode())
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)

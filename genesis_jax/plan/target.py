"""The GPUs `plan` compiles for, the toolchain it needs, and the environment of its compiler
process (docs/design.md, "Planning for a GPU")."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import jax

from ..core.compat import module_available
from ..core.errors import UserError

TARGET_DIR = Path(__file__).resolve().parent / "targets"
LOCAL = "local"  # the GPUs of this machine
CUDA_PLUGINS = {"jax_plugins.xla_cuda13": "jax-cuda13-plugin", "jax_plugins.xla_cuda12": "jax-cuda12-plugin"}
DEFAULT_MEMORY_FRACTION = 0.75  # JAX's default XLA_PYTHON_CLIENT_MEM_FRACTION


class ToolchainMissing(UserError):
    """The CUDA compiler plugin or ptxas is not installed."""


@dataclass(frozen=True)
class Target:
    name: str  # h100, h200 or local
    config_text: str | None  # GpuTargetConfigProto text (None: the local GPU describes itself)
    description: str  # the device name its spec gives
    memory_bytes: int  # device memory the driver reports as usable
    compute_capability: str  # e.g. "9.0"
    sm_count: int
    memory_bandwidth: float  # HBM bytes/s (the spec's figure: the datasheet's)


def names() -> list[str]:
    return sorted(p.stem for p in TARGET_DIR.glob("*.txtpb")) + [LOCAL]


def _field(text: str, name: str) -> str:
    m = re.search(rf"^\s*{name}:\s*(.+?)\s*$", text, re.MULTILINE)
    if m is None:
        raise ValueError(f"target spec: no field {name!r}")
    return m.group(1).strip('"')


def load(name: str) -> Target:
    """A shipped target spec by name (`--target`); ToolchainMissing/UserError in one line."""
    path = TARGET_DIR / f"{name}.txtpb"
    if name == LOCAL or not path.is_file():
        raise UserError(f"--target {name!r}: expected one of {', '.join(names())}")
    text = path.read_text(encoding="utf-8")
    cc = re.search(r"cuda_compute_capability\s*{\s*major:\s*(\d+)\s*minor:\s*(\d+)", text)
    assert cc is not None, path
    return Target(
        name,
        text,
        _field(text, "device_description_str"),
        int(_field(text, "device_memory_size")),
        f"{cc.group(1)}.{cc.group(2)}",
        int(_field(text, "core_count")),
        float(_field(text, "memory_bandwidth")),
    )


def for_device_kind(kind: str) -> Target | None:
    """The shipped spec of a GPU by the name JAX gives it, if there is one: the spec's own name
    ("NVIDIA H100 80GB HBM3"), or its model alone ("NVIDIA H200", as some drivers name the SXM
    part); never a PCIe or NVL part, whose memory and SM count differ."""
    specs = [load(n) for n in names() if n != LOCAL]
    exact = next((t for t in specs if t.description == kind), None)
    if exact or any(w in kind for w in ("PCIe", "NVL")):
        return exact
    return next((t for t in specs if kind.split()[:2] == t.description.split()[:2]), None)


def jaxlib_version() -> str:
    return importlib.metadata.version("jaxlib")


def install_command() -> str:
    return f'pip install "jax[cuda13-local]=={jaxlib_version()}" nvidia-cuda-nvcc   (or: pip install -e ".[plan]")'


def ptxas() -> str | None:
    """Where XLA will find ptxas: the nvidia-cuda-nvcc wheel first, then PATH and CUDA's usual home."""
    for spec_name in ("nvidia.cu13", "nvidia.cuda_nvcc"):
        spec = importlib.util.find_spec(spec_name) if module_available(spec_name) else None
        for root in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(root) / "bin" / "ptxas"
            if candidate.is_file():
                return str(candidate)
    found = shutil.which("ptxas")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/ptxas")
    return str(default) if default.is_file() else None


def check_toolchain() -> None:
    """The CUDA plugin at the installed jaxlib's version, and ptxas; else one line saying what to install."""
    plugin = next((dist for module, dist in CUDA_PLUGINS.items() if module_available(module)), None)
    if plugin is None and (sys.platform, platform.machine()) != ("linux", "x86_64"):
        raise ToolchainMissing(
            f"compiling for a GPU needs JAX's CUDA plugin and ptxas, which exist for Linux x86_64 "
            f"only (this is {sys.platform} {platform.machine()}): run plan on a Linux x86_64 machine"
        )
    if plugin is None:
        raise ToolchainMissing(
            f"compiling for a GPU needs JAX's CUDA plugin, which is not installed; install it with: {install_command()}"
        )
    version = importlib.metadata.version(plugin)
    if version != jaxlib_version():
        raise ToolchainMissing(
            f"{plugin} {version} does not match jaxlib {jaxlib_version()}; install the matching "
            f"one with: {install_command()}"
        )
    if ptxas() is None:
        raise ToolchainMissing(
            f"compiling for a GPU needs ptxas (CUDA's assembler), which was not found; install it "
            f"with: {install_command()}"
        )


def worker_env(target: str, base: dict[str, str]) -> dict[str, str]:
    """The compiler process's environment: ptxas's resource report logged, every program really
    compiled (no persistent cache), and nothing that would make the compiled program differ from
    a training run's (tests' fast-compile flag)."""
    env = dict(base)
    env.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # a cached program is not compiled: ptxas would report nothing
    env["TF_CPP_MIN_LOG_LEVEL"] = "0"
    env["TF_CPP_VMODULE"] = "subprocess_compilation=2"  # ptxas -v: registers, spills, per kernel
    if target != LOCAL:
        # A compile-only GPU: no GPU backend is started, and the plugin needs no cuDNN to load.
        env["JAX_PLATFORMS"] = "cpu"
        env["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"
    return env


def compile_only_devices(name: str, n: int = 1) -> list[jax.Device]:
    """`n` devices of a shipped target that exist only to compile for (XLA's deviceless
    topology); in this process, which needs the toolchain but no GPU."""
    from jax.experimental import topologies

    spec = load(name)
    check_toolchain()
    return list(
        topologies.get_topology_desc(platform="cuda", target_config=spec.config_text, topology=f"1x1x{n}").devices
    )


def memory_fraction(env: dict[str, str] | None = None) -> float:
    """The share of device memory JAX's allocator may use (XLA_PYTHON_CLIENT_MEM_FRACTION)."""
    text = (env if env is not None else dict(os.environ)).get("XLA_PYTHON_CLIENT_MEM_FRACTION", "")
    try:
        value = float(text) if text else DEFAULT_MEMORY_FRACTION
    except ValueError:
        raise UserError(f"XLA_PYTHON_CLIENT_MEM_FRACTION = {text!r}: expected a number in (0, 1]") from None
    if not 0.0 < value <= 1.0:
        raise UserError(f"XLA_PYTHON_CLIENT_MEM_FRACTION = {text!r}: expected a number in (0, 1]")
    return value

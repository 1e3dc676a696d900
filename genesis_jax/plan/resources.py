"""What a GPU compile left behind, read back: each kernel's registers and spills (ptxas's
verbose log), its launch shape and dynamic shared memory (XLA's thunk sequence; for Mosaic GPU
kernels, the kernel module their custom call carries), the Pallas calls among them and the
largest temporary buffers (the optimized HLO and its buffer assignment)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..core.compat import GPU_LAUNCH_SEGMENTS, thunk_launches

# Custom-call targets of Pallas kernels in optimized HLO (Triton lowering, Mosaic GPU).
PALLAS_TARGETS = ("__gpu$xla.gpu.triton", "mosaic_gpu", "mosaic_gpu_v2")
MOSAIC_SUFFIX = "_mosaic_gpu_kernel"  # ptxas's name of a Mosaic GPU kernel: its Python body's name + this
REGISTER_FILE = 65536  # 32-bit registers per SM (sm_80 and sm_90)
REGISTER_GRANULE = 256  # registers are allocated per warp in units of this many
SHARED_PER_SM = 233472  # bytes of shared memory per SM on Hopper (228 KiB)
SHARED_RESERVED = 1024  # bytes the runtime reserves per block
THREADS_PER_SM = 2048

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{op_name=\"([^\"]*)\"", re.MULTILINE)
_VALUE = re.compile(r"value: <\d+ ([^ >]+) @\d+> \(size=(\d+),offset=(\d+)\): (.+)$")


@dataclass
class Kernel:
    name: str
    target: str = ""  # sm_90a
    registers: int | None = None  # per thread
    spill_stores: int | None = None  # bytes per thread
    spill_loads: int | None = None
    stack: int | None = None  # bytes per thread
    shared_memory: int | None = None  # dynamic shared memory per block, bytes
    threads: int | None = None  # per block
    grid: tuple[int, int, int] | None = None
    pallas: bool = False

    @property
    def spills(self) -> bool:
        return bool(self.spill_stores or self.spill_loads)

    def blocks_per_sm(self) -> int | None:
        """Resident blocks per SM that registers, shared memory and threads allow (occupancy)."""
        if self.registers is None or self.threads is None or self.shared_memory is None:
            return None
        warps = math.ceil(self.threads / 32)
        per_warp = math.ceil(self.registers * 32 / REGISTER_GRANULE) * REGISTER_GRANULE
        by_registers = REGISTER_FILE // max(per_warp * warps, 1)
        by_shared = SHARED_PER_SM // (self.shared_memory + SHARED_RESERVED)
        return min(by_registers, by_shared, THREADS_PER_SM // self.threads)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "blocks_per_sm": self.blocks_per_sm()}


def ptxas_report(log: str) -> dict[str, Kernel]:
    """Per entry function: registers, stack and spill bytes from `ptxas -v` output in XLA's log
    (each ptxas run is one log message, so its lines stay together)."""
    kernels: dict[str, Kernel] = {}
    current: Kernel | None = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = kernels.setdefault(m.group(1), Kernel(m.group(1)))
            current.target = m.group(2)
        elif current is not None and (m := _SPILL.search(line)):
            current.stack, current.spill_stores, current.spill_loads = (int(x) for x in m.groups())
        elif current is not None and (m := _USED.search(line)):
            current.registers = int(m.group(1))
    return kernels


def latest(dump: Path, suffix: str) -> str:
    files = sorted(dump.glob(f"*{suffix}"))
    return files[-1].read_text(encoding="utf-8", errors="replace") if files else ""


def kernels(log: str, dump: Path, launches: Sequence[Kernel] = ()) -> list[Kernel]:
    """Every kernel of one compiled program: ptxas's figures joined with the launch shapes
    (XLA's, and `launches`: the Mosaic GPU kernels', see mosaic_launches)."""
    found = ptxas_report(log)
    for launch in launches:
        k = found.setdefault(launch.name, Kernel(launch.name))
        k.grid, k.threads = launch.grid or k.grid, launch.threads or k.threads
        if launch.shared_memory is not None:
            k.shared_memory = max(k.shared_memory or 0, launch.shared_memory)
    for name, grid, threads, shared in thunk_launches(latest(dump, ".thunk_sequence.txt")):
        k = found.setdefault(name, Kernel(name))
        k.grid, k.threads = grid, math.prod(threads)
        k.shared_memory = max(k.shared_memory or 0, shared)
    for name in pallas_names(latest(dump, "_gpu_after_optimizations.txt")):
        found.setdefault(name, Kernel(name)).pallas = True
    for name, k in found.items():
        if name.endswith(MOSAIC_SUFFIX):  # launched by the custom call, absent from the thunk sequence
            k.pallas = True
    return sorted(found.values(), key=lambda k: (not k.pallas, k.name))


def mosaic_launches(stablehlo: Any) -> list[Kernel]:
    """Grid, threads and dynamic shared memory of each Mosaic GPU kernel in a lowered program
    (`Lowered.compiler_ir("stablehlo")`). Its custom call launches it when it runs, so neither
    ptxas's log nor XLA's thunk sequence has them; the kernel module the call carries (MLIR
    bytecode) holds one launch op whose operands are constants. Named as ptxas names it."""
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir

    context: ir.Context | None = None
    out: list[Kernel] = []
    for call in _walk(stablehlo.operation):
        if call.name != "stablehlo.custom_call" or "mhlo.backend_config" not in call.attributes:
            continue
        if ir.StringAttr(call.attributes["call_target_name"]).value not in PALLAS_TARGETS[1:]:
            continue
        config = call.attributes["mhlo.backend_config"]
        if not isinstance(config, ir.DictAttr) or "module" not in config:
            continue
        if context is None:
            from jax.experimental.mosaic.gpu import dialect

            context = mlir.make_ir_context()
            context.allow_unregistered_dialects = True
            dialect.register_dialect(context)
        module = ir.Module.parse(ir.StringAttr(config["module"]).value_bytes, context=context)
        function = ""
        for op in _walk(module.operation):
            if op.name.endswith("func.func"):
                function = ir.StringAttr(op.attributes["sym_name"]).value
            elif op.name.endswith("gpu.launch"):
                out.append(_launch(op, function + "_kernel"))
    return out


def _walk(op: Any) -> Iterator[Any]:
    """Every operation nested in `op`, in order (MLIR Python bindings)."""
    for region in op.regions:
        for block in region.blocks:
            for child in block.operations:
                yield child.operation
                yield from _walk(child.operation)


def _launch(op: Any, name: str) -> Kernel:
    """A gpu.launch's grid, block and dynamic shared memory, from the constants that feed it
    (operand segments: async tokens, grid x y z, block x y z, cluster x y z, shared memory, and
    from JAX 0.11 on one more).
    A figure that is not a constant, or a launch of another form, is left unknown."""
    from jax._src.lib.mlir import ir

    if "operandSegmentSizes" not in op.attributes:
        return Kernel(name, pallas=True)
    sizes = list(ir.DenseI32ArrayAttr(op.attributes["operandSegmentSizes"]))
    if len(sizes) not in GPU_LAUNCH_SEGMENTS:
        return Kernel(name, pallas=True)
    operands = list(op.operands)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]

    def constant(segment: int) -> int | None:
        owner = operands[starts[segment]].owner
        value = owner.attributes["value"] if "value" in owner.attributes else None
        return ir.IntegerAttr(value).value if isinstance(value, ir.IntegerAttr) else None

    grid, block = [constant(i) for i in (1, 2, 3)], [constant(i) for i in (4, 5, 6)]
    return Kernel(
        name,
        grid=tuple(grid) if None not in grid else None,  # type: ignore[arg-type]
        threads=math.prod(block) if None not in block else None,  # type: ignore[arg-type]
        shared_memory=constant(10) if sizes[10] else 0,
        pallas=True,
    )


def pallas_names(hlo: str) -> set[str]:
    """Kernel names of the Pallas calls in optimized HLO text."""
    out = set()
    for line in hlo.splitlines():
        if any(f'custom_call_target="{t}"' in line for t in PALLAS_TARGETS):
            m = re.search(r'\bname = \\?"([^"\\]+)', line)
            if m:
                out.add(m.group(1))
    return out


def largest_temporaries(dump: Path, n: int = 5) -> list[dict[str, Any]]:
    """The biggest buffers in the program's temporary allocation (values XLA places at the same
    offset share one buffer, counted once), alike ones counted together: bytes each, count,
    shape, and the JAX operation that made the first value (op_name without its wrappers)."""
    ops = {m.group(1): m.group(2) for m in _INSTR.finditer(latest(dump, "_gpu_after_optimizations.txt"))}
    buffers: dict[tuple[int, int], tuple[str, str]] = {}  # (offset, size) -> (shape, op)
    in_temp = False
    for line in latest(dump, "_gpu_after_optimizations-buffer-assignment.txt").splitlines():
        if line.startswith("allocation "):
            in_temp = "preallocated-temp" in line
        elif in_temp and (m := _VALUE.search(line)):
            name, size, offset, shape = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
            if not shape.startswith("("):  # a tuple's index table is not data
                buffers.setdefault(
                    (offset, size), (re.sub(r"\{[\d,]*\}$", "", shape), shorten(ops.get(name.split("{")[0], "")))
                )
    groups: dict[tuple[int, str, str], int] = {}
    for (_, size), (shape, op) in buffers.items():
        groups[(size, shape, op)] = groups.get((size, shape, op), 0) + 1
    top = sorted(groups.items(), key=lambda kv: -kv[0][0] * kv[1])[:n]
    return [{"bytes": size, "count": count, "shape": shape, "op": op} for (size, shape, op), count in top]


def shorten(op_name: str, parts: int = 5) -> str:
    """A JAX op_name without its wrappers (jit(step), closed_call, jvp(), transpose()), last parts."""
    pieces = [
        p
        for p in op_name.split("/")
        if p and not re.fullmatch(r"(jit\(step\)|closed_call|jvp\(.*\)|transpose\(.*\))", p)
    ]
    return "/".join(pieces[-parts:])

"""The work of one compiled GPU program, read from its optimized HLO: every kernel it launches per
call, with while-loop bodies counted as many times as their known trip count (XLA's own
`cost_analysis()` counts a loop body once, which undercounts a scanned model by its depth).

Each launch is a GEMM (a dot, fused or a cuBLAS call: its M, N, K and bytes), an attention
kernel (a Pallas call: its name and its query and key shapes), a collective (its bytes and group)
or a memory-bound kernel (bytes it reads and writes: a slice of a stacked buffer counts as the
slice, an in-place update as the update). Nothing here knows a GPU's speed (speed.py does)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4}
ITEMSIZE.update({"s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 1, "u4": 1})
PALLAS_TARGETS = ("__gpu$xla.gpu.triton", "mosaic_gpu", "mosaic_gpu_v2")
GEMM_TARGETS = ("__cublas$gemm", "__cublas$lt$matmul")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
FREE = {
    "parameter",
    "constant",
    "get-tuple-element",
    "tuple",
    "bitcast",
    "after-all",
    "partition-id",
    "replica-id",
    "opt-barrier",
    "add-dependency",
    "domain",
    "iota",
}  # no kernel of their own at the top level (iota is folded into its users' fusions or trivially small)

_HEADER = re.compile(r"^(ENTRY )?%(\S+) \(.*\) -> .* \{$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.+?) ([a-z][a-z0-9\-]*)\(([^)]*)\)(.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_OPERAND = re.compile(r"%([\w.\-]+(?:#\d+)?)")  # JAX 0.12's HLO names a tuple's element as %name#index
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_OP_NAME = re.compile(r'op_name="([^"]*)"')


@dataclass
class Instr:
    name: str
    shape: str
    op: str
    operands: list[str]
    attrs: str
    raw: str = ""  # the text between the parentheses: a parameter's index

    def attr(self, key: str) -> str | None:
        m = re.search(rf"\b{key}=%?([\w.\-]+)", self.attrs)
        return m.group(1) if m else None

    def dims(self, key: str) -> list[int]:
        """A dot's dimension numbers: from its attribute, or from a cuBLAS call's backend config."""
        m = re.search(rf"\b{key}=\{{([\d,]*)\}}", self.attrs)
        if m:
            return [int(x) for x in m.group(1).split(",") if x]
        m = re.search(rf'"{key.replace("_dims", "_dimensions")}":\[([^\]]*)\]', self.attrs)
        return [int(x) for x in re.findall(r"\d+", m.group(1))] if m else []


@dataclass
class Computation:
    name: str
    instrs: list[Instr] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.by_name: dict[str, Instr] = {}

    def add(self, i: Instr) -> None:
        self.instrs.append(i)
        self.by_name[i.name] = i

    @property
    def root(self) -> Instr:
        return self.instrs[-1]

    def users(self, name: str) -> list[Instr]:
        return [i for i in self.instrs if name in i.operands]


def arrays(shape: str) -> list[tuple[str, list[int]]]:
    return [(m.group(1), [int(x) for x in m.group(2).split(",") if x]) for m in _ARRAY.finditer(shape)]


def nbytes(shape: str) -> int:
    return sum(math.prod(d) * ITEMSIZE.get(t, 4) for t, d in arrays(shape) if t != "token")


def parse(text: str) -> tuple[dict[str, Computation], str]:
    """Every computation of an HLO module's text, and the entry's name."""
    comps: dict[str, Computation] = {}
    entry, current = "", None
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m:
                current = comps.setdefault(m.group(2), Computation(m.group(2)))
                entry = m.group(2) if m.group(1) else entry
            continue
        if line.startswith("}"):
            current = None
            continue
        line = re.sub(r"/\*.*?\*/", "", line)
        m = _INSTR.match(line)
        if m:
            operands = _OPERAND.findall(m.group(4))
            current.add(Instr(m.group(1), m.group(2), m.group(3), operands, m.group(5), m.group(4)))
    if not entry:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


@dataclass
class Profile:
    """One program's launches per call. GEMMs and attention calls are kept by shape (with their
    counts); memory-bound kernels and collectives are summed."""

    gemms: dict[tuple[int, int, int, int, str], dict[str, float]] = field(default_factory=dict)
    attention: dict[tuple[str, tuple[int, ...], tuple[int, ...]], float] = field(default_factory=dict)
    memory_bytes: float = 0.0
    memory_launches: float = 0.0
    collectives: dict[tuple[str, int], float] = field(default_factory=dict)  # (op, group) -> bytes
    launches: float = 0.0
    unknown_trips: int = 0  # while loops without a known trip count, counted once

    def to_json(self) -> dict[str, Any]:
        return {
            "gemms": [
                {"batch": b, "m": m, "n": n, "k": k, "dtype": t, "count": v["count"], "bytes": v["bytes"]}
                for (b, m, n, k, t), v in sorted(self.gemms.items())
            ],
            "attention": [
                {"kernel": name, "q": list(q), "k": list(kv), "count": c}
                for (name, q, kv), c in sorted(self.attention.items())
            ],
            "memory_bytes": self.memory_bytes,
            "memory_launches": self.memory_launches,
            "collectives": [{"op": op, "group": g, "bytes": b} for (op, g), b in sorted(self.collectives.items())],
            "launches": self.launches,
            "unknown_trips": self.unknown_trips,
        }


def tuple_elements(shape: str) -> list[str]:
    """The top-level elements of a tuple shape "(a, (b, c), d)"."""
    inner, depth, start, out = shape.strip()[1:-1], 0, 0, []
    for n, ch in enumerate(inner):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            out.append(inner[start:n].strip())
            start = n + 1
    return out + [inner[start:].strip()] if inner.strip() else out


def _operand_shape(comp: Computation, name: str) -> str:
    base, _, index = name.partition("#")
    i = comp.by_name.get(base)
    if i is None:
        return ""
    return tuple_elements(i.shape)[int(index)] if index else i.shape


def _read_bytes(fused: Computation, index: int, full: int) -> int:
    """Bytes a fusion reads of its operand `index`: the slices taken of it, nothing when it is
    only the buffer an update writes into in place, else all of it."""
    params = [i for i in fused.instrs if i.op == "parameter" and i.raw.strip() == str(index)]
    if not params:
        return full
    frontier, total = [params[0].name], 0
    seen: set[str] = set()
    while frontier:
        name = frontier.pop()
        if name in seen:
            continue
        seen.add(name)
        for u in fused.users(name):
            if u.op == "bitcast":
                frontier.append(u.name)
            elif u.op in ("dynamic-slice", "slice") and u.operands[0] == name:
                total += nbytes(u.shape)
            elif u.op == "dynamic-update-slice" and u.operands[0] == name:
                continue
            else:
                return full
    return total


def _written_bytes(comp: Computation, i: Instr) -> int:
    """Bytes an instruction writes: an in-place update writes its update, a tuple its parts."""
    if i.op == "dynamic-update-slice":
        return nbytes(_operand_shape(comp, i.operands[1]))
    if i.op in ("bitcast", "copy") and i.operands and i.operands[0] in comp.by_name:
        inner = comp.by_name[i.operands[0]]
        if inner.op == "dynamic-update-slice":
            return _written_bytes(comp, inner)
    if i.op == "tuple":
        return sum(_written_bytes(comp, comp.by_name[o]) if o in comp.by_name else 0 for o in i.operands)
    return nbytes(i.shape)


def _target(i: Instr) -> str:
    m = re.search(r'custom_call_target="([^"]+)"', i.attrs)
    return m.group(1) if m else ""


def _inside(comps: dict[str, Computation], comp: Computation, wanted: Any) -> list[tuple[Computation, Instr]]:
    """The instructions of a fused computation (and the fusions nested in it) that `wanted` picks."""
    out: list[tuple[Computation, Instr]] = []
    for i in comp.instrs:
        if wanted(i):
            out.append((comp, i))
        elif i.op == "fusion" and (callee := i.attr("calls")) in comps:
            out += _inside(comps, comps[callee], wanted)
    return out


def _is_gemm(i: Instr) -> bool:
    return i.op == "dot" or (i.op == "custom-call" and _target(i) in GEMM_TARGETS)


def _is_pallas(i: Instr) -> bool:
    return i.op == "custom-call" and _target(i) in PALLAS_TARGETS


def _gemm_key(comp: Computation, dot: Instr) -> tuple[int, int, int, int, str]:
    (lt, lhs), (_, rhs) = (
        arrays(_operand_shape(comp, dot.operands[0]))[0],
        arrays(_operand_shape(comp, dot.operands[1]))[0],
    )
    lc, lb = dot.dims("lhs_contracting_dims"), dot.dims("lhs_batch_dims")
    rc, rb = dot.dims("rhs_contracting_dims"), dot.dims("rhs_batch_dims")
    k = math.prod(lhs[d] for d in lc)
    b = math.prod(lhs[d] for d in lb)
    m = math.prod(s for d, s in enumerate(lhs) if d not in lc and d not in lb)
    n = math.prod(s for d, s in enumerate(rhs) if d not in rc and d not in rb)
    return b, m, n, k, lt


def _kernel_name(i: Instr) -> str:
    """The Pallas kernel's name: the JAX function around its `pallas_call` (or Mosaic's `mpmd_map`)."""
    m = _OP_NAME.search(i.attrs)
    parts = m.group(1).split("/") if m else []
    inner = [
        p for p in parts if p not in ("pallas_call", "mpmd_map") and not p.startswith(("jit(", "jvp(", "transpose("))
    ]
    return inner[-1] if inner else i.name


def _group_size(i: Instr, default: int) -> int:
    """Devices in each group of a collective: `{{0,1},{2,3}}`, `[2,2]<=[4]`, or (JAX 0.12) the
    mesh axes it spans, `mesh['data'=2,'fsdp'=2] {'fsdp'}`."""
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", i.attrs)
    if m:
        return len(m.group(1).split(","))
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]", i.attrs)
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", i.attrs)
    if m:
        sizes = {a: int(n) for a, n in re.findall(r"'([^']+)'=(\d+)", m.group(1))}
        return math.prod(sizes.get(a, 1) for a in re.findall(r"'([^']+)'", m.group(2)))
    return default


def profile(text: str, devices: int = 1) -> Profile:
    """The launches of the module in `text` (optimized HLO) per call of the program."""
    comps, entry = parse(text)
    p = Profile()

    def visit(comp: Computation, weight: float) -> None:
        for i in comp.instrs:
            if i.op in FREE or i.op.endswith("-done"):
                continue
            if i.op == "while":
                m = _TRIP.search(i.attrs)
                p.unknown_trips += m is None
                visit(comps[i.attr("body") or ""], weight * (int(m.group(1)) if m else 1))
                continue
            if i.op in ("call", "async-start"):
                callee = i.attr("to_apply") or i.attr("calls")
                if callee in comps:
                    visit(comps[callee], weight)
                continue
            if i.op == "conditional":
                branches = re.findall(r"%([\w.\-]+)", re.search(r"branch_computations=\{([^}]*)\}", i.attrs).group(1))
                for b in branches:  # each branch as if it ran that share of the calls
                    visit(comps[b], weight / len(branches))
                continue
            p.launches += weight
            launch(comp, i, weight)

    def launch(comp: Computation, i: Instr, weight: float) -> None:
        base = i.op.removesuffix("-start")
        if base in COLLECTIVES:
            key = (base, _group_size(i, devices))
            size = nbytes(_operand_shape(comp, i.operands[0])) if base == "reduce-scatter" else nbytes(i.shape)
            p.collectives[key] = p.collectives.get(key, 0.0) + weight * size
            return
        fused = comps.get(i.attr("calls") or "") if i.op == "fusion" else None
        # A Pallas call is launched by itself, or (JAX 0.12) inside a fusion that hands it slices.
        calls = [(comp, i)] if _is_pallas(i) else (_inside(comps, fused, _is_pallas) if fused else [])
        for c, call in calls:
            q = arrays(_operand_shape(c, call.operands[0]))
            kv = arrays(_operand_shape(c, call.operands[1])) if len(call.operands) > 1 else q
            key = (_kernel_name(call), tuple(q[0][1]) if q else (), tuple(kv[0][1]) if kv else ())
            p.attention[key] = p.attention.get(key, 0.0) + weight
        if calls:
            return
        moved = sum(
            _read_bytes(fused, n, nbytes(_operand_shape(comp, o))) if fused else nbytes(_operand_shape(comp, o))
            for n, o in enumerate(i.operands)
        ) + (_written_bytes(fused, fused.root) if fused else _written_bytes(comp, i))
        if i.op == "dynamic-update-slice":
            moved = 2 * _written_bytes(comp, i)
        elif i.op in ("dynamic-slice", "slice"):
            moved = 2 * nbytes(i.shape)
        dots = _inside(comps, fused, _is_gemm) if fused else ([(comp, i)] if _is_gemm(i) else [])
        if dots:
            for c, d in dots:
                key = _gemm_key(c, d)
                g = p.gemms.setdefault(key, {"count": 0.0, "bytes": 0.0})
                g["count"] += weight
                g["bytes"] += weight * moved / len(dots)
            return
        p.memory_bytes += weight * moved
        p.memory_launches += weight

    visit(comps[entry], 1.0)
    return p

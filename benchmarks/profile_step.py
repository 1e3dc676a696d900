"""Where the train step's time goes: a jax.profiler trace of the compiled step, summed per
source function of the engine.

  python benchmarks/profile_step.py --dims 192,16,6,768 --seq 256 --batch 8 [--dtype float32]
      [--set KEY=VALUE ...] [--steps 3] [--top 12] [--trace-dir DIR]

The step is the one `torch_step.py` times. Each XLA operation in the trace (CPU: one event per
executed HLO instruction, on XLA's worker threads) is charged its self time (minus operations
nested in it, e.g. a loop's body) and attributed, through the compiled module's stack-frame
table, to the innermost function of this repository that emitted it (`model.SwiGLU.__call__`,
`blocked_attention._backward`, ...), split into forward and backward (an operation born of
autodiff's transpose is backward). Times are thread-milliseconds per step: two busy workers
count twice the wall time. Keep the trace with --trace-dir (TensorBoard's profile plugin or
Perfetto read it).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from benchmarks.torch_step import add_step_arguments, jax_step, parse_dims  # noqa: E402
from genesis_jax.config.ranges import COUNT, flag
from genesis_jax.core.cli import ArgumentParser, run_cli

OURS = ("genesis_jax/", "kernels/")
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = .*?metadata=\{([^}]*)\}", re.M)
_TABLE = re.compile(r"^(\d+) (.*)$")


def _tables(hlo: str) -> dict[str, dict[int, str]]:
    """The module's FileNames, FunctionNames, FileLocations and StackFrames sections."""
    tables: dict[str, dict[int, str]] = {}
    current = None
    for line in hlo.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = tables.setdefault(line, {})
        elif current is not None and (m := _TABLE.match(line)):
            current[int(m.group(1))] = m.group(2).strip('"')
        elif current is not None and line.strip():
            current = None
    return tables


def _field(text: str, key: str) -> int:
    return int(re.search(rf"\b{key}=(\d+)", text).group(1))


def attribution(hlo: str) -> dict[str, tuple[str, bool]]:
    """HLO instruction name -> (innermost function of ours that emitted it, is backward)."""
    t = _tables(hlo)
    files, funcs = t.get("FileNames", {}), t.get("FunctionNames", {})
    locs, frames = t.get("FileLocations", {}), t.get("StackFrames", {})
    cache: dict[int, str] = {}

    def ours(frame: int) -> str:
        if frame not in cache:
            seen, fid, name = set(), frame, "(jax internals)"
            while fid in frames and fid not in seen:
                seen.add(fid)
                loc = locs[_field(frames[fid], "file_location_id")]
                path = files.get(_field(loc, "file_name_id"), "")
                hit = next((p for p in OURS if p in path), None)
                if hit:
                    module = path[path.index(hit) :].removesuffix(".py").replace("/", ".").split(".", 1)[1]
                    name = f"{module}.{funcs.get(_field(loc, 'function_name_id'), '?')}"
                    break
                fid = _field(frames[fid], "parent_frame_id")
            cache[frame] = name
        return cache[frame]

    out = {}
    for m in _INSTR.finditer(hlo):
        meta = m.group(2)
        frame = re.search(r"stack_frame_id=(\d+)", meta)
        op = re.search(r'op_name="([^"]*)"', meta)
        out[m.group(1)] = (
            ours(int(frame.group(1))) if frame else "(no source)",
            bool(op and "transpose(" in op.group(1)),
        )
    return out


def self_times(trace: list[dict[str, Any]]) -> collections.Counter[str]:
    """Microseconds per event name, each event less the events nested inside it on its thread."""
    by_thread: dict[Any, list[dict[str, Any]]] = collections.defaultdict(list)
    for e in trace:
        if e.get("ph") == "X":
            by_thread[e["tid"]].append(e)
    total: collections.Counter[str] = collections.Counter()
    for events in by_thread.values():
        events.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[tuple[dict[str, Any], float]] = []  # (event, its end)
        for e in events:
            while stack and e["ts"] >= stack[-1][1]:
                stack.pop()
            if stack:
                total[stack[-1][0]["name"]] -= e["dur"]
            total[e["name"]] += e["dur"]
            stack.append((e, e["ts"] + e["dur"]))
    return total


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(ap)
    ap.add_argument("--steps", type=flag(COUNT), default=3, help="steps traced")
    ap.add_argument("--top", type=flag(COUNT), default=12, help="rows of the per-function table")
    ap.add_argument("--trace-dir", type=Path, help="keep the trace here (default: a temporary folder)")
    args = ap.parse_args(argv)
    dims = parse_dims(args.dims)
    if dims is None:
        return 2
    step, compiled = jax_step(args, dims)
    names = attribution(compiled.as_text())
    step(0)
    step(1)
    trace_dir = args.trace_dir or Path(tempfile.mkdtemp(prefix="genesis_jax_profile_"))
    t0 = time.perf_counter()
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        for i in range(args.steps):
            step(2 + i)
    wall = (time.perf_counter() - t0) / args.steps
    found = sorted(trace_dir.rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not found:
        print(f"error: the profiler wrote no trace under {trace_dir}", file=sys.stderr)
        return 1
    data = json.load(gzip.open(found[-1]))
    times = self_times(data["traceEvents"] if isinstance(data, dict) else data)
    per_fn: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for name, us in times.items():
        if name in names:
            fn, backward = names[name]
            per_fn[fn][backward] += us / 1000 / args.steps
    total = sum(sum(v) for v in per_fn.values())
    print(
        f"# dims {args.dims}, seq {args.seq}, batch {args.batch}, {args.dtype}; jax {jax.__version__} on "
        f"{jax.devices()[0].device_kind}; {args.steps} steps traced in {trace_dir}"
    )
    print(f"# wall {1000 * wall:.1f} ms per step (traced); XLA operations {total:.1f} thread-ms per step")
    print(f"{'function':<44} {'forward':>9} {'backward':>9} {'total':>9} {'share':>6}")
    rows = sorted(per_fn.items(), key=lambda kv: -sum(kv[1]))
    shown, rest = rows[: args.top], rows[args.top :]
    if rest:
        shown.append((f"({len(rest)} others)", [sum(v[0] for _, v in rest), sum(v[1] for _, v in rest)]))
    for fn, (fwd, bwd) in shown:
        print(f"{fn:<44} {fwd:9.1f} {bwd:9.1f} {fwd + bwd:9.1f} {100 * (fwd + bwd) / total:5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli("benchmarks/profile_step.py", main, devices=True))  # mistakes and faults in one line

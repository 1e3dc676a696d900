"""The tables `plan` prints: memory per device against the target's, and each kernel's registers,
spills and shared memory, with the failures that make the plan exit non-zero."""

from __future__ import annotations

import argparse
from typing import Any

from . import speed, target as targets
from .compile import Compiled, JobResult
from .rates import Rates
from .speed import Prediction, device_for, predict

MIB = 2**20


def kernel_table(kernels: list[dict[str, Any]]) -> list[str]:
    def show(v: Any) -> str:
        return "?" if v is None else str(v)

    w = max([24, *(len(k["name"]) for k in kernels)])
    lines = [
        f"  {'kernel':<{w}} {'registers':>9} {'spill st/ld B':>14} {'stack B':>8} {'shared KiB':>10} "
        f"{'threads':>7} {'blocks/SM':>9}"
    ]
    for k in kernels:
        shared = "?" if k["shared_memory"] is None else f"{k['shared_memory'] / 1024:.1f}"
        spill = f"{show(k['spill_stores'])}/{show(k['spill_loads'])}"
        lines.append(
            f"  {k['name']:<{w}} {show(k['registers']):>9} {spill:>14} {show(k['stack']):>8} {shared:>10} "
            f"{show(k['threads']):>7} {show(k['blocks_per_sm']):>9}"
        )
    return lines


def memory_lines(r: JobResult, c: Compiled) -> tuple[list[str], list[str]]:
    """The memory table with the largest temporaries, and the failure if it does not fit."""
    info = r.info
    rows, peak = r.memory_rows()
    lines = [f"{'memory per device':<62} {'MiB':>10}"] + [f"  {label:<60} {b / MIB:>10,.1f}" for label, b in rows]
    fits = peak <= c.memory_limit
    frac = (
        ""
        if c.target is None
        else (
            f" ({targets.memory_fraction():.0%} of {c.target.memory_bytes / MIB:,.0f} MiB, "
            "XLA_PYTHON_CLIENT_MEM_FRACTION)"
        )
    )
    lines.append(
        f"  peak {peak / MIB:,.1f} MiB of {c.memory_limit / MIB:,.1f} MiB usable{frac}: "
        f"{'fits' if fits else 'DOES NOT FIT'}"
    )
    lines.append("largest temporaries of the train step (MiB each x count, shape, operation):")
    per_layer = False
    activations = f"[{info['n_layers']},{info['rows_per_device']},"  # per layer, per sequence
    for v in r.programs[0]["largest"]:
        layered = activations in v["shape"]
        per_layer |= layered
        lines.append(
            f"  {v['bytes'] / MIB:>10,.1f} x {v['count']:<3} {v['shape']:<26} "
            + ("activations of every layer, kept for the backward pass" if layered else v["op"])
        )
    if per_layer and not info["remat"]:
        lines.append("  (model.remat = true recomputes each block in the backward pass instead of keeping these)")
    failures = [] if fits else [f"needs {peak / MIB:,.0f} MiB per device, {c.memory_limit / MIB:,.0f} MiB usable"]
    return lines, failures


def kernel_lines(r: JobResult) -> tuple[list[str], list[str]]:
    """The Pallas kernels' resources, and the failure if any spills."""
    kernels = r.kernels()
    if not kernels:
        return [f"no Pallas kernels (attention {r.info['attention']})"], []
    lines = ["Pallas kernels (per thread: registers, spill bytes, stack; per block: shared memory, threads):"]
    lines += kernel_table(kernels)
    unknown = [k["name"] for k in kernels if k["registers"] is None]
    if unknown:
        lines.append(f"  (no ptxas report for {', '.join(unknown)}: their registers and spills are unknown)")
    spilling = [k["name"] for k in kernels if k["spill_stores"] or k["spill_loads"]]
    return lines, [f"kernels spill registers: {', '.join(spilling)}"] if spilling else []


def speed_lines(r: JobResult, c: Compiled, rates: Rates) -> tuple[list[str], Prediction | None]:
    """The predicted speed (speed.py) on the target, where its rates are known."""
    device = device_for(c.target, c.device_kind)
    if device is None:
        return [
            f"speed: not predicted (no rates for {c.device_kind}; shipped: {', '.join(targets.names()[:-1])})"
        ], None
    p = predict(r.programs, r.info, device, rates)
    return speed.lines(p, device, rates), p


def report(
    args: argparse.Namespace, c: Compiled, n_devices: int, rates: Rates
) -> tuple[list[str], list[str], Prediction | None]:
    """The printed plan, the reasons it fails (empty: exit 0) and the speed prediction."""
    r = c.results[0]
    where = c.device_kind + (
        f" (sm_{c.target.compute_capability.replace('.', '')}a, {c.target.sm_count} SMs)"
        if c.target
        else " (this machine)"
    )
    lines = [f"plan: {args.config} for {n_devices} x {where}, target {args.target}"]
    if not r.ok:
        return lines + [f"compile failed: {r.error}"], [f"the compile failed: {r.error}"], None
    info = r.info
    lines += [
        f"model {info['model']}: {info['n_parameters']:,} parameters, attention {info['attention']}",
        f"batch {info['batch']}; mesh {' x '.join(f'{k} {v}' for k, v in info['mesh'].items())}",
        "",
    ]
    memory, memory_failures = memory_lines(r, c)
    kernel, kernel_failures = kernel_lines(r)
    lines += memory + ["compile: " + ", ".join(f"{p['name']} {p['compile_s']:.1f} s" for p in r.programs), ""] + kernel
    fast, prediction = speed_lines(r, c, rates)
    return lines + [""] + fast, memory_failures + kernel_failures, prediction

"""Step time, tokens/s, MFU and the run's wall time on a GPU, predicted from the compiled programs'
launches (hlo.py) and the rates (rates.py). One stream, no overlap: each part's time is added,
and the host's work per step hides behind the device's unless it is longer.

  GEMMs        each GEMM's FLOPs at the dense peak for its dtype x gemm_efficiency x the share of
               SMs its tiles keep busy (waves), or its bytes at HBM speed when that is longer
  attention    each kernel call's executed matmul FLOPs at the rate for its backend, direction,
               head_dim and length (rates.attention_rate: FA3's anchors x our kernels' fraction,
               capped by the exponential unit, or what a GPU measured)
  memory       the bytes the other kernels read and write, at HBM bandwidth x hbm_efficiency
  collectives  bytes each device sends (ring all-reduce: 2(n-1)/n of the buffer) at NVLink speed
  launches     kernel_gap_s between consecutive kernels
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from .rates import ANCHOR_FLOOR, MFU_BAND, PEAK_BY_DTYPE, Rates, attention_rate
from .target import Target, for_device_kind

# Matmuls per score element of each of our attention kernels (their names end in these): the
# forward does QK^T and PV; the backward's dq kernel recomputes QK^T, then dP = dO V^T and
# dQ = dS K; its dkv kernel recomputes QK^T and dP and computes dV = P^T dO and dK = dS^T Q.
KERNEL_MATMULS = {"fwd": 2, "dq": 3, "dkv": 4, "dkdv": 4}
COLLECTIVE_SHARE = {  # bytes each device sends, as a share of the buffer, in a ring of n
    "all-reduce": lambda n: 2 * (n - 1) / n,
    "all-gather": lambda n: (n - 1) / n,
    "reduce-scatter": lambda n: (n - 1) / n,
    "all-to-all": lambda n: (n - 1) / n,
    "collective-permute": lambda n: 1.0,
}


@dataclass
class Device:
    """The target as the speed model sees it."""

    name: str
    sm_count: int
    hbm_bytes_per_s: float


def device_for(target: Target | None, kind: str) -> Device | None:
    """The compile's target as the speed model sees it (a local GPU by its shipped spec), or None
    where no spec gives its rates."""
    spec = target or for_device_kind(kind)
    return Device(spec.description, spec.sm_count, spec.memory_bandwidth) if spec else None


@dataclass
class ProgramTime:
    gemm_s: float
    gemm_flops: float
    attention_s: float
    attention_flops: float
    memory_s: float
    memory_bytes: float
    collective_s: float
    launch_s: float
    launches: float

    @property
    def device_s(self) -> float:
        return self.gemm_s + self.attention_s + self.memory_s + self.collective_s + self.launch_s


def wave_share(batch: int, m: int, n: int, k: int, sms: int, tile: int, split_k_tiles: int = 4) -> float:
    """The share of the SMs a GEMM's output tiles keep busy over its waves. A GEMM with fewer
    tiles than SMs splits K across them (split-K) when K is deep enough (split_k_tiles tiles'
    depth per split)."""
    tiles = batch * math.ceil(m / tile) * math.ceil(n / tile)
    if tiles < sms:
        tiles *= max(1, min(math.ceil(sms / tiles), k // (split_k_tiles * tile)))
    waves = math.ceil(tiles / sms)
    return tiles / (waves * sms)


def kernel_matmuls(name: str) -> int | None:
    part = name.rsplit("_", 1)[-1]
    return KERNEL_MATMULS.get(part)


def program_time(profile: dict[str, Any], backend: str, device: Device, rates: Rates) -> ProgramTime:
    gemm_s = gemm_flops = 0.0
    for g in profile["gemms"]:
        flops = 2.0 * g["batch"] * g["m"] * g["n"] * g["k"]
        peak = PEAK_BY_DTYPE.get(g["dtype"], PEAK_BY_DTYPE["f32"])
        share = wave_share(g["batch"], g["m"], g["n"], g["k"], device.sm_count, rates.gemm_tile, rates.split_k_tiles)
        compute = flops / (peak * rates.gemm_efficiency * share)
        per_call_bytes = g["bytes"] / g["count"] if g["count"] else 0.0
        memory = per_call_bytes / (device.hbm_bytes_per_s * rates.hbm_efficiency)
        gemm_s += g["count"] * max(compute, memory)
        gemm_flops += g["count"] * flops
    attention_s = attention_flops = 0.0
    for a in profile["attention"]:
        matmuls = kernel_matmuls(a["kernel"])
        if matmuls is None or len(a["q"]) != 4 or len(a["k"]) != 4:
            raise ValueError(f"a Pallas kernel plan cannot time: {a['kernel']} (q {a['q']}, k {a['k']})")
        b, sq, hq, d = a["q"]
        skv = a["k"][1]
        scores = b * hq * sq * skv * 0.5  # causal: half the score matrix
        flops = 2.0 * d * matmuls * scores
        direction = "forward" if matmuls == 2 else "backward"
        rate = attention_rate(backend, direction, d, sq, matmuls, rates)
        attention_s += a["count"] * flops / rate
        attention_flops += a["count"] * flops
    collective_s = sum(
        c["bytes"] * COLLECTIVE_SHARE[c["op"]](c["group"]) / rates.nvlink_bytes_per_s
        for c in profile["collectives"]
        if c["group"] > 1
    )
    return ProgramTime(
        gemm_s,
        gemm_flops,
        attention_s,
        attention_flops,
        profile["memory_bytes"] / (device.hbm_bytes_per_s * rates.hbm_efficiency),
        profile["memory_bytes"],
        collective_s,
        profile["launches"] * rates.kernel_gap_s,
        profile["launches"],
    )


@dataclass
class Prediction:
    train: ProgramTime
    validation: ProgramTime
    step_s: float
    host_bound: bool
    tokens_per_step: int
    tokens_per_s: float
    mfu: float
    model_flops_per_step: float
    validations: int
    validation_calls: int
    run_s: float
    max_steps: int
    in_band: bool
    unknown_trips: int  # loops of the train step without a known trip count, counted once

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["train"]["device_s"] = self.train.device_s
        out["validation"]["device_s"] = self.validation.device_s
        out["mfu_band"] = list(MFU_BAND)
        return out


def predict(programs: list[dict[str, Any]], info: dict[str, Any], device: Device, rates: Rates) -> Prediction:
    """The prediction for a train job (compile.JobResult's programs and info)."""
    backend = info["attention"]
    train = program_time(programs[0]["profile"], backend, device, rates)
    val = program_time(programs[1]["profile"], backend, device, rates)
    step_s = max(train.device_s, rates.host_step_s)
    tokens = info["tokens_per_step"]
    model_flops = info["model_flops_per_token"] * tokens
    mfu = model_flops / (step_s * PEAK_BY_DTYPE["bf16"] * info["devices"])
    validations = info["max_steps"] // info["val_interval"] if info["val_interval"] else 0
    calls = math.ceil(info["val_windows"] / info["batch_size"])
    run_s = info["max_steps"] * step_s + validations * calls * max(val.device_s, rates.host_step_s)
    return Prediction(
        train,
        val,
        step_s,
        rates.host_step_s > train.device_s,
        tokens,
        tokens / step_s,
        mfu,
        model_flops,
        validations,
        calls,
        run_s,
        info["max_steps"],
        MFU_BAND[0] <= mfu <= MFU_BAND[1],
        programs[0]["profile"]["unknown_trips"],
    )


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def lines(p: Prediction, device: Device, rates: Rates) -> list[str]:
    """The speed table `plan` prints: the prediction, the parts that made it, the rates used."""
    t = p.train
    ms = 1e3

    def row(label: str, seconds: float, what: str) -> str:
        share = seconds / t.device_s if t.device_s else 0.0
        return f"  {label:<13} {seconds * ms:>9.2f} ms {share:>5.0%}  {what}"

    lo, hi = MFU_BAND
    verdict = "inside" if p.in_band else ("below" if p.mfu < lo else "above")
    out = [
        f"speed on {device.name} (predicted; {'calibrated' if rates.source else 'uncalibrated constants'}):",
        f"  step {p.step_s * ms:,.2f} ms, {p.tokens_per_s:,.0f} tokens/s, MFU {p.mfu:.1%} "
        f"({verdict} the {lo:.0%}-{hi:.0%} band small models reach on H100)",
        f"  run: {p.max_steps:,} steps {duration(p.max_steps * p.step_s)}"
        + (
            f" + {p.validations} validations of {p.validation_calls} calls {duration(p.run_s - p.max_steps * p.step_s)}"
            if p.validations
            else ""
        )
        + f" = {duration(p.run_s)} (checkpoints, evaluations and compiles not counted)",
        "train step, per device:",
        row("GEMMs", t.gemm_s, f"{t.gemm_flops / 1e12:,.2f} TFLOP at their shapes' rates"),
        row("attention", t.attention_s, f"{t.attention_flops / 1e12:,.2f} TFLOP executed in our kernels"),
        row("memory-bound", t.memory_s, f"{t.memory_bytes / 1e9:,.1f} GB read and written by the other kernels"),
        row("collectives", t.collective_s, "bytes between devices at NVLink speed"),
        row("launch gaps", t.launch_s, f"{t.launches:,.0f} kernel launches"),
        f"  {'device total':<13} {t.device_s * ms:>9.2f} ms        host loop {rates.host_step_s * ms:.2f} ms a step "
        + ("(the host is slower: it sets the pace)" if p.host_bound else "(hidden behind the device)"),
        f"  model FLOPs {p.model_flops_per_step / 1e12:,.2f} TFLOP a step (6 x parameters + attention; "
        f"executed {(t.gemm_flops + t.attention_flops) / 1e12:,.2f}, remat and recomputation included)",
        *(
            [f"  ({p.unknown_trips} loops without a known trip count were counted once: the step takes longer)"]
            if p.unknown_trips
            else []
        ),
        "rates used:",
        f"  gemm_efficiency {rates.gemm_efficiency:.2f} of the dense peak (bf16 {PEAK_BY_DTYPE['bf16'] / 1e12:.0f}, "
        f"TF32 {PEAK_BY_DTYPE['f32'] / 1e12:.0f} TFLOP/s), tiles {rates.gemm_tile}x{rates.gemm_tile}, "
        f"split-K from {rates.split_k_tiles} tiles deep "
        f"[{rates.describe('gemm_efficiency')}]",
        f"  HBM {device.hbm_bytes_per_s / 1e12:.2f} TB/s x hbm_efficiency {rates.hbm_efficiency:.2f} "
        f"[{rates.describe('hbm_efficiency')}]",
        f"  attention: FA3 anchors x {rates.attention_fraction['forward']:.2f} forward, "
        f"{rates.attention_fraction['backward']:.2f} backward, exp unit {rates.exp_per_s / 1e12:.1f} T/s, "
        f"floor {ANCHOR_FLOOR:.0%} of the shortest anchor "
        f"[{rates.describe('attention_fraction')}]"
        + (f"; {len(rates.attention_measured)} measured rates" if rates.attention_measured else ""),
        f"  kernel_gap_s {rates.kernel_gap_s * 1e6:.1f} us [{rates.describe('kernel_gap_s')}], host_step_s "
        f"{rates.host_step_s * ms:.2f} ms [{rates.describe('host_step_s')}], NVLink "
        f"{rates.nvlink_bytes_per_s / 1e9:.0f} GB/s a direction",
    ]
    return out

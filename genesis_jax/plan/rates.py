"""The rates `plan` predicts speed with: every one a named constant with its source, and the
calibration file (written by benchmarks/calibrate.py on a GPU) that replaces those it measured.

Uncalibrated, the constants are published figures for H100/H200 and our own CPU measurements;
docs/plan.md lists them with what each one moves."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..core.errors import UserError

# Dense tensor-core peaks by operand dtype, FLOP/s: NVIDIA H100 SXM5 datasheet (bf16/fp16 989.4
# TFLOP/s dense, TF32 494.7, FP8 1979); the H200 has the same compute (H200 datasheet).
PEAK_BY_DTYPE = {"bf16": 989.4e12, "f16": 989.4e12, "f32": 494.7e12, "f8e4m3fn": 1978.9e12, "f8e5m2": 1978.9e12}
# NVLink 4 on H100/H200 SXM: 900 GB/s per GPU in both directions together (datasheets).
NVLINK_BYTES_PER_S = 450e9
# FlashAttention-3 on H100 SXM5, head_dim 128, bf16, 16k tokens per call, by sequence length:
# forward from the pytorch/benchmark FA3 rows (pull request 2391: 430 TFLOP/s at 512 tokens to
# 621 at 16k), backward from the FA3 paper (Shah et al. 2024, arXiv:2407.08608, figure 6: 316 at
# 512 to 561 at 16k). Between the points: linear in log2(length); beyond them: the last value,
# and below 512 the first segment's slope, floored at a quarter of the first value.
ANCHOR_FLOOR = 0.25  # below 512 tokens the rate falls with the first segment's slope to this share of it
FA3_FORWARD = {512: 430e12, 1024: 517e12, 2048: 566e12, 4096: 590e12, 8192: 614e12, 16384: 621e12}
FA3_BACKWARD = {512: 316e12, 1024: 424e12, 2048: 501e12, 4096: 542e12, 8192: 559e12, 16384: 561e12}
# The exponential unit: 3.9 TFLOP/s of special functions on H100 SXM5 (FlashAttention-3 paper,
# section 3.1). One exp per score, so a kernel doing `matmuls` matmuls of head_dim D per score
# is capped at exp_rate * 2 * D * matmuls FLOP/s: 374 TFLOP/s forward at head_dim 24, 499 at 32.
EXP_PER_S = 3.9e12
# Our kernels against FlashAttention-3: JAX's Mosaic GPU flash-attention example reports about
# 406 TFLOP/s forward at head_dim 128 on H100 (jax/experimental/pallas/ops/gpu/attention_mgpu.py's
# benchmark), about two thirds of FA3 at the same lengths (406 / 614). Used for both our kernels
# and both directions until a GPU measures them (benchmarks/attention.py through the GPU suite).
KERNEL_FRACTION = 406.0 / 614.0
# Small models in practice: MosaicML's 760M model at about 34-35% MFU on H100 (llm-foundry's
# throughput table); modded-nanogpt's 124M GPT-2 runs at a similar share. The band `plan`
# compares its MFU with, for models under a billion parameters.
MFU_BAND = (0.20, 0.45)


@dataclass(frozen=True)
class Rates:
    """What speed.py needs of a GPU and its software. `source` says where each value came from."""

    gemm_efficiency: float = 0.70  # share of the dense peak a large GEMM reaches (cuBLAS on H100: 650-750 of 989)
    gemm_tile: int = 128  # output tile edge of a GEMM's blocks (128x128: cuBLAS's and Triton's usual Hopper tile)
    split_k_tiles: int = 4  # a GEMM with fewer tiles than SMs splits K in parts of at least this many tiles' depth
    hbm_efficiency: float = (
        0.85  # share of HBM bandwidth a streaming kernel reaches (H100 STREAM copy ~2.9 of 3.35 TB/s)
    )
    kernel_gap_s: float = 2.0e-6  # idle time between two kernels of one stream (launch latency, a few us)
    host_step_s: float = 4.1e-4  # the training loop's host work per step (measured on CPU, docs/plan.md)
    exp_per_s: float = EXP_PER_S
    nvlink_bytes_per_s: float = NVLINK_BYTES_PER_S
    attention_fraction: dict[str, float] = field(
        default_factory=lambda: {"forward": KERNEL_FRACTION, "backward": KERNEL_FRACTION}
    )
    # measured attention rates: {"<backend>/<direction>/<head_dim>/<seq>": FLOP/s}
    attention_measured: dict[str, float] = field(default_factory=dict)
    source: dict[str, str] = field(default_factory=dict)  # constant -> "calibrated: FILE (device)"

    def describe(self, name: str) -> str:
        return self.source.get(name, "uncalibrated")


CALIBRATED = (
    "gemm_efficiency",
    "hbm_efficiency",
    "kernel_gap_s",
    "host_step_s",
    "attention_fraction",
    "attention_measured",
)


def anchor(table: dict[int, float], seq: int) -> float:
    """FA3's rate at `seq` tokens from a table of (length, rate) points (see FA3_FORWARD)."""
    points = sorted(table.items())
    if seq >= points[-1][0]:
        return points[-1][1]
    i = max(1, next(n for n, (s, _) in enumerate(points) if s > seq))
    (s0, r0), (s1, r1) = points[i - 1], points[i]
    rate = r0 + (r1 - r0) * math.log2(max(seq, 1) / s0) / math.log2(s1 / s0)
    return max(rate, points[0][1] * ANCHOR_FLOOR)


def exp_cap(head_dim: int, matmuls: int, rates: Rates) -> float:
    return rates.exp_per_s * 2 * head_dim * matmuls


def attention_rate(backend: str, direction: str, head_dim: int, seq: int, matmuls: int, rates: Rates) -> float:
    """FLOP/s of one of our attention kernels: a rate the GPU suite measured at this backend,
    direction and head_dim (nearest length within 2x), else FA3's anchor times our kernels'
    fraction, capped by the exponential unit."""
    near = [
        (abs(math.log2(int(s) / seq)), r)
        for key, r in rates.attention_measured.items()
        for b, d, h, s in [key.split("/")]
        if b == backend and d == direction and int(h) == head_dim and abs(math.log2(int(s) / seq)) <= 1
    ]
    if near:
        return min(near)[1]
    table = FA3_FORWARD if direction == "forward" else FA3_BACKWARD
    return min(anchor(table, seq) * rates.attention_fraction[direction], exp_cap(head_dim, matmuls, rates))


def load_calibration(path: Path) -> tuple[Rates, dict[str, Any]]:
    """Rates with a calibration file's values in place of the constants it measured, and the
    file's `measured` section (step times beside predictions). UserError in one line for a file
    that is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"--calibration {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"--calibration {path}: not a calibration file ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("rates"), dict):
        raise UserError(f"--calibration {path}: expected a JSON object with a 'rates' object (benchmarks/calibrate.py)")
    known = {f.name: f for f in fields(Rates)}
    values: dict[str, Any] = {}
    for name, value in data["rates"].items():
        if name not in CALIBRATED:
            raise UserError(
                f"--calibration {path}: rates.{name}: not a calibrated rate; known: {', '.join(CALIBRATED)}"
            )
        ok = (
            isinstance(value, dict) and all(isinstance(v, (int, float)) and v > 0 for v in value.values())
            if known[name].type.startswith("dict")
            else isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
        )
        if not ok:
            raise UserError(f"--calibration {path}: rates.{name} = {value!r}: expected positive numbers")
        values[name] = {k: float(v) for k, v in value.items()} if isinstance(value, dict) else float(value)
    where = f"calibrated: {path.name} ({data.get('device', 'unknown device')})"
    base = Rates()
    if "attention_fraction" in values:
        values["attention_fraction"] = {**base.attention_fraction, **values["attention_fraction"]}
    return replace(base, **values, source={k: where for k in values}), data.get("measured", {})

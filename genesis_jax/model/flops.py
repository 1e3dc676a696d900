"""Model FLOPs per token and device peak rates, for tokens/s -> MFU."""

from __future__ import annotations

import jax

from ..config.schema import ModelSpec
from ..core.tokenizer import VOCAB_SIZE

# Dense bf16 matmul peaks (TFLOP/s) from vendor data sheets, by jax `device_kind` substring.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "A10G": 70.0}


def train_flops_per_token(m: ModelSpec, seq_len: int) -> float:
    """6 x matmul parameters (forward + backward) plus causal attention (half the square)."""
    head_dim = m.head_dim
    per_layer = m.dim * m.dim * 2 + 2 * m.dim * m.n_kv_heads * head_dim + 3 * m.dim * m.intermediate_size
    matmul_params = m.n_layers * per_layer + VOCAB_SIZE * m.dim
    attention = m.n_layers * 2 * 2 * seq_len * m.dim * 0.5  # QK^T and PV, causal half, per token forward
    return 6.0 * matmul_params + 3.0 * attention


def peak_flops(device: jax.Device | None = None) -> float | None:
    """Peak bf16 FLOP/s of the device, or None where unknown (CPUs)."""
    d = device or jax.devices()[0]
    if d.platform != "gpu":
        return None
    for name, tflops in PEAK_BF16_TFLOPS.items():
        if name in d.device_kind:
            return tflops * 1e12
    return None

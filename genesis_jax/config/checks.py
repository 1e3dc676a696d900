"""Refusing impossible configurations, naming the key: run once, when a config is loaded.

The backend named by `model.attention` is checked where backends live (model/attention.py),
so loading a config imports no kernel.
"""

from __future__ import annotations

from ..core.errors import ConfigError
from .schema import Config, ModelSpec


def validate(cfg: Config) -> None:
    """Refuse impossible combinations, naming the key (each key's own range is in its annotation)."""
    m = cfg.model
    if m.dim % m.n_heads:
        raise ConfigError(f"model.n_heads = {m.n_heads} does not divide model.dim = {m.dim}")
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_kv_heads = {m.n_kv_heads} does not divide model.n_heads = {m.n_heads}")
    if (m.dim // m.n_heads) % 2:
        raise ConfigError(f"model.dim / model.n_heads = {m.dim // m.n_heads} must be even for rotary embeddings")
    k = cfg.curriculum
    if k.span_max_len < k.span_min_len:
        raise ConfigError(
            f"curriculum.span_max_len = {k.span_max_len} is below curriculum.span_min_len = {k.span_min_len}"
        )
    validate_parallel(cfg)
    mt = cfg.mtl
    if mt.lm_weight + mt.coherence_weight + mt.cross_ref_weight + mt.paraphrase_weight <= 0:
        raise ConfigError("mtl.*_weight: mixture weights must have a positive sum")


def validate_parallel(cfg: Config) -> None:
    """The mesh checks that need no device count (sharding.check_devices does the rest)."""
    p, m = cfg.parallel, cfg.model
    sizes = {"data": p.data, "fsdp": p.fsdp, "tensor": p.tensor}
    for axis, n in sizes.items():
        if n == 0:
            raise ConfigError(f"parallel.{axis} = {n}: must be positive, or -1 for the remaining devices")
    if list(sizes.values()).count(-1) > 1:
        raise ConfigError("parallel: at most one of data, fsdp and tensor may be -1")
    if p.tensor > 0:  # -1 is checked once the mesh resolves it
        check_tensor_split(p.tensor, m)


def check_tensor_split(tensor: int, m: ModelSpec) -> None:
    """Heads (query and KV) and the SwiGLU hidden dimension split evenly over `tensor` devices."""
    for key, value in (("model.n_kv_heads", m.n_kv_heads), ("model.intermediate_size", m.intermediate_size)):
        if value % tensor:
            raise ConfigError(f"parallel.tensor = {tensor} does not divide {key} = {value}")

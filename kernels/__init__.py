"""Attention kernels and their XLA references."""

from .reference import reference_attention

__all__ = ["reference_attention"]

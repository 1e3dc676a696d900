"""Attention kernels and their XLA references."""

from .flash_attention import BlockSizes, flash_attention
from .reference import reference_attention

__all__ = ["BlockSizes", "flash_attention", "reference_attention"]

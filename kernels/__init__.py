"""Attention kernels and their XLA references."""

from .blocked_attention import blocked_attention
from .flash_attention_mgpu import MosaicBlocks, flash_attention_mgpu
from .flash_attention import BlockSizes, flash_attention
from .platform import target_platform
from .reference import decode_attention, reference_attention

__all__ = ["BlockSizes", "blocked_attention", "decode_attention", "flash_attention", "flash_attention_mgpu", "MosaicBlocks", "reference_attention", "target_platform"]

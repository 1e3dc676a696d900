"""Attention kernels and their XLA references."""

import importlib
from typing import Any

from .blocked_attention import blocked_attention
from .flash_attention import BlockSizes, flash_attention
from .platform import target_platform
from .reference import decode_attention, reference_attention

__all__ = ["BlockSizes", "blocked_attention", "decode_attention", "flash_attention", "flash_attention_mgpu",
           "MosaicBlocks", "reference_attention", "target_platform"]
_MOSAIC = ("flash_attention_mgpu", "MosaicBlocks")


def __getattr__(name: str) -> Any:
    """The Mosaic GPU kernel loads on first use: importing Pallas Mosaic GPU adds about 0.5 s to
    every start, and only GPU runs and its tests need it."""
    if name not in _MOSAIC:
        raise AttributeError(f"module 'kernels' has no attribute {name!r}")
    module = importlib.import_module(".flash_attention_mgpu", __name__)
    globals().update({n: getattr(module, n) for n in _MOSAIC})  # replaces the submodule binding
    return globals()[name]

"""genesis-jax: a JAX/Flax training engine for deep byte-level Llama models."""

import importlib.abc as _abc
import importlib.machinery as _machinery
import os as _os
import sys as _sys
from collections.abc import Sequence as _Sequence
from types import ModuleType as _ModuleType

from .core.compat import module_available as _found

__version__ = "0.1.0"


class _CheckoutKernels(_abc.MetaPathFinder):
    """`genesis_jax.kernels` from a checkout's top-level kernels/ folder when nothing is installed
    (`PYTHONPATH=.`); an install maps the folder to that name itself. Asked last, so an install wins."""

    def __init__(self, root: str) -> None:
        self.root = root

    def find_spec(
        self, fullname: str, path: _Sequence[str] | None, target: _ModuleType | None = None
    ) -> _machinery.ModuleSpec | None:
        if fullname != f"{__name__}.kernels":
            return None
        return _machinery.PathFinder.find_spec(fullname, [self.root])


_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_checkout, "kernels", "flash_attention.py")):
    _sys.meta_path.append(_CheckoutKernels(_checkout))

# With the `plan` extra (JAX's CUDA compiler plugin, no CUDA libraries) on a machine without
# cuDNN, the plugin's version check would print a traceback at every JAX start before JAX
# falls back to the CPU. Without cuDNN there is nothing for the check to protect: skip it.
if (_found("jax_plugins.xla_cuda13") or _found("jax_plugins.xla_cuda12")) and not _found("nvidia.cudnn"):
    _os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

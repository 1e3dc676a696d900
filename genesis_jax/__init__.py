"""genesis-jax: a JAX/Flax training engine for deep byte-level Llama models."""

import importlib.util as _importlib_util
import os as _os

__version__ = "0.1.0"


def _found(module: str) -> bool:
    try:
        return _importlib_util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is absent
        return False


# With the `plan` extra (JAX's CUDA compiler plugin, no CUDA libraries) on a machine without
# cuDNN, the plugin's version check would print a traceback at every JAX start before JAX
# falls back to the CPU. Without cuDNN there is nothing for the check to protect: skip it.
if (_found("jax_plugins.xla_cuda13") or _found("jax_plugins.xla_cuda12")) and not _found("nvidia.cudnn"):
    _os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

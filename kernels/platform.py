"""Which platform a computation is being built for."""

from __future__ import annotations

import jax

GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def target_platform() -> str:
    """ "gpu", "cpu" or "tpu": the default device's platform when one is set (`jax.default_device`,
    as when compiling for a GPU that is absent), else JAX's default backend. Kernels use it to
    choose between compiling and Pallas interpret mode."""
    device = jax.config.jax_default_device
    if isinstance(device, jax.Device):
        return "gpu" if device.platform in GPU_PLATFORMS else device.platform
    return jax.default_backend()

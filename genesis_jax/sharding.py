"""Where arrays live on the devices: the mesh, and the shardings of batches and of the state.

Today one mesh axis, `data`: batches are split along it and the state is replicated. The mesh
axes and the rules that place each array belong here and nowhere else (docs/design.md,
"Sharding"), so that adding an axis changes this module, not its callers.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .config import Config
from .errors import ConfigError

DATA = "data"  # the batch axis


def make_mesh(n_devices: int | None = None) -> Mesh:
    """A 1-D mesh with a `data` axis over the devices."""
    n = n_devices or jax.device_count()
    return jax.make_mesh((n,), (DATA,), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (the state, the device corpus)."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, leading_axes: int = 0) -> NamedSharding:
    """The batch axis split over `data`, after `leading_axes` unsplit axes (micro-batches)."""
    return NamedSharding(mesh, P(*([None] * leading_axes), DATA))


def check_devices(cfg: Config, n_devices: int) -> None:
    """Checks that need the device count, made once the backend is known."""
    if cfg.training.batch_size % n_devices:
        raise ConfigError(
            f"training.batch_size = {cfg.training.batch_size} is not divisible by the device count {n_devices}")

"""The accelerator a command asked for must be there: one line naming what was asked and what
was found, instead of JAX's assertion or a backend's traceback at the first array."""

from __future__ import annotations

import os

from .errors import UserError


class PlatformError(UserError):
    """JAX_PLATFORMS (or jax_platforms) names a platform this machine cannot start."""


def require() -> None:
    """Start JAX's backends now (after jax.distributed, before any array), or say why not."""
    import jax

    try:
        jax.devices()
    except (RuntimeError, AssertionError) as e:
        asked = os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or "(default)"
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        why = (
            text.split("': ", 1)[1] if text.startswith("Unable to initialize backend") else "no such device is visible"
        )
        raise PlatformError(
            f"JAX_PLATFORMS={asked}: cannot start it on this machine ({why[:200]}); "
            "set JAX_PLATFORMS=cpu, or unset it to use the devices that are there"
        ) from None

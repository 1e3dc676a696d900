"""Compiling for a GPU that is absent: `python -m genesis_jax.plan` (docs/design.md, "Planning for a GPU")."""

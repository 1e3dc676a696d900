"""genesis-jax: a JAX/Flax training engine for deep byte-level Llama models."""

__version__ = "0.1.0"

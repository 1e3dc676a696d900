"""The Llama, its attention backends, task heads, losses, decoding, FLOP and memory counts."""

"""The evaluation suite: validation, masked reconstruction, cross-lingual alignment, and the metric registry."""

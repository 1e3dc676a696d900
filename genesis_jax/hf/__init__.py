"""Models in Hugging Face's layout: export to safetensors with a config and a byte tokenizer
transformers loads, and the way back for `train --init-from` (docs/design.md, "Hugging Face")."""

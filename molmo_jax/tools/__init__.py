"""Command-line tools: logits (check a converted checkpoint), aot (compile for a TPU topology)."""

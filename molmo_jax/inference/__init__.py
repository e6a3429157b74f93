"""Inference: KV-cache generation, the predict command and drawing points on images."""

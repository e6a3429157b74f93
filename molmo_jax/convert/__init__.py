"""Checkpoint conversion: official HF Molmo layout, HF backbones, mixture-of-experts layouts."""

"""Inference: KV-cache generation, the predictor behind `python -m molmo_jax.predict`, points drawn on images."""

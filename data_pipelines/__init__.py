"""Data pipelines of molmo-jax: numpy (+ grain) only, never JAX; runs in data-loader workers."""

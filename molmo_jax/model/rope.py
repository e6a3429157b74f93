"""RoPE frequency tables: the plain table and the scaled ones of long-context checkpoints,
per layer (Molmo2-O-7B scales only the layers `rope_scaling_layers` names).

    inv_freq, scale = rope_tables(llm_config)   # float32[layers, H/2], float32[layers]

`apply_rope` (layers.py) multiplies cos/sin by `scale`, as transformers does with its
`attention_scaling`. The formulas follow transformers' `modeling_rope_utils` (the checkpoints'
reference): "linear" divides every frequency by `factor`; "yarn" interpolates the low
frequencies, keeps the high ones, ramps between (beta_fast / beta_slow rotations) and scales
cos/sin by `attention_factor` (default 0.1 ln(factor) + 1).

Axis legend: L layers, H head dim.
"""
from __future__ import annotations

import math
from typing import Tuple

import jax
import jax.numpy as jnp

from molmo_jax.model.config import RopeScaling

def rope_inv_freq(theta: float, head_dim: int) -> jax.Array:
    """The unscaled inverse frequencies 1 / theta^(2i/H): float32[H/2]."""
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def scaled_inv_freq(theta: float, head_dim: int, s: RopeScaling) -> Tuple[jax.Array, float]:
    """(inverse frequencies float32[H/2], cos/sin scale) of one scaled layer."""
    plain = rope_inv_freq(theta, head_dim)
    if s.rope_type == "default":
        return plain, 1.0
    if s.rope_type == "linear":
        return plain / s.factor, 1.0
    attention = s.attention_factor
    if attention is None:
        attention = 1.0 if s.factor <= 1 else 0.1 * math.log(s.factor) + 1.0

    def correction_dim(rotations):
        return (head_dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi))
                / (2 * math.log(theta)))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as transformers: no zero-width ramp
    ramp = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # 1 keeps the original frequency (high frequencies)
    inv = (plain / s.factor) * (1 - extrapolation) + plain * extrapolation
    return inv, float(attention)


def rope_tables(config) -> Tuple[jax.Array, jax.Array]:
    """An LLMConfig -> (inv_freq float32[L, H/2], scale float32[L]): layers in
    `rope_scaling_layers` (all when None) use `rope_scaling`, the others the plain table."""
    plain = rope_inv_freq(config.rope_theta, config.head_dim)
    if config.rope_scaling is None:
        return jnp.broadcast_to(plain, (config.n_layers, plain.shape[0])), jnp.ones((config.n_layers,), jnp.float32)
    scaled, factor = scaled_inv_freq(config.rope_theta, config.head_dim, config.rope_scaling)
    layers = range(config.n_layers) if config.rope_scaling_layers is None else config.rope_scaling_layers
    is_scaled = jnp.zeros((config.n_layers,), bool).at[jnp.asarray(list(layers), jnp.int32)].set(True)
    inv = jnp.where(is_scaled[:, None], scaled[None], plain[None])
    return inv, jnp.where(is_scaled, jnp.float32(factor), jnp.float32(1.0))

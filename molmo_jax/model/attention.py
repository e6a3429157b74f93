"""One attention function, the ViT / pooling multi-head attention, and the LLM masks.

Axis legend: B batch, T query length, S key length, N query heads, K kv heads,
G = N // K query heads per kv head, H head dim, D width.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from molmo_jax.model.layers import Dense, Names

# Masked logits get the most negative float32 (as the official additive mask does) rather
# than -inf, so fully masked rows (padding queries) stay finite.
_MASK_VALUE = float(jnp.finfo(jnp.float32).min)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Optional[jax.Array] = None,
                          *, float32_logits: bool = False) -> jax.Array:
    """softmax(q k^T / sqrt(H) masked) v, with grouped kv heads.

    q: [B, T, N, H]; k, v: [B, S, K, H] with N % K == 0 (kv head j serves query heads
    j*G .. j*G+G-1, as `repeat_interleave` does); mask: bool[B, T, S] (True = attend) or None.
    The softmax always runs in float32; `float32_logits` also computes q.k in float32
    (the ViT and pooling do, spec §2.3). Returns [B, T, N, H] in v's dtype.
    """
    b, t, n, h = q.shape
    kv = k.shape[2]
    if n % kv:
        raise ValueError(f"{n} query heads cannot be grouped over {kv} kv heads")
    q = q.reshape(b, t, kv, n // kv, h)
    if float32_logits:
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    logits = jnp.einsum("btkgh,bskh->bkgts", q / jnp.sqrt(jnp.asarray(h, q.dtype)), k)
    logits = logits.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :, :], logits, _MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(b, t, n, h)


class MultiHeadAttention(nnx.Module):
    """Bidirectional MHA with biases on q, k, v, o (ViT blocks and the 2x2 pooling).

    wq, wk, wv: float32[D_in, N, H] (+ bias [N, H]); wo: float32[N, H, D_out] (+ bias).
    """

    def __init__(self, d_in: int, num_heads: int, head_dim: int, d_out: int, names: Names, *,
                 rngs: nnx.Rngs):
        n_in, n_heads, n_out = names
        qkv_names = (n_in, n_heads, "head_dim")
        self.wq = Dense((d_in,), (num_heads, head_dim), qkv_names, use_bias=True, rngs=rngs)
        self.wk = Dense((d_in,), (num_heads, head_dim), qkv_names, use_bias=True, rngs=rngs)
        self.wv = Dense((d_in,), (num_heads, head_dim), qkv_names, use_bias=True, rngs=rngs)
        self.wo = Dense((num_heads, head_dim), (d_out,), (n_heads, "head_dim", n_out), use_bias=True,
                        rngs=rngs)

    def __call__(self, x_q: jax.Array, x_kv: jax.Array, dtype) -> jax.Array:
        """x_q: [B, T, D_in], x_kv: [B, S, D_in] -> [B, T, D_out]."""
        q, k, v = self.wq(x_q, dtype), self.wk(x_kv, dtype), self.wv(x_kv, dtype)
        return self.wo(dot_product_attention(q, k, v, float32_logits=True), dtype)


def default_positions(input_ids: jax.Array) -> jax.Array:
    """clamp(cumsum(input_ids != -1) - 1, 0), the official default (spec §2.1)."""
    valid = (input_ids != -1).astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(valid, axis=-1) - 1, 0)


def subsegment_positions(token_valid: jax.Array, subsegment_ids: jax.Array) -> jax.Array:
    """Positions when several conversations share one image (spec §4.6): a token of segment s
    counts the valid tokens at or before it whose segment is >= s, so every conversation
    continues right after the image block. bool[B, T], int[B, T] -> int32[B, T]."""
    t = token_valid.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    seen = causal[None] & token_valid[:, None, :] & (subsegment_ids[:, None, :] >= subsegment_ids[:, :, None])
    return jnp.maximum(jnp.sum(seen, axis=-1, dtype=jnp.int32) - 1, 0)


def causal_mask(token_valid: jax.Array, subsegment_ids: Optional[jax.Array] = None) -> jax.Array:
    """allowed[b, i, j] = (i >= j) & valid[b, j] (& sub[b, i] <= sub[b, j]) -> bool[B, T, T].

    Padding queries keep their keys masked too; their outputs are never read.
    """
    t = token_valid.shape[1]
    allowed = jnp.tril(jnp.ones((t, t), bool))[None] & token_valid[:, None, :]
    if subsegment_ids is not None:
        allowed &= subsegment_ids[:, :, None] <= subsegment_ids[:, None, :]
    return allowed

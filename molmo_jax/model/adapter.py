"""The Molmo2 adapter (transformers Molmo2Adapter): ViT patch features -> LLM embeddings.

Each output token pools the patches its row of the processor's index array names
(`image_token_pooling` / `video_token_pooling`: 2x2 windows of image crops, 3x3 of video
frames; -1 = padding slot): attention with the mean of its valid patches as the query and
the valid patches as keys, then a SwiGLU projector.

Axis legend: M pooled tokens, K slots per token (pool_h * pool_w), F flat patches
(crops x patches, every crop of the batch), E = ViT width x #layers, W adapter width,
D LLM width.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from molmo_jax.model.attention import MultiHeadAttention
from molmo_jax.model.layers import SwiGLU
from molmo_jax.model.molmo2_config import Molmo2Config


class Adapter(nnx.Module):
    def __init__(self, config: Molmo2Config, *, rngs: nnx.Rngs):
        vc, ac = config.vision, config.adapter
        self.dtype = jnp.dtype(config.dtype)
        feat = vc.width * len(vc.feature_layers)
        self.pooling = MultiHeadAttention(feat, ac.num_heads, ac.head_dim, ac.width,
                                          ("vit_embed", "vit_heads", "vit_embed"), rngs=rngs)
        self.projector = SwiGLU(ac.width, ac.projector_hidden, config.llm.d_model, ("vit_embed", "mlp", "embed"),
                                rngs=rngs)

    def pool(self, features: jax.Array, token_pooling: jax.Array) -> jax.Array:
        """features: [F, E]; token_pooling: int[M, K] indices into F (-1 = empty slot) -> [M, W].
        A token without any valid slot (batch padding) gives an unused row."""
        return self.pool_patches(jnp.take(features, jnp.maximum(token_pooling, 0), axis=0), token_pooling >= 0)

    def pool_patches(self, patches: jax.Array, valid: jax.Array) -> jax.Array:
        """patches: [M, K, E], each token's gathered slots; valid: bool[M, K] -> [M, W]."""
        patches = patches * valid[..., None].astype(patches.dtype)
        count = jnp.maximum(jnp.sum(valid, axis=-1, keepdims=True), 1).astype(patches.dtype)
        query = jnp.sum(patches, axis=1, keepdims=True) / count[..., None]
        return self.pooling(query, patches, self.dtype, key_valid=valid)[:, 0]

    def __call__(self, features: jax.Array, token_pooling: jax.Array):
        """features: [F, E]; token_pooling: int[M, K] -> (projected [M, D], pooled [M, W])."""
        pooled = self.pool(features, token_pooling)
        return self.projector(pooled, self.dtype), pooled

    def from_patches(self, patches: jax.Array, valid: jax.Array) -> jax.Array:
        """patches: [M, K, E] gathered by the caller; valid: bool[M, K] -> projected [M, D]."""
        return self.projector(self.pool_patches(patches, valid), self.dtype)

"""Vision -> LLM connector (spec §2.4): layer concat, pad embeddings, 2x2 attention pooling,
SwiGLU projector.

Axis legend: B batch, C crops, P patches per crop, W ViT width, E = W * #layers,
Q pooled tokens per crop, D LLM width.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from molmo_jax.model.attention import MultiHeadAttention
from molmo_jax.model.config import MolmoConfig
from molmo_jax.model.layers import SwiGLU, param, zeros

POOLINGS = ("attention_meanq", "attention")
PADDING_EMBEDS = ("pad_and_partial_pad", "none")


class Connector(nnx.Module):
    def __init__(self, config: MolmoConfig, *, rngs: nnx.Rngs):
        vc, cc = config.vision, config.connector
        if cc.pooling not in POOLINGS:
            raise ValueError(f"unknown connector pooling {cc.pooling!r}; choose from {POOLINGS}")
        if cc.padding_embed not in PADDING_EMBEDS:
            raise ValueError(f"unknown padding_embed {cc.padding_embed!r}; choose from {PADDING_EMBEDS}")
        self.config = config
        self.dtype = jnp.dtype(config.dtype)
        feat = vc.width * len(vc.feature_layers)
        # pad_embed starts at zero as in the official stage-1 init (spec §5.2).
        self.pad_embed = (param(rngs, zeros, (2, feat), (None, "vit_embed"))
                          if cc.padding_embed == "pad_and_partial_pad" else None)
        self.pooling = MultiHeadAttention(feat, vc.num_heads, vc.head_dim, vc.width,
                                          ("vit_embed", "vit_heads", "vit_embed"),
                                          implementation=config.attention, rngs=rngs)
        self.projector = SwiGLU(vc.width, config.projector_hidden, config.llm.d_model,
                                ("vit_embed", "mlp", "embed"), rngs=rngs)

    @property
    def tokens_per_crop(self) -> int:
        gh, gw = self.config.vision.grid
        cc = self.config.connector
        return -(-gh // cc.pool_h) * -(-gw // cc.pool_w)

    def add_pad_embed(self, features: jax.Array, image_masks: Optional[jax.Array]) -> jax.Array:
        """features: [B, C, P, E]; image_masks: float32[B, C, P] (1 real, 0 all padding,
        fractions and -1 count as partial padding)."""
        if self.pad_embed is None or image_masks is None:
            return features
        all_pad = (image_masks == 0).astype(features.dtype)[..., None]
        partial = ((image_masks < 1) & (image_masks != 0)).astype(features.dtype)[..., None]
        pad = self.pad_embed[...].astype(features.dtype)
        return features + pad[0] * all_pad + pad[1] * partial

    def pool(self, features: jax.Array) -> jax.Array:
        """[B, C, P, E] -> [B, C, Q, W]: attention over each 2x2 window (row-major keys
        top-left, top-right, bottom-left, bottom-right); the query is their mean."""
        b, c, _, e = features.shape
        (gh, gw), cc = self.config.vision.grid, self.config.connector
        x = features.reshape(b, c, gh, gw, e)
        pad_h, pad_w = -gh % cc.pool_h, -gw % cc.pool_w
        if pad_h or pad_w:  # odd grids (e.g. SigLIP 27x27) are zero-padded at the bottom/right
            x = jnp.pad(x, ((0, 0), (0, 0), (0, pad_h), (0, pad_w), (0, 0)))
        h, w = (gh + pad_h) // cc.pool_h, (gw + pad_w) // cc.pool_w
        x = x.reshape(b, c, h, cc.pool_h, w, cc.pool_w, e).transpose(0, 1, 2, 4, 3, 5, 6)
        windows = x.reshape(b * c * h * w, cc.pool_h * cc.pool_w, e)
        if cc.pooling == "attention_meanq":
            query = jnp.mean(windows, axis=1, keepdims=True)
        else:
            query = windows[:, :1]
        pooled = self.pooling(query, windows, self.dtype)
        return pooled.reshape(b, c, h * w, -1)

    def __call__(self, layer_features: Sequence[jax.Array], image_masks: Optional[jax.Array],
                 crop_valid: jax.Array, *, return_intermediates: bool = False):
        """layer_features: the selected ViT outputs, each [B, C, P(+CLS), W];
        image_masks: float32[B, C, P] or None; crop_valid: bool[B, C] (False for all -1 crops).

        Returns image features [B, C, Q, D] (and {"pooled": [B, C, Q, W]} when asked).
        """
        x = jnp.concatenate(layer_features, axis=-1)
        if self.config.vision.use_cls_token:
            x = x[:, :, 1:]
        x = x * crop_valid[:, :, None, None].astype(x.dtype)
        x = self.add_pad_embed(x, image_masks)
        pooled = self.pool(x)
        out = self.projector(pooled, self.dtype)
        return (out, {"pooled": pooled}) if return_intermediates else out

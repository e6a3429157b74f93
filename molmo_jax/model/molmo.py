"""Molmo = ViT + connector + LLM; image features are ADDED to the token embeddings at
image_input_idx (spec §2.5).

Axis legend: B batch, L sequence, C crops, P patches per crop, D patch vector,
Q pooled tokens per crop, E model width, V embedding_size.

    model = Molmo(config, rngs=nnx.Rngs(0))
    logits = model(input_ids, images, image_masks, image_input_idx)      # float32[B, L, V]

Generation encodes the image once: `embeds = model.embed(...)`, then prefill/decode with
`model.llm(embeds, positions, token_valid=..., cache=model.llm.init_cache(...))` (see llm.py).

Float32 parity with the official fp32 evaluation needs full-precision matmuls on GPU and TPU,
whose float32 default rounds (TF32 / bfloat16 passes): trace under
`jax.default_matmul_precision("highest")` (golden logits on an H200: 2.5e-2 off by default,
3e-5 at "highest"). CPU computes float32 exactly either way.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from molmo_jax.model.attention import default_positions, subsegment_positions
from molmo_jax.model.config import MolmoConfig
from molmo_jax.model.connector import Connector
from molmo_jax.model.layers import rescale_to_fan_in
from molmo_jax.model.llm import LLM
from molmo_jax.model.vit import VisionTransformer
from molmo_jax.model.sharding import with_logical_constraint


def splice(embeds: jax.Array, features: jax.Array, image_input_idx: jax.Array) -> jax.Array:
    """embeds[b, idx[b, k]] += features[b, k] for idx >= 0; negative indices are dropped.

    embeds: [B, L, E]; features: [B, C, Q, E]; image_input_idx: int[B, C, Q].
    """
    b, l, e = embeds.shape
    feats = features.reshape(b, -1, e).astype(embeds.dtype)
    idx = image_input_idx.reshape(b, -1)
    idx = jnp.where(idx >= 0, idx, l)  # out of range -> dropped by the scatter
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], idx.shape)
    return embeds.at[rows, idx].add(feats, mode="drop")


def _check_shape(name: str, array, expected) -> None:
    """`expected`: a tuple of ints or None (any size); a mismatch names the input and both shapes."""
    shape = tuple(array.shape)
    if len(shape) != len(expected) or any(e is not None and e != s for s, e in zip(shape, expected)):
        want = ", ".join("*" if e is None else str(e) for e in expected)
        raise ValueError(f"{name} has shape {shape}, expected ({want})")


def residual_dropout_key(llm_config, deterministic: bool, rngs: Optional[nnx.Rngs]) -> Optional[jax.Array]:
    """The decoder's dropout key: None when deterministic or the config has no residual dropout."""
    if deterministic or not (llm_config.residual_dropout or llm_config.response_residual_dropout):
        return None
    if rngs is None:
        raise ValueError("deterministic=False with residual dropout needs rngs=nnx.Rngs(dropout=...)")
    return rngs.dropout()


class Molmo(nnx.Module):
    def __init__(self, config: MolmoConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.vision = VisionTransformer(config.vision, dtype=config.dtype, remat_policy=config.remat_policy,
                                        attention=config.attention, rngs=rngs)
        self.connector = Connector(config, rngs=rngs)
        self.llm = LLM(config.llm, dtype=config.dtype, remat_policy=config.remat_policy,
                       attention=config.attention, rngs=rngs)
        if config.init_scheme == "fan_in":
            rescale_to_fan_in(self)
            self.vision.rescale_position_embeddings(1 / 0.02)
            self.llm.embed.rescale(1 / 0.02)
        elif config.init_scheme != "normal":
            raise ValueError(f"unknown init_scheme {config.init_scheme!r}; choose from ['fan_in', 'normal']")

    def encode_images(self, images: jax.Array, image_masks: Optional[jax.Array], *,
                      return_intermediates: bool = False):
        """images: float32[B, C, P, D] (crops of all -1 are batch padding) -> features
        [B, C, Q, E]; with return_intermediates also {"vit_layers": [...] each
        [B, C, P+1, W], "pooled": [B, C, Q, W]}."""
        vc = self.config.vision
        _check_shape("images", images, (None, None, vc.num_patches, vc.patch_dim))
        b, c, p, d = images.shape
        if image_masks is not None:
            _check_shape("image_masks", image_masks, (b, c, p))
        crop_valid = ~jnp.all(images == -1, axis=(2, 3))
        layers = self.vision(images.reshape(b * c, p, d))
        layers = [h.reshape(b, c, *h.shape[1:]) for h in layers]
        out = self.connector(layers, image_masks, crop_valid, return_intermediates=return_intermediates)
        if return_intermediates:
            feats, extra = out
            return feats, {"vit_layers": layers, **extra}
        return out

    def embed(self, input_ids: jax.Array, images: Optional[jax.Array] = None,
              image_masks: Optional[jax.Array] = None, image_input_idx: Optional[jax.Array] = None) -> jax.Array:
        """The LLM input: token embeddings (ids -1 looked up as 0) plus the image features
        added at image_input_idx. -> [B, L, E] in the compute dtype."""
        _check_shape("input_ids", input_ids, (None, None))
        x = with_logical_constraint(self.llm.embed_tokens(input_ids), ("act_batch", None, None))
        if images is None:
            return x
        if image_input_idx is None:
            raise ValueError("images were given without image_input_idx")
        b, c = images.shape[:2]
        _check_shape("images", images, (input_ids.shape[0], None, None, None))
        _check_shape("image_input_idx", image_input_idx, (b, c, self.connector.tokens_per_crop))
        x = splice(x, self.encode_images(images, image_masks), image_input_idx)
        return with_logical_constraint(x, ("act_batch", None, None))

    def __call__(self, input_ids: jax.Array, images: Optional[jax.Array] = None,
                 image_masks: Optional[jax.Array] = None, image_input_idx: Optional[jax.Array] = None,
                 position_ids: Optional[jax.Array] = None, subsegment_ids: Optional[jax.Array] = None, *,
                 response_mask: Optional[jax.Array] = None, deterministic: bool = True,
                 rngs: Optional[nnx.Rngs] = None, return_aux: bool = False, return_hidden: bool = False):
        """input_ids: int32[B, L] (-1 = right padding); images: float32[B, C, P, D] or None;
        image_masks: float32[B, C, P]; image_input_idx: int[B, C, Q] (negative = drop);
        position_ids: int[B, L] (default: clamp(cumsum(ids != -1) - 1, 0), or the §4.6
        per-conversation positions when subsegment_ids are given); subsegment_ids: int[B, L];
        response_mask: bool[B, L] where the response residual dropout applies.

        Dropout runs only with deterministic=False, drawing from `rngs.dropout()`.
        Returns logits float32[B, L, V] (and the FFN aux dict when return_aux); with
        return_hidden the LLM's final normed states [B, L, D] instead, for the chunked
        cross-entropy (train/loss.py), which applies `self.llm.head_kernel()` itself.
        """
        token_valid = input_ids != -1
        for name, value in (("position_ids", position_ids), ("subsegment_ids", subsegment_ids),
                            ("response_mask", response_mask)):
            if value is not None:
                _check_shape(name, value, tuple(input_ids.shape))
        if position_ids is None:
            position_ids = (default_positions(input_ids) if subsegment_ids is None
                            else subsegment_positions(token_valid, subsegment_ids))
        dropout_key = residual_dropout_key(self.config.llm, deterministic, rngs)
        embeds = self.embed(input_ids, images, image_masks, image_input_idx)
        logits, _, aux = self.llm(embeds, position_ids, token_valid=token_valid, subsegment_ids=subsegment_ids,
                                  response_mask=response_mask, dropout_key=dropout_key, return_hidden=return_hidden)
        return (logits, aux) if return_aux else logits

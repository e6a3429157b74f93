"""Molmo2 = SigLIP2 ViT + Molmo2 adapter + Qwen3 / OLMo3 decoder (transformers' models/molmo2).

Axis legend: B batch, L sequence, N crops or frames (of the whole batch), P patches per crop,
D patch vector, M pooled tokens (of the whole batch), K slots per token, E model width,
V vocab_size.

The inputs are transformers' `Molmo2ForConditionalGeneration.forward` arguments, laid out
as its processor makes them: every image crop (or video frame) of the batch in one
`pixel_values` [N, P, D], and `token_pooling` [M, K] indexing the flat N*P patches. Training
uses a fixed budget per row instead (`embed_rows`: pixel_values [B, N, P, D], token_pooling
[B, M, K] into the row's own patches), which keeps every gather inside its row. The
pooled features of the tokens with any valid slot, in order, are ADDED to the embeddings of
the `image_patch_id` tokens in row-major order (transformers' masked_scatter of
embedding + feature). The decoder mask is causal plus padding, with every token whose
`mm_token_type_ids` is 1 (image / frame tokens and their markers) seeing every other such
token of its sequence both ways. Packed rows (data_pipelines/molmo2_packing.py) add
`subsegment_ids`: a query sees only keys whose subsegment id is >= its own (its own example,
and within a message tree the shared prefix but not the sibling answers), and the image tokens
see each other both ways only within one example (id // EXAMPLE_SUBSEGMENT_INCREMENT), as the
official Molmo2 model builds its mask (olmo/models/molmo2/molmo2.py, `forward`).

    model = Molmo2(config, rngs=nnx.Rngs(0))
    logits = model(input_ids, pixel_values, token_pooling, attention_mask=..., mm_token_type_ids=...)
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipelines.molmo2_packing import EXAMPLE_SUBSEGMENT_INCREMENT
from molmo_jax.model.adapter import Adapter
from molmo_jax.model.llm import LLM
from molmo_jax.model.molmo import _check_shape, residual_dropout_key
from molmo_jax.model.molmo2_config import Molmo2Config
from molmo_jax.model.sharding import with_logical_constraint
from molmo_jax.model.vit import VisionTransformer


def add_at_placeholders(embeds: jax.Array, features: jax.Array, feature_valid: jax.Array,
                        placeholder: jax.Array) -> jax.Array:
    """embeds: [B, L, E] + the k-th valid feature row at the k-th placeholder (row-major).

    features: [M, E]; feature_valid: bool[M]; placeholder: bool[B, L]. Placeholders past the
    last valid feature get nothing (the caller checks the counts where it can)."""
    b, l, e = embeds.shape
    order = jnp.argsort(jnp.logical_not(feature_valid).astype(jnp.int32), stable=True)  # valid rows first
    rows = features[order].astype(embeds.dtype)
    flat = placeholder.reshape(-1)
    rank = jnp.cumsum(flat.astype(jnp.int32)) - 1
    has_feature = flat & (rank < jnp.sum(feature_valid))
    added = jnp.where(has_feature[:, None], rows[jnp.clip(rank, 0, rows.shape[0] - 1)], 0)
    return embeds + added.reshape(b, l, e)


def check_placeholders(placeholder, token_pooling) -> None:
    """With concrete inputs: as many image_patch_id tokens as pooled tokens with a valid slot
    (placeholder bool[B, L]; token_pooling [M, K] for the whole batch, or [B, M, K] per row)."""
    if isinstance(placeholder, jax.core.Tracer) or isinstance(token_pooling, jax.core.Tracer):
        return
    pooling = np.asarray(token_pooling)
    per_row = pooling.ndim == 3
    tokens = np.sum(np.asarray(placeholder), axis=-1 if per_row else None)
    features = np.sum(np.any(pooling >= 0, axis=-1), axis=-1)
    if np.any(tokens != features):
        where = f" (rows {np.flatnonzero(tokens != features).tolist()})" if per_row else ""
        raise ValueError(f"image features and image tokens do not match{where}: {tokens.tolist()} image_patch_id "
                         f"tokens, {features.tolist()} pooled tokens in token_pooling")


def image_block_ids(mm_token_type_ids: jax.Array, subsegment_ids: Optional[jax.Array] = None) -> jax.Array:
    """int[B, L] -> int32[B, L] bidirectional block ids: the image tokens (type 1) of one example
    share a block, 1 + its index in a packed row (subsegment_ids // EXAMPLE_SUBSEGMENT_INCREMENT);
    every other token (padding: subsegment -1) is in none (0)."""
    is_image = (mm_token_type_ids == 1).astype(jnp.int32)
    if subsegment_ids is None:
        return is_image
    return is_image * jnp.maximum(subsegment_ids // EXAMPLE_SUBSEGMENT_INCREMENT + 1, 0)


class Molmo2(nnx.Module):
    def __init__(self, config: Molmo2Config, *, rngs: nnx.Rngs):
        self.config = config
        self.vision = VisionTransformer(config.vision, dtype=config.dtype, remat_policy=config.remat_policy,
                                        rngs=rngs)
        self.adapter = Adapter(config, rngs=rngs)
        self.llm = LLM(config.llm, dtype=config.dtype, remat_policy=config.remat_policy,
                       attention=config.attention, rngs=rngs)

    def encode_images(self, pixel_values: jax.Array, token_pooling: jax.Array, *,
                      return_intermediates: bool = False):
        """pixel_values: float32[N, P, D]; token_pooling: int[M, K] into the N*P patches ->
        (features [M, E], valid bool[M]); with return_intermediates also {"vit_layers": the
        selected ViT outputs, each [N, P, W_vit], "pooled": [M, W] before the projector}."""
        vc = self.config.vision
        _check_shape("pixel_values", pixel_values, (None, vc.num_patches, vc.patch_dim))
        _check_shape("token_pooling", token_pooling, (None, None))
        layers = self.vision(pixel_values)
        flat = jnp.concatenate(layers, axis=-1).reshape(-1, vc.width * len(layers))
        features, pooled = self.adapter(flat, token_pooling)
        valid = jnp.any(token_pooling >= 0, axis=-1)
        if return_intermediates:
            return features, valid, {"vit_layers": layers, "pooled": pooled}
        return features, valid

    def embed(self, input_ids: jax.Array, pixel_values: Optional[jax.Array] = None,
              token_pooling: Optional[jax.Array] = None) -> jax.Array:
        """Token embeddings plus the image features added at the image_patch_id tokens -> [B, L, E]."""
        _check_shape("input_ids", input_ids, (None, None))
        x = with_logical_constraint(self.llm.embed_tokens(input_ids), ("act_batch", None, None))
        if pixel_values is None:
            return x
        if token_pooling is None:
            raise ValueError("pixel_values were given without token_pooling (image_token_pooling / video_token_pooling)")
        placeholder = input_ids == self.config.image_patch_id
        check_placeholders(placeholder, token_pooling)
        features, valid = self.encode_images(pixel_values, token_pooling)
        return with_logical_constraint(add_at_placeholders(x, features, valid, placeholder), ("act_batch", None, None))

    def embed_rows(self, input_ids: jax.Array, pixel_values: jax.Array, token_pooling: jax.Array) -> jax.Array:
        """The training layout, a fixed budget per row -> [B, L, E].

        pixel_values: float32[B, N, P, D] (padding crops: any values, no token pools them);
        token_pooling: int[B, M, K] into the row's own N*P patches (-1 = empty slot, all -1 =
        padding token). Each row's valid pooled tokens are added at its image_patch_id tokens."""
        vc = self.config.vision
        b = input_ids.shape[0]
        _check_shape("pixel_values", pixel_values, (b, None, vc.num_patches, vc.patch_dim))
        _check_shape("token_pooling", token_pooling, (b, None, None))
        n, (m, k) = pixel_values.shape[1], token_pooling.shape[1:]
        x = with_logical_constraint(self.llm.embed_tokens(input_ids), ("act_batch", None, None))
        placeholder = input_ids == self.config.image_patch_id
        check_placeholders(placeholder, token_pooling)
        layers = self.vision(pixel_values.reshape(b * n, vc.num_patches, vc.patch_dim))
        flat = jnp.concatenate(layers, axis=-1).reshape(b, n * vc.num_patches, vc.width * len(layers))
        valid = token_pooling >= 0
        patches = jax.vmap(lambda f, i: jnp.take(f, i, axis=0))(flat, jnp.maximum(token_pooling, 0))  # [B, M, K, E]
        features = self.adapter.from_patches(patches.reshape(b * m, k, -1), valid.reshape(b * m, k)).reshape(b, m, -1)
        x = jax.vmap(lambda e, f, v, p: add_at_placeholders(e[None], f, v, p[None])[0])(
            x, features, jnp.any(valid, axis=-1), placeholder)
        return with_logical_constraint(x, ("act_batch", None, None))

    def __call__(self, input_ids: jax.Array, pixel_values: Optional[jax.Array] = None,
                 token_pooling: Optional[jax.Array] = None, *, attention_mask: Optional[jax.Array] = None,
                 position_ids: Optional[jax.Array] = None, mm_token_type_ids: Optional[jax.Array] = None,
                 subsegment_ids: Optional[jax.Array] = None, response_mask: Optional[jax.Array] = None,
                 deterministic: bool = True, rngs: Optional[nnx.Rngs] = None, return_aux: bool = False,
                 return_hidden: bool = False):
        """input_ids: int32[B, L]; pixel_values: float32[N, P, D] with token_pooling int[M, K]
        (transformers' layout), or [B, N, P, D] with [B, M, K] (embed_rows' training layout), or
        None; attention_mask: [B, L] (1 = token, 0 = padding; None = all tokens); position_ids:
        int[B, L] (default 0..L-1, as transformers); mm_token_type_ids: int[B, L] (1 = image token;
        None = plain causal, as transformers without them); subsegment_ids: int[B, L] of a packed row
        (None = one example; give its position_ids too); response_mask: bool[B, L] where the
        response residual dropout applies. Dropout runs only with deterministic=False, drawing
        from `rngs.dropout()`. Returns logits float32[B, L, V] (and the FFN aux dict when
        return_aux; with return_hidden the LLM's final normed states [B, L, D] in place of the
        logits, for the chunked cross-entropy)."""
        shape = tuple(input_ids.shape)
        for name, value in (("attention_mask", attention_mask), ("position_ids", position_ids),
                            ("mm_token_type_ids", mm_token_type_ids), ("subsegment_ids", subsegment_ids),
                            ("response_mask", response_mask)):
            if value is not None:
                _check_shape(name, value, shape)
        token_valid = jnp.ones(shape, bool) if attention_mask is None else attention_mask.astype(bool)
        if position_ids is None and subsegment_ids is not None:  # the official model refuses it too
            raise ValueError("subsegment_ids need the packed row's position_ids")
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(shape[1], dtype=jnp.int32), shape)
        block_ids = None if mm_token_type_ids is None else image_block_ids(mm_token_type_ids, subsegment_ids)
        if pixel_values is not None and pixel_values.ndim == 4:
            if token_pooling is None:
                raise ValueError("pixel_values were given without token_pooling")
            embeds = self.embed_rows(input_ids, pixel_values, token_pooling)
        else:
            embeds = self.embed(input_ids, pixel_values, token_pooling)
        logits, _, aux = self.llm(embeds, position_ids, token_valid=token_valid, subsegment_ids=subsegment_ids,
                                  block_ids=block_ids, response_mask=response_mask,
                                  dropout_key=residual_dropout_key(self.config.llm, deterministic, rngs),
                                  return_hidden=return_hidden)
        return (logits, aux) if return_aux else logits

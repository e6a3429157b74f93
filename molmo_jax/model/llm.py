"""The Molmo decoder (spec §2.2, §2.6): Qwen2-style pre-norm blocks (q/k/v bias, GQA),
OLMo-7B-1024 post-norm blocks (full-width QK-norm) and, for Molmo2, Qwen3 (per-head QK-norm)
and OLMo3 blocks with per-layer RoPE scaling; scanned, with a KV cache.

Axis legend: B batch, T new tokens, S cache slots, D width, N heads, K kv heads,
H head dim, F SwiGLU half width, V embedding_size (logit columns).

KV-cache API (for generation)
-----------------------------
    cache = llm.init_cache(batch, max_len, dtype)   # KVCache: k, v [layers, B, S, K, H],
                                                     # valid bool[B, S], index int32[]
    logits, cache, aux = llm(embeds, positions, token_valid=valid, cache=cache)

A call with a cache writes its T tokens into slots [index, index + T) (the same slots for
every example), marks them valid where `token_valid` is set, and lets token i attend to
the valid slots <= index + i. So a right-padded prompt is prefilled in one call (its
padding slots stay masked forever, as in the official generate) and each decode step then
passes T=1 token per example with its own position (last valid position + 1 + step).
`Molmo.embed` gives the prompt embeddings (image encoded once), `llm.embed_tokens` the
embeddings of generated ids. Several conversations per sequence (subsegment ids) are a
training feature and are not supported together with a cache.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from molmo_jax.model.attention import AttentionMask, dot_product_attention
from molmo_jax.model.config import LLMConfig
from molmo_jax.model.layers import (ATTENTION_NAME, Dense, Embedding, RMSNorm, SwiGLU, apply_rope, masked_dropout,
                                    scan_stack, stacked)
from molmo_jax.model.moe import MoEFeedForward
from molmo_jax.model.rope import rope_tables
from molmo_jax.model.sharding import with_logical_constraint


class KVCache(NamedTuple):
    k: jax.Array  # [layers, B, S, K, H]
    v: jax.Array  # [layers, B, S, K, H]
    valid: jax.Array  # bool[B, S]: the slot holds a real (non-padding) token
    index: jax.Array  # int32[]: first free slot


class Attention(nnx.Module):
    """q, k, v: float32[D, N|K, H] (+ bias [N|K, H] for Qwen2); o: float32[N, H, D], no bias;
    optional q_norm [N*H] / k_norm [K*H] applied over the full width before the head split, or
    (qk_norm_per_head, Qwen3) q_norm / k_norm [H] applied to every head."""

    def __init__(self, config: LLMConfig, *, attention: str = "reference", rngs: nnx.Rngs):
        c = config
        self.config = c
        self.implementation = attention
        self.q = Dense((c.d_model,), (c.n_heads, c.head_dim), ("embed", "heads", "head_dim"),
                       use_bias=c.qkv_bias, rngs=rngs)
        self.k = Dense((c.d_model,), (c.n_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"),
                       use_bias=c.qkv_bias, rngs=rngs)
        self.v = Dense((c.d_model,), (c.n_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"),
                       use_bias=c.qkv_bias, rngs=rngs)
        self.o = Dense((c.n_heads, c.head_dim), (c.d_model,), ("heads", "head_dim", "embed"),
                       use_bias=False, rngs=rngs)
        if c.qk_norm and c.qk_norm_per_head:
            self.q_norm = RMSNorm(c.head_dim, c.norm_eps, ("head_dim",), rngs=rngs)
            self.k_norm = RMSNorm(c.head_dim, c.norm_eps, ("head_dim",), rngs=rngs)
        elif c.qk_norm:
            self.q_norm = RMSNorm(c.n_heads * c.head_dim, c.norm_eps, ("embed",), rngs=rngs)
            self.k_norm = RMSNorm(c.n_kv_heads * c.head_dim, c.norm_eps, (None,), rngs=rngs)
        else:
            self.q_norm = self.k_norm = None

    @staticmethod
    def _full_width_norm(norm: RMSNorm, x: jax.Array) -> jax.Array:
        return norm(x.reshape(*x.shape[:2], -1)).reshape(x.shape)

    def __call__(self, x: jax.Array, positions: jax.Array, mask: AttentionMask, dtype, rope,
                 layer_cache: Optional[Tuple[jax.Array, jax.Array]] = None,
                 index: Optional[jax.Array] = None):
        """x: [B, T, D]; positions: int32[B, T]; mask: over the S keys (T, or the cache slots);
        rope: this layer's (inv_freq float32[H/2], scale float32[]) (model/rope.py);
        layer_cache: (k, v) [B, S, K, H] written at slot `index`. Returns (out, new layer_cache)."""
        q, k, v = self.q(x, dtype), self.k(x, dtype), self.v(x, dtype)
        if self.q_norm is not None and self.config.qk_norm_per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        elif self.q_norm is not None:
            q, k = self._full_width_norm(self.q_norm, q), self._full_width_norm(self.k_norm, k)
        inv_freq, scale = rope
        q, k = apply_rope(q, positions, inv_freq, scale), apply_rope(k, positions, inv_freq, scale)
        if layer_cache is not None:
            ck, cv = layer_cache
            ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, index, 0, 0))
            cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, index, 0, 0))
            layer_cache, k, v = (ck, cv), ck.astype(dtype), cv.astype(dtype)
        out = checkpoint_name(dot_product_attention(q, k, v, mask, implementation=self.implementation),
                              ATTENTION_NAME)  # kept by the "dots_and_attention" remat policy
        return self.o(out, dtype), layer_cache


class FeedForward(nnx.Module):
    """Dense SwiGLU FFN. Official `ff_proj` = [up; gate] is split into `up` and `gate`."""

    def __init__(self, config: LLMConfig, *, rngs: nnx.Rngs):
        self.mlp = SwiGLU(config.d_model, config.mlp_hidden_size // 2, config.d_model,
                          ("embed", "mlp", "embed"), rngs=rngs)

    def __call__(self, x: jax.Array, dtype=None):
        return self.mlp(x, dtype or x.dtype), {}


def make_feed_forward(config: LLMConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """The block's FFN: `__call__(x [B, T, D]) -> (y [B, T, D], aux dict of scalars)`."""
    if config.block_type == "moe":
        return MoEFeedForward(config, rngs=rngs)
    if config.block_type != "dense":
        raise ValueError(f"unknown block_type {config.block_type!r}; choose 'dense' or 'moe'")
    return FeedForward(config, rngs=rngs)


class DecoderBlock(nnx.Module):
    """Pre-norm: x += attn(attn_norm(x)); x += ffn(ff_norm(x)).
    Post-norm (norm_after): x += attn_norm(attn(x)); x += ff_norm(ffn(x))."""

    def __init__(self, config: LLMConfig, *, attention: str = "reference", rngs: nnx.Rngs):
        self.config = config
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps, ("embed",), rngs=rngs)
        self.attention = Attention(config, attention=attention, rngs=rngs)
        self.ff_norm = RMSNorm(config.d_model, config.norm_eps, ("embed",), rngs=rngs)
        self.ffn = make_feed_forward(config, rngs=rngs)

    def _residual(self, x, y, key, response_mask):
        c = self.config
        if key is not None:
            y = masked_dropout(y, key, c.residual_dropout, c.response_residual_dropout, response_mask)
        return x + y

    def __call__(self, x, positions, mask, dtype, rope, layer_cache=None, index=None, dropout_key=None,
                 response_mask=None):
        post = self.config.norm_after
        keys = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
        h, layer_cache = self.attention(x if post else self.attn_norm(x), positions, mask, dtype, rope,
                                        layer_cache, index)
        x = self._residual(x, self.attn_norm(h) if post else h, keys[0], response_mask)
        h, aux = self.ffn(x if post else self.ff_norm(x))
        x = self._residual(x, self.ff_norm(h) if post else h, keys[1], response_mask)
        return x, layer_cache, aux


class LLM(nnx.Module):
    def __init__(self, config: LLMConfig, *, dtype="float32", remat_policy: str = "none",
                 attention: str = "reference", rngs: nnx.Rngs):
        """attention: the attention backend (attention.IMPLEMENTATIONS; "auto" picks per
        platform and length)."""
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.remat_policy = remat_policy
        self.embed = Embedding(config.embedding_size, config.additional_vocab_size, config.d_model, rngs=rngs)
        self.blocks = stacked(lambda r: DecoderBlock(config, attention=attention, rngs=r), config.n_layers, rngs)
        self.ln_f = RMSNorm(config.d_model, config.norm_eps, ("embed",), rngs=rngs)
        self.lm_head = Dense((config.d_model,), (config.embedding_size,), ("embed", "vocab"),
                             use_bias=False, rngs=rngs)

    def embed_tokens(self, ids: jax.Array) -> jax.Array:
        """int32[B, T] (-1 = padding, looked up as 0) -> [B, T, D] in the compute dtype."""
        return self.embed(ids, self.dtype)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        c = self.config
        shape = (c.n_layers, batch, max_len, c.n_kv_heads, c.head_dim)
        dtype = jnp.dtype(dtype or self.dtype)
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, max_len), bool),
                       jnp.zeros((), jnp.int32))

    def __call__(self, embeds: jax.Array, positions: jax.Array, *, token_valid: jax.Array,
                 subsegment_ids: Optional[jax.Array] = None, cache: Optional[KVCache] = None,
                 response_mask: Optional[jax.Array] = None, dropout_key: Optional[jax.Array] = None,
                 block_ids: Optional[jax.Array] = None, return_hidden: bool = False):
        """embeds: [B, T, D]; positions: int32[B, T]; token_valid: bool[B, T];
        subsegment_ids: int[B, T] (no cache); response_mask: bool[B, T] where the response
        residual dropout applies; dropout_key: PRNG key, None = deterministic;
        block_ids: int[B, T], tokens of one nonzero id attend to each other both ways (Molmo2's
        image tokens); with a cache they hold for these T tokens only, so a prompt's images
        must be prefilled in one call.

        Returns (logits float32[B, T, V], updated cache or None, aux dict of FFN scalars
        summed over layers; empty for dense blocks). return_hidden: the final normed states
        [B, T, D] in place of the logits (the chunked cross-entropy applies the head itself:
        head_kernel, train/loss.py).
        """
        if cache is None:
            mask = AttentionMask(key_valid=token_valid, subsegment_ids=subsegment_ids, block_ids=block_ids)
            index, layer_caches = None, None
        else:
            if subsegment_ids is not None:
                raise ValueError("subsegment_ids cannot be combined with a KV cache")
            index = cache.index
            valid = jax.lax.dynamic_update_slice(cache.valid, token_valid, (0, index))
            if block_ids is not None:  # slot-indexed like key_valid; earlier slots are in no block
                block_ids = jax.lax.dynamic_update_slice(jnp.zeros(cache.valid.shape, jnp.int32),
                                                         block_ids.astype(jnp.int32), (0, index))
            mask = AttentionMask(q_offset=index, key_valid=valid, block_ids=block_ids)  # token i at slot index + i
            layer_caches = (cache.k, cache.v)

        n = self.config.n_layers
        keys = None if dropout_key is None else jax.random.split(dropout_key, n)

        def body(block, x, xs):
            layer_cache, key, rope = xs
            x = with_logical_constraint(x, ("act_batch", None, None))  # keeps FSDP from splitting activations on width
            x, layer_cache, aux = block(x, positions, mask, self.dtype, rope, layer_cache, index, key, response_mask)
            return x, (layer_cache, aux)

        x, (new_caches, aux) = scan_stack(self.blocks, body, embeds.astype(self.dtype),
                                          (layer_caches, keys, rope_tables(self.config)),
                                          remat_policy=self.remat_policy)
        x = self.ln_f(x)
        out = x if return_hidden else jnp.einsum("btd,dv->btv", x, self.head_kernel(),
                                                 preferred_element_type=jnp.float32)
        if cache is not None:
            k, v = new_caches
            cache = KVCache(k, v, valid, index + embeds.shape[1])
        return out, cache, jax.tree.map(lambda a: jnp.sum(a, axis=0), aux)

    def head_kernel(self) -> jax.Array:
        """The LM head's [D, V] kernel in the compute dtype, as __call__ applies it."""
        return self.lm_head.weight(self.dtype)

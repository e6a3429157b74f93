"""Which keys each query may attend to, described per token: the mask every attention backend
reads (attention.py, attention_chunked.py, attention_kernels.py) and none of them owns.

Axis legend: B batch, T query length, S key length.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Union

import jax
import jax.numpy as jnp

# Masked logits get the most negative float32 (as the official additive mask does) rather
# than -inf, so fully masked rows (padding queries) stay finite.
MASK_VALUE = float(jnp.finfo(jnp.float32).min)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["q_offset", "key_valid", "subsegment_ids", "block_ids"],
                   meta_fields=["causal"])
@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """Which keys each query may attend to, as per-token arrays rather than a dense [T, S] mask.

    Query i sits at key slot q_offset + i (q_offset = 0 without a KV cache, the cache's first
    free slot with one); the per-token arrays are indexed by key slot, [B, S]:

        allowed[b, i, j] = key_valid[b, j]
                           & (not causal  or  q_offset + i >= j  or  same nonzero block id)
                           & subsegment_ids[b, q_offset + i] <= subsegment_ids[b, j]

    key_valid: bool[B, S] (right padding, empty cache slots), None = all valid.
    subsegment_ids: int[B, S], Molmo's several conversations per image (spec §4.6), None = one.
    block_ids: int[B, S], bidirectional blocks (Molmo2: the tokens of one image or frame see
    each other both ways); 0 = no block, None = none.
    """

    causal: bool = True
    q_offset: Union[int, jax.Array] = 0
    key_valid: Optional[jax.Array] = None
    subsegment_ids: Optional[jax.Array] = None
    block_ids: Optional[jax.Array] = None

    def allowed(self, q_slots: jax.Array, k_slots: jax.Array) -> jax.Array:
        """The mask for query slots int32[Tq] x key slots int32[Sk] -> bool[B or 1, Tq, Sk].

        Slots past the end of the per-token arrays (tile padding) read the last entry; callers
        mask padded keys with `key_valid`.
        """
        def at(ids, slots):
            return jnp.take(ids, slots, axis=1, mode="clip")

        allowed = jnp.ones((1, q_slots.shape[0], k_slots.shape[0]), bool)
        if self.causal:
            ordered = q_slots[:, None] >= k_slots[None, :]
            if self.block_ids is not None:
                qb, kb = at(self.block_ids, q_slots), at(self.block_ids, k_slots)
                ordered = ordered | ((qb[:, :, None] == kb[:, None, :]) & (qb[:, :, None] != 0))
            allowed = allowed & ordered
        if self.key_valid is not None:
            allowed = allowed & at(self.key_valid, k_slots)[:, None, :]
        if self.subsegment_ids is not None:
            qs, ks = at(self.subsegment_ids, q_slots), at(self.subsegment_ids, k_slots)
            allowed = allowed & (qs[:, :, None] <= ks[:, None, :])
        return allowed

    def dense(self, t: int, s: int) -> jax.Array:
        """The full mask of T queries over S keys: bool[B or 1, T, S] (True = attend)."""
        return self.allowed(self.q_offset + jnp.arange(t), jnp.arange(s))

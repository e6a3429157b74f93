"""The chunked XLA attention backend: flash attention written with `jax.lax.scan`.

Queries are cut into blocks of BLOCK_Q and keys into blocks of BLOCK_K; each (query block,
key block) tile computes its own slice of the AttentionMask and folds into a running max /
sum / output (online softmax, float32), so no [T, S] array exists per head, forward or
backward. The backward pass is a `jax.custom_vjp` that recomputes each tile's probabilities
from the saved row max and sum (flash attention's recompute), so the gradient's memory is
bounded the same way. With skip_empty_tiles (attention.py asks for it on CPU), tiles with no
allowed entry (above the causal diagonal, padding) are skipped with `lax.cond`.

Two things the TPU compiler did to this kernel, measured on the Molmo2-4B long-context step
(one 36,864-token row per chip, 72 x 72 tiles of 512; tools/aot, docs/scaling.md):
  - with the `lax.cond` skip it kept the logits and probabilities of every tile of a layer,
    f32[72, 72, 1, 8, 4, 512, 512] twice (324 GiB), so accelerators compute every tile and
    mask it instead (the skip is a CPU choice);
  - it also computes the tile masks of every layer at once (pred[72, 72, ...], 40 GiB in its
    buffer report), but they do not set the peak: an optimization barrier that kept them per
    tile raised the step's temporaries from 84.4 to 90.1 GiB, so there is none.

Rows with no allowed key at all (all-padding examples) output 0 and pass no gradient; the
reference einsum gives them the mean of v instead. Neither is ever read.

Axis legend (attention.py): B batch, T queries, S keys, K kv heads, G query heads per kv
head, H head dim; nq, nk numbers of blocks, Q / C block lengths of queries / keys.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from molmo_jax.model.attention_mask import MASK_VALUE, AttentionMask
from molmo_jax.model.layers import ATTENTION_NAME

BLOCK_Q = 512
BLOCK_K = 512
# Attention without a mask (the ViT: 577 or 729 tokens per crop) up to this length is one tile
# with no mask arrays: no tail padding (577 in blocks of 512 would pad to 1024, 3x the work) and
# no skipping to gain, while the backward still recomputes instead of keeping the probabilities.
SINGLE_TILE = 1024

_F32 = jnp.float32


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Optional[AttentionMask], *,
                      block_q: int = BLOCK_Q, block_k: int = BLOCK_K, single_tile: int = SINGLE_TILE,
                      skip_empty_tiles: bool = True) -> jax.Array:
    """softmax(q k^T masked) v blockwise. q (already scaled by 1/sqrt(H)): [B, T, N, H];
    k, v: [B, S, K, H]; mask: AttentionMask or None (all allowed) -> [B, T, N, H] in v's dtype.
    Lengths need not be multiples of the blocks: the tails are padded, padded keys masked.
    Without a mask, T and S up to `single_tile` are one unpadded, unmasked tile.
    skip_empty_tiles: skip tiles with no allowed entry behind a `lax.cond` (module docstring:
    a CPU choice)."""
    b, t, n, h = q.shape
    s, kv = k.shape[1], k.shape[2]
    if mask is None and t <= single_tile and s <= single_tile:
        return _unmasked_tiles(q, k, v)
    bq, bk = min(block_q, t), min(block_k, s)
    nq, nk = -(-t // bq), -(-s // bk)
    mask = AttentionMask(causal=False) if mask is None else mask
    key_valid = jnp.ones((1, s), bool) if mask.key_valid is None else mask.key_valid
    mask = dataclasses.replace(mask, q_offset=jnp.asarray(mask.q_offset, jnp.int32),
                               key_valid=jnp.pad(key_valid, ((0, 0), (0, nk * bk - s))))

    def blocks(x, num, size):  # [B, L, ...] -> [num, B, size, ...], zero-padded
        x = jnp.pad(x, [(0, 0), (0, num * size - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(x.shape[0], num, size, *x.shape[2:]), 1, 0)

    qb = blocks(q.reshape(b, t, kv, n // kv, h), nq, bq)
    out = _flash(qb, blocks(k, nk, bk), blocks(v, nk, bk), mask, skip_empty_tiles)  # [nq, B, Q, K, G, H]
    return jnp.moveaxis(out, 0, 1).reshape(b, nq * bq, n, h)[:, :t]


def _unmasked_tiles(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Unmasked attention as one [G, T, S] tile per (example, kv head), one after another: a tile
    of one head stays in the CPU's cache, where a tile of every crop and head at once ([B, K, G,
    T, S]: 53 MB for 10 ViT crops of 577 tokens) streams through memory on every pass (forward
    and backward 1.65x faster per ViT layer, benchmarks/attention.py). Shapes as chunked_attention."""
    b, t, n, h = q.shape
    s, kv = k.shape[1], k.shape[2]
    g = n // kv
    # [B, T, K, G, H] -> [B*K, nq=1, B=1, T, K=1, G, H]; keys / values [B*K, nk=1, B=1, S, K=1, H].
    qr = q.reshape(b, t, kv, g, h).transpose(0, 2, 1, 3, 4).reshape(b * kv, 1, 1, t, 1, g, h)
    kr, vr = (x.transpose(0, 2, 1, 3).reshape(b * kv, 1, 1, s, 1, h) for x in (k, v))
    out = jax.lax.map(lambda args: _flash(*args, None, False), (qr, kr, vr))
    return out.reshape(b, kv, t, g, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n, h)


def _tile_mask(mask: Optional[AttentionMask], i, j, bq: int, bk: int) -> Optional[jax.Array]:
    """bool[B or 1, 1, 1, Q, C]: the mask of query block i x key block j, broadcast over heads;
    None for the unmasked single tile."""
    if mask is None:
        return None
    allowed = mask.allowed(mask.q_offset + i * bq + jnp.arange(bq), j * bk + jnp.arange(bk))
    return allowed[:, None, None]


def _where(allowed: Optional[jax.Array], x: jax.Array, other) -> jax.Array:
    return x if allowed is None else jnp.where(allowed, x, other)


def _if_any(allowed: Optional[jax.Array], run, skip, carry, skip_empty: bool):
    """run(carry) unless skip_empty and the tile has no allowed entry (then skip(carry))."""
    if allowed is None or not skip_empty:
        return run(carry)
    return jax.lax.cond(jnp.any(allowed), run, skip, carry)


def _logits(qi, kj):
    return jnp.einsum("bqkgh,bckh->bkgqc", qi, kj, preferred_element_type=_F32)


def _forward(qb, kb, vb, mask, skip_empty):
    """-> out [nq, B, Q, K, G, H] in v's dtype, row max m and row sum l float32[nq, B, K, G, Q]."""
    bq, bk = qb.shape[2], kb.shape[2]
    b, _, kv, g, h = qb.shape[1:]

    def query_block(args):
        i, qi = args

        def key_block(carry, args):
            j, kj, vj = args
            allowed = _tile_mask(mask, i, j, bq, bk)

            def fold(carry):
                m, l, acc = carry
                s = _where(allowed, _logits(qi, kj), MASK_VALUE)
                m_new = jnp.maximum(m, s.max(-1))
                p = _where(allowed, jnp.exp(s - m_new[..., None]), 0.0)
                scale = jnp.exp(m - m_new)
                pv = jnp.einsum("bkgqc,bckh->bkgqh", p.astype(vj.dtype), vj, preferred_element_type=_F32)
                return m_new, l * scale + p.sum(-1), acc * scale[..., None] + pv

            return _if_any(allowed, fold, lambda c: c, carry, skip_empty), None

        init = (jnp.full((b, kv, g, bq), MASK_VALUE, _F32), jnp.zeros((b, kv, g, bq), _F32),
                jnp.zeros((b, kv, g, bq, h), _F32))
        (m, l, acc), _ = jax.lax.scan(key_block, init, (jnp.arange(kb.shape[0]), kb, vb))
        out = acc / jnp.where(l == 0, 1.0, l)[..., None]  # rows with no allowed key -> 0
        return jnp.moveaxis(out, 3, 1).astype(vb.dtype), m, l

    return jax.lax.map(query_block, (jnp.arange(qb.shape[0]), qb))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(qb, kb, vb, mask, skip_empty):
    return _forward(qb, kb, vb, mask, skip_empty)[0]


def _flash_fwd(qb, kb, vb, mask, skip_empty):
    # Named, so that the "dots_and_attention" remat policy keeps them instead of rerunning this.
    out, m, l = (checkpoint_name(x, ATTENTION_NAME) for x in _forward(qb, kb, vb, mask, skip_empty))
    return out, (qb, kb, vb, mask, out, m, l)


def _flash_bwd(skip_empty, residuals, dout):
    """Flash attention's backward: per tile p = exp(s - m) / l, ds = p (dp - rowsum(do o)).
    Outer scan over key blocks (accumulating dk, dv), inner over query blocks (emitting dq)."""
    qb, kb, vb, mask, out, m, l = residuals
    bq, bk = qb.shape[2], kb.shape[2]
    inv_l = 1.0 / jnp.where(l == 0, 1.0, l)
    delta = jnp.moveaxis(jnp.sum(dout.astype(_F32) * out.astype(_F32), -1), 2, -1)  # [nq, B, K, G, Q]

    def key_block(dq, args):
        j, kj, vj = args

        def query_block(carry, args):
            i, qi, doi, mi, inv_li, di = args
            allowed = _tile_mask(mask, i, j, bq, bk)

            def grads(carry):
                dk, dv = carry
                s = _logits(qi, kj)
                p = _where(allowed, jnp.exp(s - mi[..., None]) * inv_li[..., None], 0.0)
                dv = dv + jnp.einsum("bkgqc,bqkgh->bckh", p.astype(doi.dtype), doi, preferred_element_type=_F32)
                dp = jnp.einsum("bqkgh,bckh->bkgqc", doi, vj, preferred_element_type=_F32)
                ds = p * (dp - di[..., None])
                dk = dk + jnp.einsum("bkgqc,bqkgh->bckh", ds.astype(qi.dtype), qi, preferred_element_type=_F32)
                dqi = jnp.einsum("bkgqc,bckh->bqkgh", ds.astype(kj.dtype), kj, preferred_element_type=_F32)
                return (dk, dv), dqi

            def skip(carry):
                return carry, jnp.zeros(qi.shape, _F32)

            return _if_any(allowed, grads, skip, carry, skip_empty)

        zeros = jnp.zeros(kj.shape, _F32)
        (dk, dv), dq_j = jax.lax.scan(query_block, (zeros, zeros),
                                      (jnp.arange(qb.shape[0]), qb, dout, m, inv_l, delta))
        return dq + dq_j, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(qb.shape, _F32), (jnp.arange(kb.shape[0]), kb, vb))
    return dq.astype(qb.dtype), dk.astype(kb.dtype), dv.astype(vb.dtype), None


_flash.defvjp(_flash_fwd, _flash_bwd)

"""Library attention kernels behind dot_product_attention: TPU splash attention (Pallas) and
cuDNN flash attention on GPU (`jax.nn.dot_product_attention(implementation="cudnn")`).

Both take the causal flag and key validity of an AttentionMask, not the rest:

    splash  causal -> CausalMask, key_valid -> segment ids (valid 1, padding 0), so a
            valid query sees exactly the valid keys at or before it, wherever the padding
            sits (a padding query sees the padding keys before it; never read). The kernel
            is built per shape at trace time (its block sparsity skips the tiles above the
            diagonal); the batch is vmapped.
    cudnn   causal -> is_causal, key_valid -> key_value_seq_lengths = its count, which is
            right padding (the pipeline's layout); a key_valid that is not a prefix poisons
            the output with NaN rather than attending to the wrong keys.

Neither expresses Molmo's subsegment rule (sub[q] <= sub[k] is an order, segment ids are
equality), Molmo2's bidirectional blocks (a data-dependent mask; splash's dynamic masks are a
dense [T, S] array again), or a KV-cache query offset (known only at run time, while splash's
causal offset is static and cuDNN's causal mask has none). `unsupported` names the reason
and "auto" then falls back to the chunked XLA kernel (attention_chunked.py). cuDNN also
needs half-precision inputs and a head dim that is a multiple of 8, at most 128.

Axis legend (attention.py): B batch, T queries, S keys, N query heads, K kv heads, H head dim.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from molmo_jax.model.attention_mask import AttentionMask
from molmo_jax.model.layers import ATTENTION_NAME

SPLASH_BLOCK = 512  # the largest tile; the kernel needs multiples of 128


def unsupported(mask: Optional[AttentionMask], t: int, s: int) -> Optional[str]:
    """Why splash / cuDNN cannot express `mask` over T queries x S keys, or None if they can."""
    if mask is None:
        return None
    if mask.subsegment_ids is not None:
        return "subsegment ids (sub[q] <= sub[k] is an order, not segment equality)"
    if mask.block_ids is not None:
        return "bidirectional blocks (a data-dependent [T, S] mask)"
    if not (isinstance(mask.q_offset, int) and mask.q_offset == 0):
        return "a KV-cache query offset (known only at run time)"
    if t != s:
        return f"{t} queries over {s} keys without an offset"
    return None


def _check(mask, t, s, backend):
    reason = unsupported(mask, t, s)
    if reason is not None:
        raise ValueError(f"attention implementation {backend!r} cannot express {reason}; "
                         "use 'auto' or 'chunked'")


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Optional[AttentionMask], *,
                     block: int = SPLASH_BLOCK, interpret: bool = False) -> jax.Array:
    """q (already scaled): [B, T, N, H]; k, v: [B, T, K, H] -> [B, T, N, H]. `interpret` runs
    the Pallas kernel in the interpreter (any platform, for tests). Lengths are padded to the
    block; the padding is a segment of its own."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (  # noqa: PLC0415 (Pallas TPU only here)
        splash_attention_kernel as kernels, splash_attention_mask as masks)

    b, t, n, h = q.shape
    _check(mask, t, k.shape[1], "splash")
    size = min(block, -(-t // 128) * 128)
    tp = -(-t // size) * size
    causal = mask is not None and mask.causal
    valid = jnp.ones((b, t), bool) if mask is None or mask.key_valid is None else mask.key_valid
    segments = jnp.pad(valid.astype(jnp.int32), ((0, 0), (0, tp - t)))

    shape = (tp, tp)
    head_mask = masks.CausalMask(shape) if causal else masks.FullMask(shape)
    kernel = kernels.make_splash_mha(
        masks.MultiHeadMask([head_mask] * n), head_shards=1, q_seq_shards=1, interpret=interpret,
        residual_checkpoint_name=ATTENTION_NAME,
        block_sizes=kernels.BlockSizes(block_q=size, block_kv=size, block_kv_compute=size, block_q_dkv=size,
                                       block_kv_dkv=size, block_kv_dkv_compute=size, block_q_dq=size,
                                       block_kv_dq=size))

    def heads_first(x):  # [B, T, heads, H] -> [B, heads, Tp, H]
        return jnp.swapaxes(jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0))), 1, 2)

    def one_example(q, k, v, seg):
        return kernel(q, k, v, segment_ids=kernels.SegmentIds(q=seg, kv=seg))

    out = jax.vmap(one_example)(heads_first(q), heads_first(k), heads_first(v), segments)
    return jnp.swapaxes(out, 1, 2)[:, :t].astype(v.dtype)


def cudnn_arguments(q: jax.Array, k: jax.Array, v: jax.Array, mask: Optional[AttentionMask]) -> dict:
    """The keyword arguments of jax.nn.dot_product_attention for q (already scaled), k, v and
    `mask`, without `implementation` (tests run them with "xla" on CPU)."""
    _check(mask, q.shape[1], k.shape[1], "cudnn")
    args = dict(query=q, key=k, value=v, scale=1.0, is_causal=mask is not None and mask.causal)
    if mask is not None and mask.key_valid is not None:
        # An all-padding example keeps one key, so that no row is empty (empty rows are never read).
        args["key_value_seq_lengths"] = jnp.maximum(jnp.sum(mask.key_valid, axis=1, dtype=jnp.int32), 1)
    return args


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Optional[AttentionMask],
                    implementation: str = "cudnn") -> jax.Array:
    """cuDNN flash attention; q (already scaled) [B, T, N, H], k, v [B, S, K, H] -> [B, T, N, H]."""
    args = cudnn_arguments(q, k, v, mask)
    out = jax.nn.dot_product_attention(**args, implementation=implementation)
    if "key_value_seq_lengths" in args:
        s = k.shape[1]
        prefix = mask.key_valid == (jnp.arange(s)[None] < jnp.sum(mask.key_valid, axis=1, keepdims=True))
        out = jnp.where(jnp.all(prefix, axis=1)[:, None, None, None], out, jnp.nan)
    return out


def cudnn_supports(q: jax.Array, k: jax.Array) -> Optional[str]:
    """Why cuDNN flash attention cannot take these inputs, or None."""
    if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype:
        return f"{q.dtype} inputs (cuDNN flash attention takes bfloat16 / float16)"
    h = q.shape[-1]
    if h % 8 or h > 128:
        return f"head dim {h} (cuDNN needs a multiple of 8, at most 128)"
    return None

"""Token cross-entropy with z-loss, in float32, normalised by the global loss-token weight.

Official recipe (spec §5.1): labels are the already-aligned `target_tokens` (no shift); every
token's CE and z-loss (1e-4 * logsumexp(logits)^2) is multiplied by its loss weight
(`loss_masks`: 1 on response tokens, times per-example / per-conversation weights), summed over
the whole global batch and divided by the global sum of loss weights. With gradient
accumulation every micro-batch divides by the weight of the WHOLE global batch, so the summed
gradients equal those of one big batch.
"""
from __future__ import annotations

from typing import Dict

import jax
import jax.numpy as jnp


def weighted_token_losses(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                          z_loss_weight: float) -> Dict[str, jax.Array]:
    """Sums of per-token losses.

    logits: float[B, L, V] (cast to float32 here); targets: int32[B, L] (negative = padding;
    ids >= V, e.g. image tokens, carry no logit); weights: float32[B, L] (0 where no loss). Returns float32 scalars 'ce_sum', 'z_sum'
    (already times `z_loss_weight`), 'weight_sum' and 'correct_sum' (argmax accuracy).
    """
    logits = logits.astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    # Clipped: out-of-range gathers would give NaN, and NaN * weight 0 is still NaN.
    safe = jnp.clip(targets, 0, logits.shape[-1] - 1)
    target_logit = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    ce = lse - target_logit
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return {
        "ce_sum": jnp.sum(ce * weights),
        "z_sum": z_loss_weight * jnp.sum(jnp.square(lse) * weights),
        "weight_sum": jnp.sum(weights),
        "correct_sum": jnp.sum(correct * weights),
    }


def chunked_token_losses(hidden: jax.Array, head: jax.Array, targets: jax.Array, weights: jax.Array,
                         z_loss_weight: float, chunk: int) -> Dict[str, jax.Array]:
    """weighted_token_losses of logits = hidden @ head, `chunk` tokens of the sequence at a time.

    hidden: [B, L, D] (the LLM's final normed states); head: [D, V] (the LM head's kernel in the
    compute dtype); targets, weights: [B, L]. Each chunk's float32 logits [B, chunk, V] are made,
    reduced to the four sums and dropped; the backward recomputes them chunk by chunk
    (jax.checkpoint), so neither the [B, L, V] logits nor their gradient is ever alive whole (for a
    36,864-token row and a 151,936-word vocabulary, 20.9 GiB each). The tail is padded with
    weight 0. Same sums as the unchunked function, up to float32 summation order."""
    b, length, _ = hidden.shape
    n = -(-length // chunk)
    pad = n * chunk - length

    def blocks(x, fill):  # [B, L, ...] -> [n, B, chunk, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        return jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def chunk_sums(x, t, w):
        logits = jnp.einsum("btd,dv->btv", x, head, preferred_element_type=jnp.float32)
        return weighted_token_losses(logits, t, w, z_loss_weight)

    def body(total, xs):
        return jax.tree.map(jnp.add, total, chunk_sums(*xs)), None

    zero = jnp.zeros((), jnp.float32)
    total, _ = jax.lax.scan(body, {k: zero for k in ("ce_sum", "z_sum", "weight_sum", "correct_sum")},
                            (blocks(hidden, 0), blocks(targets, -1), blocks(weights.astype(jnp.float32), 0)))
    return total


def normalised_loss(sums: Dict[str, jax.Array], global_weight: jax.Array) -> jax.Array:
    """(CE + z-loss) / global loss weight; `global_weight` is clamped to 1 for loss-free batches."""
    return (sums["ce_sum"] + sums["z_sum"]) / jnp.maximum(global_weight, 1.0)

"""One attention function over a structural mask, the ViT / pooling multi-head attention,
and the LLM's positions.

The mask travels through the layers as an `AttentionMask` (attention_mask.py: a few per-token
arrays); only the backend turns it into what it needs: the reference einsum builds the dense
bool[B, T, S] mask, the chunked backend (attention_chunked.py) one [block_q, block_k] tile at a time, the
library kernels (attention_kernels.py: TPU splash, GPU cuDNN) segment ids / sequence lengths.

Axis legend: B batch, T query length, S key length, N query heads, K kv heads,
G = N // K query heads per kv head, H head dim, D width.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from molmo_jax.model import attention_kernels as kernels
from molmo_jax.model.attention_chunked import BLOCK_K, BLOCK_Q, chunked_attention
from molmo_jax.model.attention_kernels import cudnn_attention, splash_attention
from molmo_jax.model.attention_mask import MASK_VALUE, AttentionMask
from molmo_jax.model.config import ATTENTION_IMPLEMENTATIONS as IMPLEMENTATIONS
from molmo_jax.model.layers import Dense, Names

# The platform the traced program will run on, when it is not JAX's default backend (tools/aot
# lowers TPU programs on a CPU machine: "auto" must pick the TPU kernels there, not CPU's).
_TARGET_PLATFORM: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("target_platform", default=None)


@contextlib.contextmanager
def target_platform(platform: str) -> Iterator[None]:
    """Trace attention for `platform` ("cpu", "gpu", "tpu") inside this block.

    jit caches a function's trace without this setting in its key, so use it around the first
    trace of freshly made functions (tools/aot builds its step functions anew for each compile)."""
    token = _TARGET_PLATFORM.set(platform)
    try:
        yield
    finally:
        _TARGET_PLATFORM.reset(token)


def current_platform() -> str:
    return _TARGET_PLATFORM.get() or jax.default_backend()


def check_implementation(name: str) -> str:
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {name!r}; choose from {list(IMPLEMENTATIONS)}")
    return name


def select_implementation(name: str, q: jax.Array, k: jax.Array, mask: Optional[AttentionMask],
                          platform: str) -> str:
    """The backend that runs `name` for these inputs on `platform` ("cpu", "gpu", "tpu").

    "auto": TPU splash attention, or GPU cuDNN flash attention, where the mask and inputs allow
    (attention_kernels.py says which masks do not); otherwise, on CPU, the chunked kernel as soon
    as it has more than one tile (it skips the tiles above the causal diagonal and was faster
    from 1024 tokens on, benchmarks/attention.py) and the einsum for one tile; on accelerators
    the einsum until one head's [T, S] logits pass AUTO_CHUNKED_LOGITS, where memory decides.
    An explicit "splash" or "cudnn" also falls back to the chunked kernel for the masks it
    cannot express (the KV-cache decode of generation, subsegments, bidirectional blocks).
    Unmasked attention (the ViT's crops, the pooling windows) takes the kernels only on CPU
    under "auto": there the einsum keeps every layer's [T, S] probabilities for the backward
    (1 GB of the 36M config's ViT gradient) and the chunked kernel recomputes them; on
    accelerators a few hundred tokens per crop are what XLA's fused einsum does well.
    """
    check_implementation(name)
    t, s = q.shape[1], k.shape[1]
    expressible = kernels.unsupported(mask, t, s) is None
    if name in ("splash", "cudnn"):
        return name if expressible else "chunked"
    if name != "auto":
        return name
    if mask is None and platform != "cpu":
        return "chunked" if t * s > AUTO_CHUNKED_LOGITS else "reference"
    if expressible and platform == "tpu":
        return "splash"
    if expressible and platform == "gpu" and kernels.cudnn_supports(q, k) is None:
        return "cudnn"
    limit = BLOCK_Q * BLOCK_K if platform == "cpu" else AUTO_CHUNKED_LOGITS
    return "chunked" if t * s > limit else "reference"


# Off CPU, one head's logits above this many entries (4096 x 4096) make "auto" pick the chunked kernel.
AUTO_CHUNKED_LOGITS = 4096 * 4096


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Optional[AttentionMask] = None,
                          *, implementation: str = "reference", float32_logits: bool = False) -> jax.Array:
    """softmax(q k^T / sqrt(H) masked) v, with grouped kv heads.

    q: [B, T, N, H]; k, v: [B, S, K, H] with N % K == 0 (kv head j serves query heads
    j*G .. j*G+G-1, as `repeat_interleave` does); mask: an AttentionMask, None = every query
    sees every key; implementation: one of IMPLEMENTATIONS (select_implementation). The softmax
    always runs in float32; `float32_logits` also computes q.k in float32 (the ViT and pooling
    do, spec §2.3). Returns [B, T, N, H] in v's dtype.

    The rows of padding queries and rows with no allowed key (all-padding examples) differ
    between backends; their outputs are never read and their gradients vanish because the
    loss never reaches them.
    """
    b, t, n, h = q.shape
    kv = k.shape[2]
    if n % kv:
        raise ValueError(f"{n} query heads cannot be grouped over {kv} kv heads")
    if float32_logits:
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    q = q / jnp.sqrt(jnp.asarray(h, q.dtype))
    platform = current_platform()
    name = select_implementation(implementation, q, k, mask, platform)
    if name == "chunked":  # skipping empty tiles behind a lax.cond pays on CPU only (attention_chunked.py)
        return chunked_attention(q, k, v, mask, skip_empty_tiles=platform == "cpu")
    if name == "splash":  # off TPU in the Pallas interpreter (slow; for tests)
        return splash_attention(q, k, v, mask, interpret=platform != "tpu")
    if name == "cudnn":
        if platform != "gpu":
            raise ValueError(f"attention implementation 'cudnn' needs a GPU; this is {platform!r}")
        return cudnn_attention(q, k, v, mask)
    return _reference_attention(q, k, v, mask)


def _reference_attention(q, k, v, mask):
    """The einsum over the dense mask; q already scaled. Shapes as dot_product_attention."""
    b, t, n, h = q.shape
    s, kv = k.shape[1], k.shape[2]
    q = q.reshape(b, t, kv, n // kv, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", q, k).astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask.dense(t, s)[:, None, None, :, :], logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(b, t, n, h)


class MultiHeadAttention(nnx.Module):
    """Bidirectional MHA with biases on q, k, v, o (ViT blocks and the 2x2 pooling).

    wq, wk, wv: float32[D_in, N, H] (+ bias [N, H]); wo: float32[N, H, D_out] (+ bias).
    """

    def __init__(self, d_in: int, num_heads: int, head_dim: int, d_out: int, names: Names, *,
                 implementation: str = "reference", rngs: nnx.Rngs):
        n_in, n_heads, n_out = names
        self.implementation = check_implementation(implementation)
        qkv_names = (n_in, n_heads, "head_dim")
        self.wq = Dense((d_in,), (num_heads, head_dim), qkv_names, use_bias=True, rngs=rngs)
        self.wk = Dense((d_in,), (num_heads, head_dim), qkv_names, use_bias=True, rngs=rngs)
        self.wv = Dense((d_in,), (num_heads, head_dim), qkv_names, use_bias=True, rngs=rngs)
        self.wo = Dense((num_heads, head_dim), (d_out,), (n_heads, "head_dim", n_out), use_bias=True,
                        rngs=rngs)

    def __call__(self, x_q: jax.Array, x_kv: jax.Array, dtype, key_valid: Optional[jax.Array] = None) -> jax.Array:
        """x_q: [B, T, D_in], x_kv: [B, S, D_in]; key_valid: bool[B, S] (None = every key) -> [B, T, D_out]."""
        q, k, v = self.wq(x_q, dtype), self.wk(x_kv, dtype), self.wv(x_kv, dtype)
        mask = None if key_valid is None else AttentionMask(causal=False, key_valid=key_valid)
        out = dot_product_attention(q, k, v, mask, implementation=self.implementation, float32_logits=True)
        return self.wo(out, dtype)


def default_positions(input_ids: jax.Array) -> jax.Array:
    """clamp(cumsum(input_ids != -1) - 1, 0), the official default (spec §2.1)."""
    valid = (input_ids != -1).astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(valid, axis=-1) - 1, 0)


def subsegment_positions(token_valid: jax.Array, subsegment_ids: jax.Array) -> jax.Array:
    """Positions when several conversations share one image (spec §4.6): a token of segment s
    counts the valid tokens at or before it whose segment is >= s, so every conversation
    continues right after the image block. bool[B, T], int[B, T] -> int32[B, T]."""
    t = token_valid.shape[1]
    seen = AttentionMask(key_valid=token_valid, subsegment_ids=subsegment_ids).dense(t, t)  # what each token attends to
    return jnp.maximum(jnp.sum(seen, axis=-1, dtype=jnp.int32) - 1, 0)

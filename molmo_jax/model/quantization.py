"""Weight-only storage of a frozen Dense kernel [*lead, *in, *out] and its dequantization.

    kernel, kernel_scale = quantize_kernel(w, n_in, n_out, "nf4")
    w_hat = dequantize(kernel, kernel_scale, jnp.bfloat16)       # what the matmul uses

base_dtype:
  float32   the kernel as is (kernel_scale None).
  bfloat16  cast (kernel_scale None).
  int8      symmetric per output channel: scale = max |w| over the input axes / 127 (1 for an
            all-zero channel); kernel_scale [*lead, *1s, *out] broadcasts over the input axes.
  nf4       QLoRA's 4-bit NormalFloat (Dettmers et al. 2023, appendix E: 16 code values in
            [-1, 1], 0 exact): block-wise absmax, blocks of NF4_BLOCK (64) consecutive values
            along the kernel's last input axis (the largest divisor <= 64 of its size where 64
            does not divide it: tiny models, the patch embedding's 588 inputs); one float32
            scale per block, kernel_scale [*lead, *in[:-1], in[-1] / block, *out].

nf4 uses qwix 0.1.8's own quantizer and dequantizer (qwix.quantize(..., "nf4", tiled_axes=...),
qwix.dequantize; the "lora" extra), not arithmetic of our own. Codes are stored as qwix stores
them, jnp.uint4, one code per element in the kernel's shape (so the kernel keeps its logical axis
names and sharding), which XLA packs two per byte in device memory (a compiled [N] uint4 output
is N/2 bytes, on CPU as on TPU); host numpy copies (ml_dtypes.uint4) hold one byte per code.
Not done: QLoRA's double quantization of the scales (they stay float32: 0.5 bits per parameter).
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

BASE_DTYPES = ("float32", "bfloat16", "int8", "nf4")
NF4_BLOCK = 64
NF4 = "nf4"


def nf4_block(size: int) -> int:
    """The block length along an axis of `size` values: 64, or its largest divisor below 64."""
    return max(d for d in range(1, min(size, NF4_BLOCK) + 1) if size % d == 0)


@functools.partial(jax.jit, static_argnums=(1,))
def _nf4_quantize(kernel: jax.Array, block_axis: int) -> Tuple[jax.Array, jax.Array]:
    # jitted so that qwix's per-element nearest-code search fuses instead of materialising
    # [size, 16] distances (eager, a 7B layer stack would need hundreds of GB).
    import qwix  # the "lora" extra; only nf4 needs it

    others = tuple(i for i in range(kernel.ndim) if i != block_axis)
    q = qwix.quantize(kernel, NF4, channelwise_axes=others,
                      tiled_axes={block_axis: nf4_block(kernel.shape[block_axis])})
    return q.qvalue, q.scale.astype(jnp.float32)


def quantize_kernel(kernel: jax.Array, n_in: int, n_out: int, base_dtype: str
                    ) -> Tuple[jax.Array, Optional[jax.Array]]:
    """(stored kernel, kernel_scale or None) of a float32 kernel [*lead, *in, *out] in base_dtype."""
    if base_dtype == "float32":
        return kernel, None
    if base_dtype == "bfloat16":
        return kernel.astype(jnp.bfloat16), None
    lead = kernel.ndim - n_in - n_out
    if base_dtype == NF4:
        return _nf4_quantize(kernel.astype(jnp.float32), lead + n_in - 1)
    if base_dtype != "int8":
        raise ValueError(f"base_dtype {base_dtype!r}: choose one of {', '.join(BASE_DTYPES)}")
    amax = jnp.max(jnp.abs(kernel), axis=tuple(range(lead, lead + n_in)), keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0).astype(jnp.float32)
    return jnp.clip(jnp.round(kernel / scale), -127, 127).astype(jnp.int8), scale


def dequantize(kernel: jax.Array, kernel_scale: Optional[jax.Array], dtype) -> jax.Array:
    """The kernel a stored (kernel, kernel_scale) stands for, in `dtype` (the compute dtype in a
    step; float32 for merging). nf4 codes (uint4) are looked up and scaled by qwix."""
    if kernel.dtype == jnp.uint4:
        import qwix

        return qwix.dequantize(qwix.QArray(kernel, kernel_scale.astype(dtype), None, NF4))
    kernel = kernel.astype(dtype)
    return kernel if kernel_scale is None else kernel * kernel_scale.astype(dtype)


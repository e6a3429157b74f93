"""Building blocks shared by the ViT, the connector and the LLM.

Every parameter is created through `param`, which attaches logical axis names
(`sharding_names`, stored by flax as the `out_sharding` metadata) that `sharding.py` maps
to mesh axes; nothing is sharded eagerly here, so the model stays free of any mesh.

Numerics (spec §2.6, §2.7): parameters are float32; matmuls run in the compute dtype;
norms, RoPE and softmax run in float32.

Axis legend: B batch, T length, D model width, N heads, K kv heads, H head dim, F mlp width.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from molmo_jax.model.quantization import dequantize

Names = Tuple[Optional[str], ...]
Initializer = Callable[[jax.Array, Sequence[int]], jax.Array]


def normal(stddev: float = 0.02) -> Initializer:
    return lambda key, shape: stddev * jax.random.normal(key, shape, jnp.float32)


def zeros(key, shape):
    del key
    return jnp.zeros(shape, jnp.float32)


def ones(key, shape):
    del key
    return jnp.ones(shape, jnp.float32)


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], names: Names) -> nnx.Param:
    """A float32 parameter with one logical axis name per dimension."""
    if len(names) != len(shape):
        raise ValueError(f"parameter of shape {tuple(shape)} needs {len(shape)} axis names, got {names}")
    return nnx.Param(init(rngs.params(), tuple(shape)), sharding_names=tuple(names), eager_sharding=False)


def stacked(make: Callable[[nnx.Rngs], nnx.Module], num: int, rngs: nnx.Rngs) -> nnx.Module:
    """`num` independently initialised copies of a module, with every parameter stacked
    on a new leading "layers" axis (what `scan_stack` iterates over)."""

    @nnx.split_rngs(splits=num)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(r: nnx.Rngs) -> nnx.Module:
        return make(r)

    return create(rngs)


ATTENTION_NAME = "attention"  # checkpoint_name of what "dots_and_attention" keeps of the attention
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # The weight matmuls (projections, MLPs) and what is named ATTENTION_NAME: the attention
    # output and the chunked kernel's row max / sum, so the backward pass neither reruns the
    # attention forward nor keeps the einsum's [T, S] probabilities; norms, RoPE and
    # activations are recomputed (MaxText's "minimal_with_context").
    "dots_and_attention": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(ATTENTION_NAME)),
}


def scan_stack(blocks: nnx.Module, body: Callable, carry, xs=None, *, start: int = 0,
               stop: Optional[int] = None, remat_policy: str = "none"):
    """Runs `carry, y = body(block_i, carry, x_i)` for the stacked blocks start..stop-1 with
    one `jax.lax.scan`, so compile time does not grow with depth.

    `xs` is a pytree with a leading axis of length stop-start (or None); the stacked ys are
    returned. `remat_policy` names an entry of REMAT_POLICIES.
    """
    if remat_policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat_policy {remat_policy!r}; choose from {sorted(REMAT_POLICIES)}")
    graphdef, state = nnx.split(blocks)
    n = jax.tree.leaves(state)[0].shape[0]
    stop = n if stop is None else stop
    if (start, stop) != (0, n):
        state = jax.tree.map(lambda a: a[start:stop], state)

    def step(c, inputs):
        layer_state, x = inputs
        return body(nnx.merge(graphdef, layer_state), c, x)

    if remat_policy != "none":
        step = jax.checkpoint(step, policy=REMAT_POLICIES[remat_policy], prevent_cse=False)
    return jax.lax.scan(step, carry, (state, xs))


class Dense(nnx.Module):
    """y = x . kernel (+ bias) (+ adapter(x)), contracting the trailing `len(in_shape)` axes of x.

    kernel: float32[*in_shape, *out_shape]; bias: float32[*out_shape]. model/lora.py may give a
    built model's Dense layers a LoRA `adapter` and store a frozen kernel int8 or nf4 with a
    float32 `kernel_scale` (weight-only quantization, model/quantization.py); both are None
    otherwise.
    """

    def __init__(self, in_shape: Tuple[int, ...], out_shape: Tuple[int, ...], names: Names, *,
                 use_bias: bool, rngs: nnx.Rngs, init: Optional[Initializer] = None):
        self.n_in = len(in_shape)
        self.n_out = len(out_shape)
        self.default_init = init is None  # drawn from normal(): rescale_to_fan_in may rescale it
        self.kernel = param(rngs, init or normal(), (*in_shape, *out_shape), names)
        self.bias = param(rngs, zeros, out_shape, names[self.n_in:]) if use_bias else None
        self.adapter = None
        self.kernel_scale = None

    def weight(self, dtype) -> jax.Array:
        """The kernel in the compute dtype (dequantized when stored int8 or nf4)."""
        return dequantize(self.kernel[...], None if self.kernel_scale is None else self.kernel_scale[...], dtype)

    def __call__(self, x: jax.Array, dtype) -> jax.Array:
        y = jnp.tensordot(x.astype(dtype), self.weight(dtype), axes=self.n_in)
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        if self.adapter is not None:
            y = y + self.adapter(x, dtype, self.n_in)
        return y


def rescale_to_fan_in(model: nnx.Module) -> None:
    """Multiplies every Dense kernel drawn from the default `normal()` (std 0.02) so its std becomes
    1 / sqrt(fan_in) (fan_in = the product of its input axes; stacked layers keep their leading
    axis). Same random draws, new scale: the "fan_in" init scheme of MolmoConfig."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, Dense) and node.default_init:
            shape = node.kernel[...].shape
            fan_in = math.prod(shape[len(shape) - node.n_in - node.n_out:len(shape) - node.n_out])
            node.kernel[...] = node.kernel[...] * ((fan_in ** -0.5) / 0.02)


class RMSNorm(nnx.Module):
    """OLMo RMSLayerNorm: statistics in float32, cast back, then scale (no bias)."""

    def __init__(self, dim: int, eps: float, names: Names, *, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, ones, (dim,), names)

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (self.scale[...] * y.astype(x.dtype)).astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm computed in float32 (the official ViT uses LayerNormFp32)."""

    def __init__(self, dim: int, eps: float, names: Names, *, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, ones, (dim,), names)
        self.bias = param(rngs, zeros, (dim,), names)

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
        return y.astype(x.dtype)


ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(ACTIVATIONS)}") from None


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x)), no biases. Used by the LLM FFN and the image projector.

    gate, up: float32[D_in, F]; down: float32[F, D_out].
    """

    def __init__(self, d_in: int, hidden: int, d_out: int, names: Tuple[str, str, str], *, rngs: nnx.Rngs):
        n_in, n_hidden, n_out = names
        self.gate = Dense((d_in,), (hidden,), (n_in, n_hidden), use_bias=False, rngs=rngs)
        self.up = Dense((d_in,), (hidden,), (n_in, n_hidden), use_bias=False, rngs=rngs)
        self.down = Dense((hidden,), (d_out,), (n_hidden, n_out), use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array, dtype) -> jax.Array:
        return self.down(jax.nn.silu(self.gate(x, dtype)) * self.up(x, dtype), dtype)


class Embedding(nnx.Module):
    """Token embedding = concat(embedding [E, D], new_embedding [128, D]) (spec §2.2).

    Kept as two tables so the frozen base rows and the trained extra rows stay separate
    (and so the official layout round-trips). Ids of -1 (padding) are looked up as 0.
    """

    def __init__(self, num_base: int, num_extra: int, dim: int, *, rngs: nnx.Rngs):
        self.embedding = param(rngs, normal(), (num_base, dim), ("vocab", "embed"))
        self.new_embedding = param(rngs, normal(), (num_extra, dim), (None, "embed"))

    def rescale(self, factor: float) -> None:
        """Multiplies both tables (init scheme "fan_in" brings them from N(0, 0.02) to N(0, 1))."""
        self.embedding[...] = self.embedding[...] * factor
        self.new_embedding[...] = self.new_embedding[...] * factor

    def __call__(self, ids: jax.Array, dtype) -> jax.Array:
        table = jnp.concatenate([self.embedding[...], self.new_embedding[...]], axis=0)
        return jnp.take(table, jnp.maximum(ids, 0), axis=0).astype(dtype)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array, scale=1.0) -> jax.Array:
    """Rotate-half RoPE in float32 ("llama" style, spec §2.6).

    x: [B, T, N, H]; positions: int32[B, T]; inv_freq: float32[H/2] (model/rope.py);
    scale: cos/sin multiplier (YaRN's attention factor; 1 otherwise). The angles are computed
    from the positions directly, giving the same values as the official sin/cos table of
    max_position_embeddings rows (which simply fails past its end).
    """
    head_dim = x.shape[-1]
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    xf = x.astype(jnp.float32)
    half = head_dim // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * (jnp.cos(emb) * scale) + rotated * (jnp.sin(emb) * scale)).astype(x.dtype)


def masked_dropout(x: jax.Array, key: jax.Array, rate: float, masked_rate: float,
                   mask: Optional[jax.Array]) -> jax.Array:
    """Residual dropout with a different rate where `mask` is set (official `Dropout` with
    `mask_p`): keep-prob 1-masked_rate at masked positions, 1-rate elsewhere.

    x: [B, T, D]; mask: bool[B, T] or None (then `rate` everywhere).
    """
    keep = jnp.full(x.shape[:2], 1.0 - rate, jnp.float32)
    if mask is not None:
        keep = jnp.where(mask, 1.0 - masked_rate, keep)
    keep = keep[..., None]
    draw = jax.random.bernoulli(key, jnp.broadcast_to(keep, x.shape))
    return jnp.where(draw, x / keep.astype(x.dtype), jnp.zeros_like(x))

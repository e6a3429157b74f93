"""OLMoE-style mixture-of-experts feed-forward (MolmoE-1B; spec §1.2, §2.6).

    h -> router logits (float32) -> softmax over E experts -> top-k (weights, experts)
      -> each chosen expert e: down_e( silu(h @ gate_e) * (h @ up_e) )
      -> y = sum_k weight_k * expert_k(h)

Routing follows transformers `OlmoeTopKRouter` and the official MolmoE remote code
(`MolmoeSparseMoeBlock`): softmax in float32 over all experts, top-k of the
probabilities, and the top-k weights renormalised to sum to 1 only when
`config.moe_renormalize` (OLMoE's `norm_topk_prob`). Neither release renormalises: the
MolmoE-1B-0924 remote code has no renormalisation at all, and transformers'
`convert_olmoe_weights_to_hf.py`, which wrote the OLMoE-1B-7B-0924 HF config, leaves
`norm_topk_prob` at its default False. So the presets keep `moe_renormalize=False`: the
top-k weights sum to less than 1.

Two dispatch modes (`config.moe_dispatch`):
  "sorted"   dropless: the T*k (token, expert) assignments are sorted by expert and the
             experts run as grouped matmuls (`grouped_matmul`: Megablox's Pallas kernel on
             TPU, `jax.lax.ragged_dot` elsewhere); nothing is dropped. This is the
             megablocks dMoE the released model was trained with.
  "capacity" GShard/Switch style: per sequence, each expert takes at most
             C = ceil(k * T * capacity_factor / E) assignments (top-1 choices first,
             then in token order); the rest are dropped and counted. Dispatch and
             combine are one-hot einsums, which XLA partitions over the "expert" mesh
             axis with all-to-alls (expert parallelism under plain GSPMD). "sorted" keeps
             the expert weights sharded on "expert" in memory; on TPU the kernel runs in a
             shard_map over evenly split rows with the layer's experts gathered (FSDP-like).

Cost (one MolmoE-1B layer, 4 x 2048 tokens, forward+backward, bfloat16): XLA lowers
`ragged_dot` as a dense product with all E experts' weights, E times the useful FLOPs, on
CPU, GPU and TPU alike; on an H200 (jax 0.11.2, benchmarks/moe.py) "sorted" took 256 ms and
"capacity" 13 / 16 / 24 ms at factors 1.0 / 1.25 / 2.0. Compiled for TPU, "sorted" with the
Megablox kernel costs 1.00x the useful FLOPs and "capacity" 1.25 2.6x (dispatch einsums).
So: "sorted" on TPU and for exact inference / parity, "capacity" (>= 1.25) for GPU training.

Auxiliary losses (both off in the release recipe, `moe_loss_weight = moe_zloss_weight = 0`):
  load_balance_loss = E * sum_e f_e * P_e, f_e the fraction of assignments routed to e,
                      P_e the mean router probability of e (Switch / megablocks; 1.0 when
                      perfectly balanced). Returned unweighted; the trainer multiplies by
                      `moe_load_balance_weight`.
  router_z_loss     = mean over tokens of logsumexp(router logits)^2 (ST-MoE), unweighted.
  dropped_tokens    = number of (token, expert) assignments dropped by the capacity limit.

Einsum axis legend: B batch, T length, N = B*T tokens, D d_model, E experts,
K top-k, F expert hidden width, C capacity per expert, A = N*K assignments.
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from molmo_jax.model.config import LLMConfig
from molmo_jax.model.layers import normal, param

DISPATCH_MODES = ("sorted", "capacity")


def _check_config(config: LLMConfig) -> None:
    if config.moe_num_experts <= 0 or config.moe_hidden_size <= 0:
        raise ValueError(f"MoE needs moe_num_experts > 0 and moe_hidden_size > 0, got "
                         f"{config.moe_num_experts} and {config.moe_hidden_size}")
    if not 0 < config.moe_top_k <= config.moe_num_experts:
        raise ValueError(f"moe_top_k must be in [1, moe_num_experts={config.moe_num_experts}], "
                         f"got {config.moe_top_k}")
    if config.moe_dispatch not in DISPATCH_MODES:
        raise ValueError(f"moe_dispatch must be one of {DISPATCH_MODES}, got {config.moe_dispatch!r}")
    if config.moe_dispatch == "capacity" and config.moe_capacity_factor <= 0:
        raise ValueError(f"moe_capacity_factor must be > 0, got {config.moe_capacity_factor}")


def expert_capacity(config: LLMConfig, tokens_per_group: int) -> int:
    """Slots per expert and sequence in "capacity" mode: ceil(k * T * factor / E), at least 1."""
    c = math.ceil(config.moe_top_k * tokens_per_group * config.moe_capacity_factor / config.moe_num_experts)
    return max(1, min(c, tokens_per_group))


def megablox_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, interpret: bool = False) -> jax.Array:
    """Grouped matmul with Megablox's Pallas TPU kernel (only the rows' own expert is computed).

    x: [A, K] rows sorted by group; w: [E, K, N]; group_sizes: int32[E] -> [A, N] in x.dtype.
    `interpret=True` runs the kernel in the Pallas interpreter (any platform; for tests)."""
    from jax.experimental.pallas.ops.tpu.megablox import ops as megablox  # noqa: PLC0415 (TPU only)

    rows, k = x.shape
    n = w.shape[-1]
    # Row tiles of 128 (bfloat16 packs 16 rows per sublane tile); k and n tiles of 128 or the
    # whole dimension when it is smaller. Padding rows lie past sum(group_sizes): not computed.
    tm = min(128, -(-rows // 16) * 16)
    padded = jnp.pad(x, ((0, (-rows) % tm), (0, 0)))
    out = megablox.gmm(padded, w, group_sizes, x.dtype, (tm, min(128, k), min(128, n)), None, None, False,
                       interpret)
    return out[:rows]


def megablox_sharded(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, interpret: bool = False) -> jax.Array:
    """`megablox_matmul` under the current mesh. A Mosaic kernel cannot be partitioned by
    XLA, so it runs in a shard_map: the sorted rows are split evenly over all devices (even
    compute), each device gets every expert's weights (gathered like FSDP) and the sizes of
    the groups inside its own slice of rows."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return megablox_matmul(x, w, group_sizes, interpret=interpret)
    axes = tuple(mesh.axis_names)
    rows = x.shape[0]
    padded = jnp.pad(x, ((0, (-rows) % mesh.size), (0, 0)))
    per_device = padded.shape[0] // mesh.size

    def local(x_slice, w, group_sizes):
        start = jax.lax.axis_index(axes) * per_device
        ends = jnp.cumsum(group_sizes)
        clip = lambda r: jnp.clip(r - start, 0, per_device)  # noqa: E731
        local_sizes = (clip(ends) - clip(ends - group_sizes)).astype(jnp.int32)
        return megablox_matmul(x_slice, w, local_sizes, interpret=interpret)

    out = jax.shard_map(local, in_specs=(P(axes), P(), P()), out_specs=P(axes), check_vma=False)(
        padded, w, group_sizes)
    return out[:rows]


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """out[r] = x[r] @ w[group of r] for rows sorted by group (x: [A, K], w: [E, K, N]).

    XLA lowers `jax.lax.ragged_dot` as a dense product with every group's weights followed by
    a select (E times the useful FLOPs, seen on CPU, GPU and in TPU compilations), so TPU
    uses the Megablox kernel; the platform is chosen when the program is lowered, which also
    holds for ahead-of-time TPU compilation on a CPU host."""
    return jax.lax.platform_dependent(x, w, group_sizes, tpu=megablox_sharded, default=jax.lax.ragged_dot)


class MoEFeedForward(nnx.Module):
    """Router + E SwiGLU experts with stacked weights.

    Parameters (float32, logical axis names):
      router: [D, E]    ("embed", None)      tiny; never split over experts
      gate:   [E, D, F] ("expert", "embed", "expert_mlp")
      up:     [E, D, F] ("expert", "embed", "expert_mlp")
      down:   [E, F, D] ("expert", "expert_mlp", "embed")
    """

    def __init__(self, config: LLMConfig, *, rngs: nnx.Rngs):
        _check_config(config)
        self.config = config
        d, e, f = config.d_model, config.moe_num_experts, config.moe_hidden_size
        # OLMo/OLMoE initialise every linear with N(0, 0.02) (init_fn="normal", init_std=0.02).
        self.router = param(rngs, normal(), (d, e), ("embed", None))
        self.gate = param(rngs, normal(), (e, d, f), ("expert", "embed", "expert_mlp"))
        self.up = param(rngs, normal(), (e, d, f), ("expert", "embed", "expert_mlp"))
        self.down = param(rngs, normal(), (e, f, d), ("expert", "expert_mlp", "embed"))

    def route(self, x: jax.Array) -> Tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """x: [..., D] -> (logits f32[..., E], probs f32[..., E], weights f32[..., K], experts int32[..., K])."""
        # The router runs in float32 whatever the compute dtype: it is D*E flops per token
        # (~1/400 of the experts') and keeps the top-k choice stable under bfloat16.
        logits = jnp.einsum("...d,de->...e", x.astype(jnp.float32), self.router[...])
        probs = jax.nn.softmax(logits, axis=-1)
        weights, experts = jax.lax.top_k(probs, self.config.moe_top_k)
        if self.config.moe_renormalize:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        return logits, probs, weights, experts.astype(jnp.int32)

    def __call__(self, x: jax.Array, dtype=None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        """x: [B, T, D] -> (y: [B, T, D] in x.dtype, aux: dict of float32 scalars).

        `dtype` is the compute dtype of the expert matmuls (default: x.dtype)."""
        if x.ndim != 3 or x.shape[-1] != self.config.d_model:
            raise ValueError(f"MoEFeedForward expects x of shape [B, T, {self.config.d_model}], got {x.shape}")
        dtype = x.dtype if dtype is None else dtype
        logits, probs, weights, experts = self.route(x)
        if self.config.moe_dispatch == "sorted":
            y = self._sorted(x.astype(dtype), weights, experts)
            dropped = jnp.zeros((), jnp.float32)
        else:
            y, dropped = self._capacity(x.astype(dtype), weights, experts)
        aux = {
            "load_balance_loss": self._load_balance_loss(probs, experts),
            "router_z_loss": jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1))),
            "dropped_tokens": dropped,
        }
        return y.astype(x.dtype), aux

    def _experts_ragged(self, xs: jax.Array, group_sizes: jax.Array) -> jax.Array:
        """xs: [A, D] sorted by expert, group_sizes: int32[E] -> [A, D] expert outputs."""
        dt = xs.dtype
        gate = grouped_matmul(xs, self.gate[...].astype(dt), group_sizes)
        up = grouped_matmul(xs, self.up[...].astype(dt), group_sizes)
        return grouped_matmul(jax.nn.silu(gate) * up, self.down[...].astype(dt), group_sizes)

    def _sorted(self, x: jax.Array, weights: jax.Array, experts: jax.Array) -> jax.Array:
        b, t, d = x.shape
        k, e = self.config.moe_top_k, self.config.moe_num_experts
        tokens = x.reshape(b * t, d)
        flat_experts = experts.reshape(-1)                       # [A], assignment a = token * K + slot
        order = jnp.argsort(flat_experts, stable=True)           # assignments grouped by expert
        group_sizes = jnp.bincount(flat_experts, length=e).astype(jnp.int32)
        out_sorted = self._experts_ragged(tokens[order // k], group_sizes)
        out = jnp.zeros_like(out_sorted).at[order].set(out_sorted).reshape(b * t, k, d)
        y = jnp.einsum("nkd,nk->nd", out, weights.reshape(b * t, k).astype(out.dtype),
                       preferred_element_type=jnp.float32)
        return y.reshape(b, t, d)

    def _capacity(self, x: jax.Array, weights: jax.Array, experts: jax.Array) -> Tuple[jax.Array, jax.Array]:
        b, t, d = x.shape
        k, e = self.config.moe_top_k, self.config.moe_num_experts
        cap = expert_capacity(self.config, t)
        # Priority: all top-1 choices of a sequence first, then top-2, ... (GShard), each in token order.
        onehot = jax.nn.one_hot(jnp.swapaxes(experts, 1, 2), e, dtype=jnp.int32)      # [B, K, T, E]
        position = jnp.cumsum(onehot.reshape(b, k * t, e), axis=1).reshape(b, k, t, e) - 1
        kept = onehot * (position < cap)                                                # [B, K, T, E]
        dropped = jnp.sum(onehot - kept).astype(jnp.float32)
        slot = jax.nn.one_hot(jnp.sum(position * kept, axis=-1), cap, dtype=x.dtype)  # [B, K, T, C]
        dt = x.dtype
        keep_k = kept.astype(dt)
        dispatch = jnp.einsum("bkte,bktc->btec", keep_k, slot)                          # [B, T, E, C]
        w = jnp.swapaxes(weights, 1, 2).astype(dt)                                       # [B, K, T]
        combine = jnp.einsum("bkte,bktc,bkt->btec", keep_k, slot, w)
        xe = jnp.einsum("btec,btd->becd", dispatch, x)
        h = jax.nn.silu(jnp.einsum("becd,edf->becf", xe, self.gate[...].astype(dt)))
        h = h * jnp.einsum("becd,edf->becf", xe, self.up[...].astype(dt))
        ye = jnp.einsum("becf,efd->becd", h, self.down[...].astype(dt))
        y = jnp.einsum("btec,becd->btd", combine, ye, preferred_element_type=jnp.float32)
        return y, dropped

    def _load_balance_loss(self, probs: jax.Array, experts: jax.Array) -> jax.Array:
        e = self.config.moe_num_experts
        counts = jnp.sum(jax.nn.one_hot(experts, e, dtype=jnp.float32), axis=tuple(range(experts.ndim)))
        fraction = counts / experts.size                                   # sums to 1
        mean_prob = jnp.mean(probs.reshape(-1, e), axis=0)                 # sums to 1
        return e * jnp.sum(fraction * mean_prob)

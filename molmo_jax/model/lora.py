"""LoRA adapters and a frozen, optionally quantized base, on the Dense layers of a built model.

    model = lora.build(model_config, LoraConfig(rank=8, alpha=16, targets=("llm_attention",)), rngs)
    # model_config: a MolmoConfig (Molmo) or a Molmo2Config (Molmo2), model/models.py
    y = dense(x)  # = x . W (+ bias) + (alpha / rank) * (x . a) . b on every targeted Dense

A targeted Dense (layers.Dense) gets `adapter`: a float32[*lead, *in_shape, R] (random normal,
std 1/sqrt(fan_in)) and b float32[*lead, R, *out_shape] (zeros, so a fresh adapter leaves the
model's outputs unchanged); *lead is the stacked "layers" axis of scanned blocks, so scan_stack
slices adapters per layer as it slices the kernels. a and b carry the kernel's logical axis
names (rank axis unnamed), so sharding.py shards them as their kernel. Parameter paths gain
".../<dense>/adapter/a" and ".../adapter/b"; every other path stays as in the plain model.

The base (every Dense kernel, lm_head and patch embedding included; norms, biases and
embeddings stay float32) is stored in `base_dtype`: float32, bfloat16, or weight-only int8
(one float32 scale per output channel) or nf4 (QLoRA's 4-bit NormalFloat, one float32 scale
per block of 64 inputs), with the scales in `kernel_scale` (model/quantization.py). Matmuls
dequantize into the compute dtype.

LoRA dropout (config.lora.dropout, the `dropout` of LoraConfig): x -> dropout -> a -> b on the
adapter path only, in training steps only. The trainer hands each forward pass a key
(set_dropout_keys, from its dropout stream, so resumed runs draw the same masks); a model
without keys, as in evaluation and inference, applies none, and dropout 0 sets none.

Why our own wrapper and not qwix 0.1.8 (tried first, on a Dense and on the scanned LLM):
qwix's LoraProvider adds adapters to a layer whose op it intercepts during a first call
(apply_lora_to_model). On one Dense it works; on our LLM it fails twice over: it sets an
nnx.Rngs on every module (module.qwix_rngs), whose scalar RngCount becomes the first leaf
that layers.scan_stack slices on the layer axis (IndexError), and with params-only scanning
it draws the adapter init inside the lax.scan trace ("TraceContextError: Cannot mutate
RngCount from a different trace level"); adapters made inside the scan body would also lack
the layer axis and live on the temporary per-layer module. nnx.LoRA covers 2-D kernels only,
while ours are [D, N, H] / [N, H, D] with a stacked layer axis. This wrapper is 1 attribute on
Dense plus this file, and keeps the trainer's pure-dict, frozen-split design unchanged.

Axis legend: R adapter rank; *lead the stacked layer axis (absent outside scanned blocks).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Dict, List, Mapping, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from molmo_jax.model.layers import Dense, normal, param, zeros
from molmo_jax.model.models import ModelConfig, build_model
from molmo_jax.model.quantization import BASE_DTYPES, dequantize, quantize_kernel
from molmo_jax.model.sharding import variable_names

# Named target groups (re.fullmatch over the Dense module paths "llm/blocks/attention/q", ...).
# Both families share the ViT and LLM modules, so their paths; "connector" is Molmo's connector
# or Molmo2's adapter (attention pooling wq/wk/wv/wo and the SwiGLU projector).
TARGET_PRESETS = {
    "llm_attention": r"llm/blocks/attention/(q|k|v|o)",
    "llm_mlp": r"llm/blocks/ffn/mlp/(gate|up|down)",
    "connector": r"(connector|adapter)/.*",
    "vit": r"vision/blocks/.*",
}
# The logits matmul reads lm_head's weight directly (float32 accumulation), so it takes no
# adapter; the patch embedding is the ViT's input layer, outside any target group's purpose.
NOT_ADAPTABLE = ("llm/lm_head",)
ADAPTER = "adapter"
# config.optimizer.frozen of a LoRA run: every parameter but the adapters (split_trainable).
FROZEN_BASE = rf"(?!.*/{ADAPTER}/[ab]$).*"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank R (0 = no LoRA: full fine-tuning), alpha (the adapter output is scaled alpha / R),
    dropout (the rate on the adapter's input in training, in [0, 1)), targets (preset names of
    TARGET_PRESETS or regexes over Dense paths), base_dtype (quantization.BASE_DTYPES)."""
    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Tuple[str, ...] = ("llm_attention", "llm_mlp")
    base_dtype: str = "float32"

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_dict(cls, d: Mapping) -> "LoraConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown key(s) {sorted(unknown)}; the keys are "
                             f"{', '.join(f.name for f in dataclasses.fields(cls))}")
        return cls(**{k: tuple(v) if k == "targets" else v for k, v in d.items()})


class Adapter(nnx.Module):
    """delta(x) = scale * (dropout(x) . a) . b, in the compute dtype. a: [*in_shape, R];
    b: [R, *out_shape]. dropout applies only while `dropout_key` (uint32[2] key data, set by
    set_dropout_keys for one training forward) is set."""

    def __init__(self, a: nnx.Param, b: nnx.Param, scale: float, dropout: float = 0.0):
        self.a, self.b, self.scale, self.dropout = a, b, scale, dropout
        self.dropout_key = None

    def __call__(self, x: jax.Array, dtype, n_in: int) -> jax.Array:
        x = x.astype(dtype)
        if self.dropout_key is not None:
            keep = 1.0 - self.dropout
            draw = jax.random.bernoulli(jax.random.wrap_key_data(self.dropout_key[...]), keep, x.shape)
            x = jnp.where(draw, x / jnp.asarray(keep, dtype), jnp.zeros_like(x))
        h = jnp.tensordot(x, self.a[...].astype(dtype), axes=n_in)
        return jnp.tensordot(h, self.b[...].astype(dtype), axes=1) * jnp.asarray(self.scale, dtype)


def dense_layers(model: nnx.Module) -> Dict[str, Dense]:
    """{"llm/blocks/attention/q": Dense, ...}: every Dense of a model, by module path."""
    return {"/".join(map(str, path)): node for path, node in nnx.iter_graph(model) if isinstance(node, Dense)}


def dense_shapes(model_config: ModelConfig) -> Dict[str, Tuple[int, int]]:
    """{Dense path: (input axes, output axes) of its kernel} of the plain model (abstract, no arrays)."""
    model = nnx.eval_shape(lambda: build_model(model_config, rngs=nnx.Rngs(0)))
    return {path: (dense.n_in, dense.n_out) for path, dense in dense_layers(model).items()}


def target_paths(paths: Sequence[str], targets: Sequence[str]) -> List[str]:
    """The adaptable Dense paths the targets select; a target selecting none raises ValueError
    naming it and the paths there are."""
    candidates = [p for p in paths if p not in NOT_ADAPTABLE]
    chosen = set()
    for target in targets:
        regex = TARGET_PRESETS.get(target, target)
        try:
            hits = [p for p in candidates if re.fullmatch(regex, p)]
        except re.error as e:
            raise ValueError(f"target {target!r} is not a regex ({e})") from None
        if not hits:
            raise ValueError(f"target {target!r} matches no layer of this model; use a preset "
                             f"({', '.join(TARGET_PRESETS)}) or a regex over: {', '.join(candidates)}")
        chosen.update(hits)
    return sorted(chosen)


def add_adapters(model: nnx.Module, config: LoraConfig, rngs: nnx.Rngs) -> List[str]:
    """Gives every targeted Dense of `model` an Adapter, in place; returns their paths."""
    layers = dense_layers(model)
    chosen = target_paths(list(layers), config.targets)
    for path in chosen:
        dense = layers[path]
        shape, names = dense.kernel.shape, variable_names(dense.kernel)
        lead = len(shape) - dense.n_in - dense.n_out
        split = lead + dense.n_in
        fan_in = math.prod(shape[lead:split])
        a = param(rngs, normal(fan_in ** -0.5), (*shape[:split], config.rank), (*names[:split], None))
        b = param(rngs, zeros, (*shape[:lead], config.rank, *shape[split:]),
                  (*names[:lead], None, *names[split:]))
        dense.adapter = nnx.data(Adapter(a, b, config.scale, config.dropout))  # Dense sets it None (static)
    return chosen


def set_dropout_keys(model: nnx.Module, key: jax.Array) -> None:
    """Arms the dropout of every adapter of `model` (a model merged inside a training step) with
    its own key derived from `key`: one per adapter, split along the stacked layer axis so that
    scan_stack hands each layer its own. No-op without adapters or with dropout 0, so that such a
    step computes exactly what it did before dropout existed."""
    adapted = [d for d in dense_layers(model).values() if d.adapter is not None and d.adapter.dropout > 0]
    for i, dense in enumerate(adapted):
        adapter = dense.adapter
        lead = adapter.a.ndim - dense.n_in - 1
        k = jax.random.fold_in(key, i)
        keys = jax.random.split(k, adapter.a.shape[:lead]) if lead else k
        adapter.dropout_key = nnx.data(nnx.Variable(jax.random.key_data(keys)))


def quantize_base(model: nnx.Module, base_dtype: str) -> None:
    """Stores every Dense kernel of `model` in base_dtype, in place (see quantize_kernel)."""
    if base_dtype == "float32":
        return
    for dense in dense_layers(model).values():
        names = variable_names(dense.kernel)
        kernel, scale = quantize_kernel(dense.kernel[...], dense.n_in, dense.n_out, base_dtype)
        dense.kernel = nnx.Param(kernel, sharding_names=names, eager_sharding=False)
        if scale is not None:
            lead = len(names) - dense.n_in - dense.n_out
            scale_names = (*names[:lead], *(None,) * dense.n_in, *names[lead + dense.n_in:])
            dense.kernel_scale = nnx.data(nnx.Param(scale, sharding_names=scale_names, eager_sharding=False))


def build(model_config: ModelConfig, config: LoraConfig, rngs: nnx.Rngs) -> nnx.Module:
    """The config's model (Molmo or Molmo2) with adapters on the targets (none with rank 0) and
    its base stored in config.base_dtype (rank 0 + int8: weight-only quantized inference). The
    base init draws the same numbers as the plain model alone. `model.lora_config` records `config`."""
    model = build_model(model_config, rngs=rngs)
    if config.enabled:
        add_adapters(model, config, rngs)
    quantize_base(model, config.base_dtype)
    model.lora_config = config
    return model


def _get(tree: Mapping, path: str):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def base_params(plain: Dict, axes: Mapping[str, Tuple[int, int]], base_dtype: str) -> Dict:
    """A plain model's float32 param dict (pure nested dict) in the layout of a LoRA model's
    base: each Dense kernel in base_dtype, plus its kernel_scale for int8; no adapters.
    axes: dense_shapes of the model."""
    out = jax.tree.map(lambda x: x, plain)  # new dicts, the same leaves
    for path, (n_in, n_out) in axes.items():
        node = _get(out, path)
        node["kernel"], scale = quantize_kernel(node["kernel"], n_in, n_out, base_dtype)
        if scale is not None:
            node["kernel_scale"] = scale
    return out


def adapter_delta(a: jax.Array, b: jax.Array, kernel_shape: Sequence[int], n_in: int, scale: float) -> jax.Array:
    """scale * a . b as a float32 kernel [*lead, *in, *out] (a: [*lead, *in, R], b: [*lead, R, *out])."""
    lead = len(kernel_shape) - n_in - (b.ndim - a.ndim + n_in)
    lead_shape, rank = tuple(kernel_shape[:lead]), a.shape[-1]
    a2 = jnp.reshape(a.astype(jnp.float32), (*lead_shape, -1, rank))
    b2 = jnp.reshape(b.astype(jnp.float32), (*lead_shape, rank, -1))
    return scale * jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST).reshape(kernel_shape)


def merged_params(params: Dict, axes: Mapping[str, Tuple[int, int]], scale: float) -> Dict:
    """The plain model's float32 param dict that a LoRA model's (pure dict, base + adapters)
    stands for: each kernel dequantized plus scale * a . b of its adapter; adapters and scales
    dropped. axes: dense_shapes of the model; scale: LoraConfig.scale."""
    out = jax.tree.map(lambda x: x, params)
    for path, (n_in, _) in axes.items():
        node = _get(out, path)
        kernel = dequantize(node["kernel"], node.pop("kernel_scale", None), jnp.float32)
        adapter = node.pop(ADAPTER, None)
        if adapter is not None:
            kernel = kernel + adapter_delta(adapter["a"], adapter["b"], kernel.shape, n_in, scale)
        node["kernel"] = kernel
    return out

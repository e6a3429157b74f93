"""The image encoder: OpenAI CLIP ViT-L/14-336 as the releases use it, SigLIP as an option.

CLIP (spec §2.3): patches -> Linear (no bias) -> prepend CLS -> + positional embedding ->
pre_ln -> pre-LN residual blocks with quick_gelu; no post-LN. SigLIP: patch bias, no CLS,
no pre_ln, gelu_tanh. Blocks are stacked and scanned; the encoder returns the outputs of
the requested blocks and stops after the deepest one it needs (the release's last block
never influences any output).

Axis legend: N crops (batch x crops flattened), P patches (+ CLS), D patch vector (14*14*3,
ordered (dy, dx, c)), W width, F mlp width.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from molmo_jax.model.attention import MultiHeadAttention
from molmo_jax.model.config import VisionConfig
from molmo_jax.model.layers import Dense, LayerNorm, activation, normal, param, scan_stack, stacked
from molmo_jax.model.sharding import with_logical_constraint


class ViTBlock(nnx.Module):
    """Pre-LN residual block: x += wo(MHA(ln1(x))); x += w2(act(w1(ln2(x))))."""

    def __init__(self, config: VisionConfig, *, attention: str = "reference", rngs: nnx.Rngs):
        w = config.width
        self.act = activation(config.activation)
        self.attention_norm = LayerNorm(w, config.norm_eps, ("vit_embed",), rngs=rngs)
        self.attention = MultiHeadAttention(w, config.num_heads, config.head_dim, w,
                                            ("vit_embed", "vit_heads", "vit_embed"), implementation=attention,
                                            rngs=rngs)
        self.ffn_norm = LayerNorm(w, config.norm_eps, ("vit_embed",), rngs=rngs)
        self.w1 = Dense((w,), (config.mlp_dim,), ("vit_embed", "vit_mlp"), use_bias=True, rngs=rngs)
        self.w2 = Dense((config.mlp_dim,), (w,), ("vit_mlp", "vit_embed"), use_bias=True, rngs=rngs)

    def __call__(self, x: jax.Array, dtype) -> jax.Array:
        h = self.attention_norm(x)
        x = x + self.attention(h, h, dtype)
        return x + self.w2(self.act(self.w1(self.ffn_norm(x), dtype)), dtype)


class VisionTransformer(nnx.Module):
    def __init__(self, config: VisionConfig, *, dtype="float32", remat_policy: str = "none",
                 attention: str = "reference", rngs: nnx.Rngs):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.remat_policy = remat_policy
        w = config.width
        self.patch_embedding = Dense((config.patch_dim,), (w,), ("patch", "vit_embed"),
                                     use_bias=config.patch_bias, rngs=rngs)
        self.class_embedding = param(rngs, normal(), (w,), ("vit_embed",)) if config.use_cls_token else None
        self.positional_embedding = param(rngs, normal(), (config.num_positions, w), (None, "vit_embed"))
        self.pre_ln = LayerNorm(w, config.norm_eps, ("vit_embed",), rngs=rngs) if config.pre_ln else None
        self.blocks = stacked(lambda r: ViTBlock(config, attention=attention, rngs=r), config.num_layers, rngs)

    def rescale_position_embeddings(self, factor: float) -> None:
        """Multiplies the positional and class embeddings (init scheme "fan_in" brings them from
        N(0, 0.02) to the unit scale of the patch embeddings they are added to)."""
        self.positional_embedding[...] = self.positional_embedding[...] * factor
        if self.class_embedding is not None:
            self.class_embedding[...] = self.class_embedding[...] * factor

    def resolve_layers(self, layers: Optional[Sequence[int]]) -> List[int]:
        """Block indices (0-based, of the num_layers outputs) for possibly negative `layers`."""
        n = self.config.num_layers
        layers = self.config.feature_layers if layers is None else layers
        out = []
        for layer in layers:
            if not -n <= layer < n:
                raise ValueError(f"ViT layer {layer} out of range for {n} blocks")
            out.append(layer % n)
        return out

    def __call__(self, patches: jax.Array, layers: Optional[Sequence[int]] = None) -> List[jax.Array]:
        """patches: float32[N, P, D] -> the outputs of blocks `layers` (default
        config.feature_layers; negative counts from the last block), each [N, P(+1), W]
        in the compute dtype."""
        wanted = self.resolve_layers(layers)
        x = self.patch_embedding(patches, self.dtype)
        if self.class_embedding is not None:
            cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (x.shape[0], 1, x.shape[-1]))
            x = jnp.concatenate([cls, x], axis=1)
        if x.shape[1] != self.config.num_positions:
            raise ValueError(f"ViT got {x.shape[1]} tokens per crop, its positional embedding has "
                             f"{self.config.num_positions}")
        x = x + self.positional_embedding[...].astype(self.dtype)[None]
        if self.pre_ln is not None:
            x = self.pre_ln(x)

        def body(block, h, _):
            return block(with_logical_constraint(h, ("act_batch", None, None)), self.dtype), None

        # Scan segment by segment up to each wanted block: a constant number of scans
        # regardless of depth, and nothing after the deepest wanted block is computed.
        outputs, start = {}, 0
        for stop in sorted(set(wanted)):
            x, _ = scan_stack(self.blocks, body, x, start=start, stop=stop + 1,
                              remat_policy=self.remat_policy)
            outputs[stop], start = x, stop + 1
        return [outputs[i] for i in wanted]

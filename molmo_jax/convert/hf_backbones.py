"""Initialise the towers from transformers checkpoints, as stage-1 training starts (spec §5.2):
the ViT from CLIPVisionModel / SiglipVisionModel (or a full CLIPModel / SiglipModel) and the
LLM from Qwen2ForCausalLM (Molmo-7B-D / 72B) or Olmo2ForCausalLM (OLMo-7B-1024-preview,
the post-norm, full-width QK-norm backbone of Molmo-7B-O).

    vision = vision_params_from_hf(clip_state_dict, config.vision)   # pure dict for model.vision
    llm = llm_params_from_hf(qwen2_state_dict, config.llm)            # pure dict for model.llm
    init_from_backbones(model, vision_state_dict=..., llm_state_dict=...)  # in place

Mapping (spec §7.2): q/k/v/out_proj -> wq/wk/wv/wo, fc1/fc2 -> w1/w2, layer_norm1/2 ->
attention_norm / ffn_norm, pre_layrnorm -> pre_ln, patch conv [W, 3, p, p] -> Linear on
(dy, dx, c)-ordered patches; the blocks past `num_layers` (CLIP's 24th), post_layernorm, the
SigLIP pooling head and a CLIP/SigLIP text tower are deliberately dropped (keys may carry
the `vision_model.` prefix of hub files). LLM: q/k/v_proj
-> q/k/v, o_proj -> o, gate/up/down_proj -> gate/up/down, embed_tokens -> embedding,
lm_head -> lm_head; pre-norm uses input_layernorm / post_attention_layernorm, post-norm
(OLMo2) post_attention_layernorm / post_feedforward_layernorm. `new_embedding` (the 128
image/special rows) and the connector have no backbone counterpart and keep their init.
Values are numpy float32 arrays; anything unexpected or misshaped raises CheckpointError.
"""
from __future__ import annotations

import re
from typing import Dict, List, Mapping, Optional

import jax.numpy as jnp
from flax import nnx

from molmo_jax.convert.links import (CheckpointError, Link, Path, abstract_state, linear_link, norm_links,
                                     same_link, tensors_to_params, vector_link)
from molmo_jax.convert.moe_weights import moe_links
from molmo_jax.model.config import LLMConfig, VisionConfig
from molmo_jax.model.llm import LLM
from molmo_jax.model.vit import VisionTransformer


def _patch_link(hf: str, ours: Path, vc: VisionConfig) -> Link:
    """Conv weight [W, 3, p, p] <-> kernel [p*p*3, W] on (dy, dx, c)-ordered patch vectors."""
    p, w = vc.patch_size, vc.width

    def to_ours(conv):
        return [conv.transpose(0, 2, 3, 1).reshape(w, -1).T]

    def to_hf(kernel):
        return [kernel.T.reshape(w, p, p, 3).transpose(0, 3, 1, 2)]

    return Link((hf,), (ours,), None, to_ours, to_hf, lambda s: [(w, 3, p, p)])


def _attention_links(hf: str, ours: Path, layer: int, d: int, heads: int, head_dim: int,
                     names=("q_proj", "k_proj", "v_proj", "out_proj"), our_names=("wq", "wk", "wv", "wo"),
                     kv_heads: Optional[int] = None, bias: bool = True) -> List[Link]:
    kv_heads = kv_heads or heads
    links = []
    for name, our, n in zip(names[:3], our_names[:3], (heads, kv_heads, kv_heads)):
        links.append(linear_link(f"{hf}.{name}.weight", ours + (our, "kernel"), layer, (d,), (n, head_dim)))
        if bias:
            links.append(vector_link(f"{hf}.{name}.bias", ours + (our, "bias"), layer, (n, head_dim)))
    links.append(linear_link(f"{hf}.{names[3]}.weight", ours + (our_names[3], "kernel"), layer,
                             (heads, head_dim), (d,)))
    if bias:
        links.append(same_link(f"{hf}.{names[3]}.bias", ours + (our_names[3], "bias"), layer))
    return links


def vision_links_hf(vc: VisionConfig, prefix: str = "") -> List[Link]:
    """transformers CLIP / SigLIP vision keys (`prefix` = "vision_model." in hub files of
    CLIPModel / SiglipModel and older CLIPVisionModel files) -> VisionTransformer."""
    w = vc.width
    links = [_patch_link(f"{prefix}embeddings.patch_embedding.weight", ("patch_embedding", "kernel"), vc),
             same_link(f"{prefix}embeddings.position_embedding.weight", ("positional_embedding",))]
    if vc.patch_bias:
        links.append(same_link(f"{prefix}embeddings.patch_embedding.bias", ("patch_embedding", "bias")))
    if vc.use_cls_token:
        links.append(same_link(f"{prefix}embeddings.class_embedding", ("class_embedding",)))
    if vc.pre_ln:
        links += norm_links(f"{prefix}pre_layrnorm", ("pre_ln",), None, True)
    for i in range(vc.num_layers):
        p, b = f"{prefix}encoder.layers.{i}", ("blocks",)
        links += _attention_links(f"{p}.self_attn", b + ("attention",), i, w, vc.num_heads, vc.head_dim)
        links += norm_links(f"{p}.layer_norm1", b + ("attention_norm",), i, True)
        links += norm_links(f"{p}.layer_norm2", b + ("ffn_norm",), i, True)
        links += [linear_link(f"{p}.mlp.fc1.weight", b + ("w1", "kernel"), i, (w,), (vc.mlp_dim,)),
                  same_link(f"{p}.mlp.fc1.bias", b + ("w1", "bias"), i),
                  linear_link(f"{p}.mlp.fc2.weight", b + ("w2", "kernel"), i, (vc.mlp_dim,), (w,)),
                  same_link(f"{p}.mlp.fc2.bias", b + ("w2", "bias"), i)]
    return links


def vision_params_from_hf(state_dict: Mapping, config: VisionConfig) -> Dict:
    """CLIPVisionModel / SiglipVisionModel (or CLIPModel / SiglipModel) state dict -> the
    pure parameter dict of `VisionTransformer(config)`."""
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in state_dict) else ""
    layer = re.compile(re.escape(prefix) + r"encoder\.layers\.(\d+)\.")

    def dropped(key: str) -> bool:
        """The parts of a CLIP/SigLIP file Molmo does not use."""
        m = layer.match(key)
        if m:
            return int(m.group(1)) >= config.num_layers
        tower = key[len(prefix):] if key.startswith(prefix) else ""
        return (tower.startswith(("post_layernorm.", "head.", "embeddings.position_ids"))
                or key.startswith(("text_model.", "logit_", "visual_projection.", "text_projection.")))

    abstract = abstract_state(lambda: VisionTransformer(config, rngs=nnx.Rngs(0)))
    return tensors_to_params(state_dict, vision_links_hf(config, prefix), abstract, dropped=dropped)


def llm_links_hf(c: LLMConfig, moe_layout: str = "per_expert") -> List[Link]:
    """transformers Qwen2ForCausalLM (pre-norm) / Olmo2ForCausalLM (post-norm) /
    OlmoeForCausalLM (pre-norm, experts in `moe_layout`, see convert/moe_weights.py) keys -> LLM."""
    if c.block_type not in ("dense", "moe"):
        raise CheckpointError(f"unknown block_type {c.block_type!r}")
    d, hd, f = c.d_model, c.head_dim, c.mlp_hidden_size // 2
    links = [same_link("model.embed_tokens.weight", ("embed", "embedding")),
             same_link("model.norm.weight", ("ln_f", "scale")),
             linear_link("lm_head.weight", ("lm_head", "kernel"), None, (d,), (c.embedding_size,))]
    attn_norm, ff_norm = (("post_attention_layernorm", "post_feedforward_layernorm") if c.norm_after
                          else ("input_layernorm", "post_attention_layernorm"))
    for i in range(c.n_layers):
        p, b = f"model.layers.{i}", ("blocks",)
        links += _attention_links(f"{p}.self_attn", b + ("attention",), i, d, c.n_heads, hd,
                                  names=("q_proj", "k_proj", "v_proj", "o_proj"), our_names=("q", "k", "v", "o"),
                                  kv_heads=c.n_kv_heads, bias=False)
        if c.qkv_bias:
            links += [vector_link(f"{p}.self_attn.{n}_proj.bias", b + ("attention", n, "bias"), i, (heads, hd))
                      for n, heads in (("q", c.n_heads), ("k", c.n_kv_heads), ("v", c.n_kv_heads))]
        if c.qk_norm:
            links += [same_link(f"{p}.self_attn.q_norm.weight", b + ("attention", "q_norm", "scale"), i),
                      same_link(f"{p}.self_attn.k_norm.weight", b + ("attention", "k_norm", "scale"), i)]
        links += [same_link(f"{p}.{attn_norm}.weight", b + ("attn_norm", "scale"), i),
                  same_link(f"{p}.{ff_norm}.weight", b + ("ff_norm", "scale"), i)]
        if c.block_type == "moe":
            links += moe_links(c, f"{p}.mlp", b + ("ffn",), i, moe_layout)
            continue
        mlp = b + ("ffn", "mlp")
        links += [linear_link(f"{p}.mlp.gate_proj.weight", mlp + ("gate", "kernel"), i, (d,), (f,)),
                  linear_link(f"{p}.mlp.up_proj.weight", mlp + ("up", "kernel"), i, (d,), (f,)),
                  linear_link(f"{p}.mlp.down_proj.weight", mlp + ("down", "kernel"), i, (f,), (d,))]
    return links


def llm_params_from_hf(state_dict: Mapping, config: LLMConfig) -> Dict:
    """Qwen2ForCausalLM / Olmo2ForCausalLM / OlmoeForCausalLM state dict -> pure parameter dict
    of `LLM(config)` without `embed/new_embedding` (no counterpart; keep the model's init)."""
    abstract = abstract_state(lambda: LLM(config, rngs=nnx.Rngs(0)))
    del abstract["embed"]["new_embedding"]
    # transformers >= 5 fuses the hub's per-expert OLMoE tensors when it loads them.
    moe_layout = "fused" if any(k.endswith(".mlp.experts.gate_up_proj") for k in state_dict) else "per_expert"
    return tensors_to_params(state_dict, llm_links_hf(config, moe_layout), abstract,
                             dropped=lambda k: k.endswith("rotary_emb.inv_freq"))


def init_from_backbones(model, *, vision_state_dict: Optional[Mapping] = None,
                        llm_state_dict: Optional[Mapping] = None) -> None:
    """Overwrites the ViT and/or LLM parameters of a Molmo in place; the connector and
    `new_embedding` keep their initialisation (spec §5.2)."""
    updates = {}
    if vision_state_dict is not None:
        updates["vision"] = vision_params_from_hf(vision_state_dict, model.config.vision)
    if llm_state_dict is not None:
        updates["llm"] = llm_params_from_hf(llm_state_dict, model.config.llm)
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)
    _merge(pure, updates)
    state.replace_by_pure_dict(pure)
    nnx.update(model, state)


def _merge(tree: Dict, updates: Mapping) -> None:
    for key, value in updates.items():
        if isinstance(value, Mapping):
            _merge(tree[key], value)
        else:
            tree[key] = jnp.asarray(value)

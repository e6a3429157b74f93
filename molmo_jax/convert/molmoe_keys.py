"""The Hugging Face layout of MolmoE-1B-0924: key map and config.json translation.

The spec has no MolmoE key names and the hub is not reachable from here, so they were read from the checkpoint's remote code
`modeling_molmoe.py` / `config_molmoe.py` / `config.json`, as mirrored in the public GitHub
repository ChulanZhang/molmo_hf (molmo/models/, first commit 9d81608; a second, independent copy
in the public code index has the same module tree). The module tree fixes the state-dict keys:
  model.transformer.wte.{embedding, new_embedding}, model.transformer.ln_f.weight
  model.transformer.blocks.N.attn.{att_proj, attn_out}.weight   (att_proj rows: q, k, v)
  model.transformer.blocks.N.attn.{attn_norm, q_norm, k_norm}.weight
  model.transformer.blocks.N.mlp.ff_norm.weight
  model.transformer.blocks.N.mlp.{gate, experts.I.gate_proj, experts.I.up_proj, experts.I.down_proj}.weight
  lm_head.weight   [embedding_size, D]   (top level, not model.transformer.ff_out as in 7B-D)
  model.vision_backbone.*                (same names as Molmo-7B-D)
Its `MolmoeSparseMoeBlock` does softmax(float32) -> top-k with no renormalisation, like
transformers' OLMoE with `norm_topk_prob=False`. A one-off check (that code is not vendored
here): the remote code's MolmoForCausalLM built from `config_to_hf(TINY_MOE)` has
exactly the key set and shapes this module writes (except `pad_embed`, which that code sizes
from the default 1024-wide ViT whatever the config says), and with our exported weights its
text-only logits equal ours to 2.4e-7. Summing these shapes for the MOLMOE_1B preset
gives 7,221,875,712 parameters (spec §7.1), which tests/test_moe.py checks.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping

from molmo_jax.convert import molmo_keys
from molmo_jax.convert.links import CheckpointError, Link, Path, fused_linear_link, linear_link, same_link
from molmo_jax.convert.moe_weights import moe_links
from molmo_jax.model.config import LLMConfig, MolmoConfig


def llm_links(c: LLMConfig, hf: str, ours: Path) -> List[Link]:
    """The MolmoE-1B-0924 HF LLM layout (module docstring); `hf` = "model.transformer"."""
    d, nh, nkv, hd = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim
    links = [same_link(f"{hf}.wte.embedding", ours + ("embed", "embedding")),
             same_link(f"{hf}.wte.new_embedding", ours + ("embed", "new_embedding")),
             same_link(f"{hf}.ln_f.weight", ours + ("ln_f", "scale")),
             linear_link("lm_head.weight", ours + ("lm_head", "kernel"), None, (d,), (c.embedding_size,))]
    blocks = ours + ("blocks",)
    att = blocks + ("attention",)
    for i in range(c.n_layers):
        p = f"{hf}.blocks.{i}"
        links.append(fused_linear_link(f"{p}.attn.att_proj.weight", [att + (n, "kernel") for n in ("q", "k", "v")], i,
                                   (d,), [(nh, hd), (nkv, hd), (nkv, hd)]))
        if c.qk_norm:
            links += [same_link(f"{p}.attn.q_norm.weight", att + ("q_norm", "scale"), i),
                      same_link(f"{p}.attn.k_norm.weight", att + ("k_norm", "scale"), i)]
        links += [linear_link(f"{p}.attn.attn_out.weight", att + ("o", "kernel"), i, (nh, hd), (d,)),
                  same_link(f"{p}.attn.attn_norm.weight", blocks + ("attn_norm", "scale"), i),
                  same_link(f"{p}.mlp.ff_norm.weight", blocks + ("ff_norm", "scale"), i)]
        links += moe_links(c, f"{p}.mlp", blocks + ("ffn",), i, "per_expert")
    return links


def key_map(config: MolmoConfig) -> List[Link]:
    """The links of the whole model: this LLM layout, the dense releases' vision tower and connector."""
    p = molmo_keys.PREFIX
    return (llm_links(config.llm, p + "transformer", ("llm",))
            + molmo_keys.vision_links(config.vision, p + "vision_backbone.image_vit", ("vision",))
            + molmo_keys.connector_links(config, p + "vision_backbone", ("connector",)))


# ----------------------------------------------------------------------------- config.json

_VISION_KEYS = ("vision_backbone", "vit_layers", "image_pooling_2d", "image_pooling_h", "image_pooling_w",
                "image_padding_embed", "image_projector", "rope_impl", "activation_type", "include_bias")


def config_from_hf(cfg: Mapping) -> MolmoConfig:
    """The MolmoE remote-code config.json (OLMo-style keys: d_model, n_layers, mlp_ratio,
    moe_*) -> MolmoConfig. Vision and connector fields are read by `molmo_keys.config_from_hf`."""
    where = "config.json (MolmoE)"
    for key in ("d_model", "n_layers", "n_heads", "vocab_size", "moe_num_experts", "moe_top_k"):
        if key not in cfg:
            raise CheckpointError(f"{where}: missing required key {key!r}")
    if cfg.get("head_dim") not in (None, cfg["d_model"] // cfg["n_heads"]):
        raise CheckpointError(f"{where}: head_dim={cfg['head_dim']} must be d_model / n_heads")
    if not cfg.get("moe_dropless", True):
        raise CheckpointError(f"{where}: moe_dropless=false is not supported (the release is dropless)")
    hidden = cfg.get("mlp_hidden_size") or cfg.get("mlp_ratio", 4) * cfg["d_model"]
    ext = {k: cfg[k] for k in _VISION_KEYS if k in cfg}
    dense_view = {
        "hidden_size": cfg["d_model"], "num_hidden_layers": cfg["n_layers"],
        "num_attention_heads": cfg["n_heads"], "num_key_value_heads": cfg.get("n_kv_heads"),
        "intermediate_size": hidden, "attention_layer_norm": cfg.get("attention_layer_norm", False),
        **({"tiny_golden_extension": ext} if ext else {}),
        **{k: cfg[k] for k in ("vocab_size", "embedding_size", "additional_vocab_size", "layer_norm_eps",
                               "layer_norm_type", "rope_theta", "max_position_embeddings", "qkv_bias",
                               "norm_after", "clip_qkv", "weight_tying") if k in cfg}}
    config = molmo_keys.config_from_hf(dense_view)
    llm = dataclasses.replace(
        config.llm, block_type="moe", moe_num_experts=cfg["moe_num_experts"], moe_top_k=cfg["moe_top_k"],
        moe_hidden_size=hidden // 2, moe_renormalize=False, moe_dispatch="sorted",
        moe_capacity_factor=cfg.get("moe_capacity_factor", 1.25),
        moe_load_balance_weight=cfg.get("moe_loss_weight") or 0.0,
        moe_router_z_weight=cfg.get("moe_zloss_weight") or 0.0)
    return config.replace(llm=llm)


def config_to_hf(config: MolmoConfig) -> Dict:
    """MolmoConfig (block_type "moe") -> a MolmoE remote-code config.json that
    `config_from_hf` reads back equal."""
    c = config.llm
    if c.moe_hidden_size * 2 != c.mlp_hidden_size or c.moe_renormalize:
        raise CheckpointError("the MolmoE config.json needs moe_hidden_size == mlp_hidden_size / 2 and "
                              "no top-k renormalisation")
    dense = molmo_keys.config_to_hf(config.replace(llm=dataclasses.replace(c, block_type="dense")))
    ext = dense.pop("tiny_golden_extension", {})
    return {
        "architectures": ["OLMoForCausalLM"], "model_type": "molmo",
        "auto_map": {"AutoConfig": "config_molmoe.MolmoConfig",
                     "AutoModelForCausalLM": "modeling_molmoe.MolmoForCausalLM"},
        "d_model": c.d_model, "n_layers": c.n_layers, "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads,
        "head_dim": None, "mlp_ratio": c.mlp_hidden_size // c.d_model if c.mlp_hidden_size % c.d_model == 0 else None,
        "mlp_hidden_size": None if c.mlp_hidden_size % c.d_model == 0 else c.mlp_hidden_size,
        "block_type": "moe", "moe_num_experts": c.moe_num_experts, "moe_top_k": c.moe_top_k,
        "moe_dropless": True, "moe_capacity_factor": c.moe_capacity_factor,
        "moe_loss_weight": c.moe_load_balance_weight, "moe_zloss_weight": c.moe_router_z_weight,
        "layer_norm_type": "rms", "layer_norm_eps": c.norm_eps,
        **{k: dense[k] for k in ("vocab_size", "embedding_size", "additional_vocab_size", "rope_theta",
                                 "max_position_embeddings", "qkv_bias", "norm_after", "clip_qkv", "weight_tying",
                                 "attention_layer_norm", "torch_dtype")},
        **ext,  # vision / connector fields, only where they differ from the release (CLIP ViT-L/14-336)
    }

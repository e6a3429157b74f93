"""The official Hugging Face layout of the dense Molmo releases (Molmo-7B-D, Molmo-7B-O, Molmo-72B;
spec §7): the key map and the config.json translation.

    key_map(config)        # every official key <-> one slice of our parameters
    config_from_hf(cfg)    # config.json dict -> MolmoConfig
    config_to_hf(config)   # MolmoConfig -> config.json dict that config_from_hf reads back equal

Every official key maps to exactly one slice of our parameters and back: fused `att_proj`
[q; k; v] rows and `ff_proj` [up; gate] rows are split, PyTorch Linear weights [out, in] are
transposed to kernels [in, ..., out], per-block tensors are stacked on the leading "layers"
axis. Keys carry the `model.` prefix. The vision and connector links are shared by the MolmoE
layout (molmoe_keys.py).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping

from molmo_jax.convert.links import (CheckpointError, Link, Path, fused_linear_link, fused_vector_link,
                                     linear_link, mha_links, norm_links, same_link)
from molmo_jax.model.config import (CLIP_VIT_L14_336, ConnectorConfig, LLMConfig, MolmoConfig,
                                    VisionConfig)

PREFIX = "model."

# ----------------------------------------------------------------------------- links


def vision_links(vc: VisionConfig, hf: str, ours: Path) -> List[Link]:
    """The official `image_vit` layout (CLIP-style names, also used for SigLIP)."""
    w = vc.width
    links = [linear_link(f"{hf}.patch_embedding.weight", ours + ("patch_embedding", "kernel"), None,
                     (vc.patch_dim,), (w,)),
             same_link(f"{hf}.positional_embedding", ours + ("positional_embedding",))]
    if vc.patch_bias:
        links.append(same_link(f"{hf}.patch_embedding.bias", ours + ("patch_embedding", "bias")))
    if vc.use_cls_token:
        links.append(same_link(f"{hf}.class_embedding", ours + ("class_embedding",)))
    if vc.pre_ln:
        links += norm_links(f"{hf}.pre_ln", ours + ("pre_ln",), None, True)
    blocks = ours + ("blocks",)
    for i in range(vc.num_layers):
        p = f"{hf}.transformer.resblocks.{i}"
        links += mha_links(f"{p}.attention", blocks + ("attention",), i, w, vc.num_heads, vc.head_dim, w)
        links += norm_links(f"{p}.attention_norm", blocks + ("attention_norm",), i, True)
        links += norm_links(f"{p}.ffn_norm", blocks + ("ffn_norm",), i, True)
        links += [linear_link(f"{p}.feed_forward.w1.weight", blocks + ("w1", "kernel"), i, (w,), (vc.mlp_dim,)),
                  same_link(f"{p}.feed_forward.w1.bias", blocks + ("w1", "bias"), i),
                  linear_link(f"{p}.feed_forward.w2.weight", blocks + ("w2", "kernel"), i, (vc.mlp_dim,), (w,)),
                  same_link(f"{p}.feed_forward.w2.bias", blocks + ("w2", "bias"), i)]
    return links


def connector_links(config: MolmoConfig, hf: str, ours: Path) -> List[Link]:
    vc = config.vision
    feat, h = vc.width * len(vc.feature_layers), config.projector_hidden
    links = mha_links(f"{hf}.image_pooling_2d", ours + ("pooling",), None, feat, vc.num_heads, vc.head_dim,
                       vc.width)
    links += [linear_link(f"{hf}.image_projector.w1.weight", ours + ("projector", "gate", "kernel"), None,
                      (vc.width,), (h,)),
              linear_link(f"{hf}.image_projector.w3.weight", ours + ("projector", "up", "kernel"), None,
                      (vc.width,), (h,)),
              linear_link(f"{hf}.image_projector.w2.weight", ours + ("projector", "down", "kernel"), None,
                      (h,), (config.llm.d_model,))]
    if config.connector.padding_embed == "pad_and_partial_pad":
        links.append(same_link(f"{hf}.pad_embed", ours + ("pad_embed",)))
    return links


def llm_links(c: LLMConfig, hf: str, ours: Path) -> List[Link]:
    """The dense LLM (`model.transformer`) of the official layout."""
    if c.block_type != "dense":
        raise CheckpointError(f"block_type {c.block_type!r}: the dense Molmo layout maps dense blocks only")
    d, nh, nkv, hd, f = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.mlp_hidden_size // 2
    links = [same_link(f"{hf}.wte.embedding", ours + ("embed", "embedding")),
             same_link(f"{hf}.wte.new_embedding", ours + ("embed", "new_embedding")),
             same_link(f"{hf}.ln_f.weight", ours + ("ln_f", "scale")),
             linear_link(f"{hf}.ff_out.weight", ours + ("lm_head", "kernel"), None, (d,), (c.embedding_size,))]
    blocks = ours + ("blocks",)
    att = blocks + ("attention",)
    qkv_shapes = [(nh, hd), (nkv, hd), (nkv, hd)]
    for i in range(c.n_layers):
        p = f"{hf}.blocks.{i}"
        qkv = [att + (n, "kernel") for n in ("q", "k", "v")]
        links.append(fused_linear_link(f"{p}.att_proj.weight", qkv, i, (d,), qkv_shapes))
        if c.qkv_bias:
            links.append(fused_vector_link(f"{p}.att_proj.bias", [att + (n, "bias") for n in ("q", "k", "v")], i,
                                       qkv_shapes))
        if c.qk_norm:
            links += [same_link(f"{p}.q_norm.weight", att + ("q_norm", "scale"), i),
                      same_link(f"{p}.k_norm.weight", att + ("k_norm", "scale"), i)]
        mlp = blocks + ("ffn", "mlp")
        links += [linear_link(f"{p}.attn_out.weight", att + ("o", "kernel"), i, (nh, hd), (d,)),
                  same_link(f"{p}.attn_norm.weight", blocks + ("attn_norm", "scale"), i),
                  same_link(f"{p}.ff_norm.weight", blocks + ("ff_norm", "scale"), i),
                  # ff_proj rows are [up; gate] (spec §7.2), the opposite of the usual order.
                  fused_linear_link(f"{p}.ff_proj.weight", [mlp + ("up", "kernel"), mlp + ("gate", "kernel")], i,
                                (d,), [(f,), (f,)]),
                  linear_link(f"{p}.ff_out.weight", mlp + ("down", "kernel"), i, (f,), (d,))]
    return links


def key_map(config: MolmoConfig) -> List[Link]:
    """The links of the whole model: LLM, vision tower and connector."""
    return (llm_links(config.llm, PREFIX + "transformer", ("llm",))
            + vision_links(config.vision, PREFIX + "vision_backbone.image_vit", ("vision",))
            + connector_links(config, PREFIX + "vision_backbone", ("connector",)))


# ----------------------------------------------------------------------------- config.json

_POOLING_NAMES = {"attention-meanq": "attention_meanq", "attention_meanq": "attention_meanq",
                  "attention": "attention"}


def _require(d: Mapping, key: str, expected, where: str) -> None:
    value = d.get(key, expected)
    if value != expected:
        raise CheckpointError(f"{where}: {key}={value!r} is not supported (expected {expected!r})")


def config_from_hf(cfg: Mapping) -> MolmoConfig:
    """The HF Molmo config.json dict -> MolmoConfig. The released checkpoints imply the
    CLIP ViT-L/14-336 vision tower; a `tiny_golden_extension` block overrides vision and
    connector settings (the golden test models)."""
    where = "config.json"
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if key not in cfg:
            raise CheckpointError(f"{where}: missing required key {key!r}")
    _require(cfg, "layer_norm_type", "rms", where)
    _require(cfg, "clip_qkv", None, where)
    _require(cfg, "weight_tying", False, where)
    _require(cfg, "tie_word_embeddings", False, where)
    d, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    llm = LLMConfig(
        d_model=d, n_layers=cfg["num_hidden_layers"], n_heads=heads,
        n_kv_heads=cfg.get("num_key_value_heads") or heads, head_dim=d // heads,
        mlp_hidden_size=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
        embedding_size=cfg.get("embedding_size") or cfg["vocab_size"],
        additional_vocab_size=cfg.get("additional_vocab_size", 128), norm_eps=cfg.get("layer_norm_eps", 1e-5),
        rope_theta=cfg.get("rope_theta", 10000.0), max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        qkv_bias=bool(cfg.get("qkv_bias", False)), qk_norm=bool(cfg.get("attention_layer_norm", False)),
        norm_after=bool(cfg.get("norm_after", False)))
    ext = cfg.get("tiny_golden_extension")
    if ext is None:
        return MolmoConfig(vision=CLIP_VIT_L14_336, connector=ConnectorConfig(), llm=llm)
    where = "config.json tiny_golden_extension"
    _require(ext, "rope_impl", "llama", where)
    _require(ext, "activation_type", "swiglu", where)
    _require(ext, "image_projector", "mlp", where)
    _require(ext, "include_bias", False, where)
    pooling = ext.get("image_pooling_2d", "attention-meanq")
    if pooling not in _POOLING_NAMES:
        raise CheckpointError(f"{where}: image_pooling_2d={pooling!r} is not supported ({sorted(_POOLING_NAMES)})")
    connector = ConnectorConfig(pooling=_POOLING_NAMES[pooling], pool_h=ext.get("image_pooling_h", 2),
                                pool_w=ext.get("image_pooling_w", 2),
                                padding_embed=ext.get("image_padding_embed") or "none")
    vision = CLIP_VIT_L14_336
    vb = ext.get("vision_backbone")
    if vb is not None:
        if vb.get("image_num_key_value_heads", vb["image_num_heads"]) != vb["image_num_heads"]:
            raise CheckpointError(f"{where}: image_num_key_value_heads must equal image_num_heads")
        vision = dataclasses.replace(
            CLIP_VIT_L14_336, image_size=tuple(vb["image_default_input_size"]), patch_size=vb["image_patch_size"],
            width=vb["image_emb_dim"], num_heads=vb["image_num_heads"], head_dim=vb["image_head_dim"],
            num_layers=vb["image_num_layers"], mlp_dim=vb["image_mlp_dim"],
            activation=vb.get("image_mlp_activations", "quick_gelu"), norm_eps=vb.get("image_norm_eps", 1e-5))
        if vb.get("image_num_pos", vision.num_positions) != vision.num_positions:
            raise CheckpointError(f"{where}: image_num_pos={vb['image_num_pos']} but the image size and patch "
                                  f"give {vision.num_positions} positions")
    vision = dataclasses.replace(vision, feature_layers=tuple(ext.get("vit_layers", vision.feature_layers)))
    return MolmoConfig(vision=vision, connector=connector, llm=llm)


_HF_VISION_FIELDS = ("image_size", "patch_size", "width", "num_heads", "head_dim", "num_layers", "mlp_dim",
                     "activation", "norm_eps", "feature_layers")


def config_to_hf(config: MolmoConfig) -> Dict:
    """MolmoConfig -> an HF Molmo config.json dict that `config_from_hf` reads back equal."""
    c = config.llm
    if c.block_type != "dense" or c.head_dim * c.n_heads != c.d_model:
        raise CheckpointError("the HF Molmo config describes dense models with head_dim = d_model / n_heads only")
    out = {
        "architectures": ["MolmoForCausalLM"], "model_type": "molmo",
        "auto_map": {"AutoConfig": "config_molmo.MolmoConfig",
                     "AutoModelForCausalLM": "modeling_molmo.MolmoForCausalLM"},
        "vocab_size": c.vocab_size, "embedding_size": c.embedding_size, "hidden_size": c.d_model,
        "intermediate_size": c.mlp_hidden_size, "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
        "max_position_embeddings": c.max_position_embeddings, "initializer_range": 0.02, "use_cache": True,
        "layer_norm_eps": c.norm_eps, "layer_norm_type": "rms", "rope_theta": c.rope_theta, "clip_qkv": None,
        "qkv_bias": c.qkv_bias, "weight_tying": False, "use_position_ids": True, "tie_word_embeddings": False,
        "attention_layer_norm": c.qk_norm, "norm_after": c.norm_after, "torch_dtype": "float32",
        "additional_vocab_size": c.additional_vocab_size,
    }
    vc, cc = config.vision, config.connector
    if vc != CLIP_VIT_L14_336 or cc != ConnectorConfig():
        if dataclasses.replace(CLIP_VIT_L14_336, **{k: getattr(vc, k) for k in _HF_VISION_FIELDS}) != vc:
            raise CheckpointError("only CLIP-style vision towers (CLS token, pre_ln, no patch bias) can be "
                                  "described in an HF Molmo config.json")
        out["tiny_golden_extension"] = {
            "vit_layers": list(vc.feature_layers),
            "image_pooling_2d": "attention-meanq" if cc.pooling == "attention_meanq" else cc.pooling,
            "image_pooling_h": cc.pool_h, "image_pooling_w": cc.pool_w,
            "image_padding_embed": None if cc.padding_embed == "none" else cc.padding_embed,
            "image_projector": "mlp", "rope_impl": "llama", "activation_type": "swiglu", "include_bias": False,
            "vision_backbone": {
                "image_default_input_size": list(vc.image_size), "image_patch_size": vc.patch_size,
                "image_emb_dim": vc.width, "image_num_heads": vc.num_heads,
                "image_num_key_value_heads": vc.num_heads, "image_head_dim": vc.head_dim,
                "image_num_layers": vc.num_layers, "image_mlp_dim": vc.mlp_dim,
                "image_mlp_activations": vc.activation, "image_num_pos": vc.num_positions,
                "image_norm_eps": vc.norm_eps},
        }
    if config.connector.projector_hidden not in (None, c.mlp_hidden_size // 2):
        raise CheckpointError("the HF Molmo config has no field for a projector width other than "
                              "intermediate_size / 2")
    return out


# ----------------------------------------------------------------------------- files

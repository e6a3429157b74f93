"""What an exported folder says about the model: config.json files and the key links of the
official Molmo layout and of the transformers backbones (Qwen2 / OLMo2 / OLMoE CausalLM and
CLIPVisionModel). Keys and layouts: spec §7; the links themselves live in the key maps
(molmo_keys, molmoe_keys, hf_backbones) and run in both directions.
"""
from __future__ import annotations

from typing import Dict, List, Mapping

import numpy as np

from data_pipelines.multicrop import CropConfig
from molmo_jax.convert import hf_backbones
from molmo_jax.convert.hf_molmo import config_to_hf
from molmo_jax.convert.links import CheckpointError, Link, constant_link, prefixed_links
from molmo_jax.model.config import MolmoConfig

# transformers loads the official remote code from these repositories (auto_map "repo--module.Class").
OFFICIAL_CODE = {"dense": "allenai/Molmo-7B-D-0924", "olmo": "allenai/Molmo-7B-O-0924", "moe": "allenai/MolmoE-1B-0924"}


class ExportError(CheckpointError):
    """Bad export/import input: the message names the folder, file, step or flag."""


def official_code_repo(config: MolmoConfig) -> str:
    """The hub repository whose remote code runs this kind of Molmo."""
    c = config.llm
    return OFFICIAL_CODE["moe" if c.block_type == "moe" else "olmo" if c.norm_after else "dense"]


def code_prefix(config: MolmoConfig, local_code: bool) -> str:
    """What precedes "module.Class" in an auto_map: "" when the folder carries the remote code
    (--remote-code), else the official hub repository ("allenai/Molmo-7B-D-0924--")."""
    return "" if local_code else f"{official_code_repo(config)}--"


def molmo_config_json(config: MolmoConfig, dtype: str, local_code: bool = False) -> Dict:
    """The official config.json; auto_map names the folder's own code or the hub's."""
    out = config_to_hf(config)
    prefix = code_prefix(config, local_code)
    out["auto_map"] = {k: f"{prefix}{v}" for k, v in out.get("auto_map", {}).items()}
    out["torch_dtype"] = dtype
    return out


def check_official_geometry(config: MolmoConfig, crop: CropConfig) -> None:
    """Refuses crop geometries the official MolmoImageProcessor cannot express: it pools 2x2
    patches (hard-coded), takes square crops of the ViT input size and reproduces the release's
    image-mask layout (spec §3)."""
    vc, cc = config.vision, config.connector
    problems = []
    if (cc.pool_h, cc.pool_w) != (2, 2) or crop.pool != 2:
        problems.append(f"pooling {cc.pool_h}x{cc.pool_w} (the official processor pools 2x2)")
    if vc.image_size[0] != vc.image_size[1]:
        problems.append(f"non-square ViT input {tuple(vc.image_size)}")
    if (crop.crop_size, crop.patch_size) != (vc.image_size[0], vc.patch_size):
        problems.append(f"crop {crop.crop_size} px / patch {crop.patch_size} px recorded for a ViT of "
                        f"{vc.image_size[0]} px / {vc.patch_size} px")
    if not crop.legacy_mask:
        problems.append("legacy_mask=False (the official processor writes the release's image masks)")
    if problems:
        raise ExportError("the official Molmo processor cannot express this model's image preprocessing: "
                          + "; ".join(problems))


def preprocessor_config_json(config: MolmoConfig, crop: CropConfig, local_code: bool = False) -> Dict:
    """The official preprocessor_config.json with the crop geometry the model was trained with
    (`crop`: crop size, max crops, overlap margins, normalisation; 2x2 pooling, checked)."""
    check_official_geometry(config, crop)
    vc, cc, prefix = config.vision, config.connector, code_prefix(config, local_code)
    return {
        "auto_map": {"AutoImageProcessor": f"{prefix}image_preprocessing_molmo.MolmoImageProcessor",
                     "AutoProcessor": f"{prefix}preprocessing_molmo.MolmoProcessor"},
        "base_image_input_size": list(vc.image_size), "do_normalize": True,
        "image_mean": list(crop.mean), "image_std": list(crop.std),
        "image_padding_mask": True, "image_patch_size": vc.patch_size,
        "image_processor_type": "MolmoImageProcessor",
        "image_token_length_h": -(-vc.grid[0] // cc.pool_h), "image_token_length_w": -(-vc.grid[1] // cc.pool_w),
        "max_crops": crop.max_crops, "overlap_margins": list(crop.overlap_margins),
        "processor_class": "MolmoProcessor",
    }


def processor_config_json(config: MolmoConfig, local_code: bool = False) -> Dict:
    """processor_config.json, which AutoProcessor reads to find MolmoProcessor."""
    return {"auto_map": {"AutoProcessor": f"{code_prefix(config, local_code)}preprocessing_molmo.MolmoProcessor"},
            "processor_class": "MolmoProcessor"}


def clip_vision_config_json(config: MolmoConfig, dtype: str) -> Dict:
    vc = config.vision
    if not (vc.use_cls_token and vc.pre_ln and not vc.patch_bias and vc.image_size[0] == vc.image_size[1]
            and vc.num_heads * vc.head_dim == vc.width):
        raise ExportError(f"--format torch-backbones: the ViT ({vc.kind}) is not a CLIP vision tower (needs a CLS "
                          f"token, pre-LN, no patch bias, square images, heads * head_dim = width)")
    act = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}[vc.activation]
    return {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", "hidden_size": vc.width,
            "intermediate_size": vc.mlp_dim, "num_attention_heads": vc.num_heads, "num_hidden_layers": vc.num_layers,
            "image_size": vc.image_size[0], "patch_size": vc.patch_size, "num_channels": 3, "hidden_act": act,
            "layer_norm_eps": vc.norm_eps, "attention_dropout": 0.0, "projection_dim": vc.width,
            "torch_dtype": dtype}


def clip_vision_links(config: MolmoConfig) -> List[Link]:
    """CLIPVisionModel keys; Molmo drops CLIP's post_layernorm, exported as the identity
    (hidden_states are unaffected, last_hidden_state/pooler_output see an untrained LN)."""
    w = config.vision.width
    links = prefixed_links(hf_backbones.vision_links_hf(config.vision), "vision_model.", ("vision",))
    return links + [constant_link("vision_model.post_layernorm.weight", np.ones((w,), np.float32)),
                    constant_link("vision_model.post_layernorm.bias", np.zeros((w,), np.float32))]


def causal_lm_config_json(config: MolmoConfig, dtype: str, special_ids: Mapping[str, int]) -> Dict:
    """Qwen2 (pre-norm dense), OLMo2 (post-norm, QK-norm) or OLMoE (MoE) config.json.
    special_ids: bos_token_id / eos_token_id / pad_token_id of the model's tokenizer (without
    them transformers falls back to the architecture's defaults, e.g. OLMo2's eos 100257,
    which may lie outside the vocabulary)."""
    c = config.llm
    common = {**special_ids, "vocab_size": c.embedding_size, "hidden_size": c.d_model, "num_hidden_layers": c.n_layers,
              "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
              "hidden_act": "silu", "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.norm_eps,
              "rope_theta": c.rope_theta, "tie_word_embeddings": False, "attention_dropout": 0.0,
              "torch_dtype": dtype}
    if c.block_type == "moe":
        if c.norm_after or not c.qk_norm or c.qkv_bias:
            raise ExportError("--format torch-backbones: an MoE LLM exports as OLMoE, which is pre-norm with "
                              "QK-norm and no q/k/v bias")
        return {"architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", **common,
                "intermediate_size": c.moe_hidden_size, "num_experts": c.moe_num_experts,
                "num_experts_per_tok": c.moe_top_k, "norm_topk_prob": c.moe_renormalize, "clip_qkv": None,
                "attention_bias": False, "router_aux_loss_coef": c.moe_load_balance_weight}
    if c.norm_after:
        if c.qkv_bias:
            raise ExportError("--format torch-backbones: a post-norm LLM exports as OLMo2, which has no q/k/v bias")
        return {"architectures": ["Olmo2ForCausalLM"], "model_type": "olmo2", **common,
                "intermediate_size": c.mlp_hidden_size // 2, "attention_bias": False}
    if c.qk_norm:
        raise ExportError("--format torch-backbones: a pre-norm dense LLM with full-width QK-norm has no "
                          "transformers counterpart (Qwen2 has no QK-norm, OLMo2 is post-norm)")
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **common,
            "intermediate_size": c.mlp_hidden_size // 2, "use_sliding_window": False}


def causal_lm_links(config: MolmoConfig) -> List[Link]:
    """Our LLM as a transformers CausalLM. The 128 `new_embedding` rows (image/special tokens)
    have no place in a text-only model and are left out; tensors the architecture always has
    but this model lacks are written as their identity values (zero biases, unit QK-norms)."""
    c = config.llm
    links = prefixed_links(hf_backbones.llm_links_hf(c, "per_expert"), "", ("llm",))
    for i in range(c.n_layers):
        p = f"model.layers.{i}.self_attn"
        if not c.qkv_bias and not c.norm_after and c.block_type == "dense":  # Qwen2 always has q/k/v biases
            links += [constant_link(f"{p}.{n}_proj.bias", np.zeros((heads * c.head_dim,), np.float32))
                      for n, heads in (("q", c.n_heads), ("k", c.n_kv_heads), ("v", c.n_kv_heads))]
        if c.norm_after and not c.qk_norm:  # OLMo2 always normalises q and k
            links += [constant_link(f"{p}.q_norm.weight", np.ones((c.n_heads * c.head_dim,), np.float32)),
                      constant_link(f"{p}.k_norm.weight", np.ones((c.n_kv_heads * c.head_dim,), np.float32))]
    return links

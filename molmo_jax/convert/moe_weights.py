"""Mixture-of-experts checkpoint layouts, and the MolmoE-1B-0924 Hugging Face layout.

Our MoE parameters (`molmo_jax.model.moe.MoEFeedForward`, stacked on "layers" in the LLM):
  router [D, E], gate [E, D, F], up [E, D, F], down [E, F, D]

Expert layouts understood by `moe_links` (PyTorch `nn.Linear.weight` is [out, in]):
  "per_expert"  HF hub files of OLMoE-1B-7B-0924 and MolmoE-1B-0924:
                {p}.gate.weight [E, D]; {p}.experts.{i}.gate_proj.weight [F, D],
                {p}.experts.{i}.up_proj.weight [F, D], {p}.experts.{i}.down_proj.weight [D, F]
  "fused"       transformers >= 5 in memory (`OlmoeExperts`; its loader fuses the hub tensors):
                {p}.gate.weight [E, D]; {p}.experts.gate_up_proj [E, 2F, D] (gate rows, then up);
                {p}.experts.down_proj [E, D, F]
  "megablocks"  official training checkpoints (spec §7.1, [M] `convert_hf_to_molmo.py`; the
                inverse of transformers' `convert_olmoe_weights_to_hf.py`):
                {p}.router.layer.weight [E, D]; {p}.experts.mlp.w1 [E*F, D] (gate_proj of
                expert 0, 1, ...); {p}.experts.mlp.v1 [E*F, D] (up_proj); {p}.experts.mlp.w2
                [E*F, D] (down_proj transposed)

MolmoE-1B-0924 HF layout (`molmoe_llm_links`). The spec has no MolmoE key names and the hub is
not reachable from here, so they were read from the checkpoint's remote code
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
here): the remote code's MolmoForCausalLM built from `molmoe_config_to_hf(TINY_MOE)` has
exactly the key set and shapes this module writes (except `pad_embed`, which that code sizes
from the default 1024-wide ViT whatever the config says), and with our exported weights its
text-only logits equal ours to 2.4e-7. Summing these shapes for the MOLMOE_1B preset
gives 7,221,875,712 parameters (spec §7.1), which tests/test_moe.py checks.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping

from molmo_jax.convert.hf_molmo import (CheckpointError, Link, Path, _xp, fused_linear_link, linear_link, same_link,
                                        config_from_hf, config_to_hf)
from molmo_jax.model.config import LLMConfig, MolmoConfig

LAYOUTS = ("per_expert", "fused", "megablocks")


def _per_expert(keys: List[str], ours: Path, layer, in_dim: int, out_dim: int) -> Link:
    """One PyTorch weight [out, in] per expert <-> stacked kernel [E, in, out]."""
    n = len(keys)
    return Link(tuple(keys), (ours,), layer,
                lambda *ws: [_xp(*ws).stack([w.T for w in ws])],
                lambda k: [k[i].T for i in range(n)],
                lambda shape: [(out_dim, in_dim)] * n)


def _whole(key: str, ours: Path, layer, hf_shape, to_ours, to_hf) -> Link:
    """One checkpoint tensor <-> one of our arrays, by a reshape/transpose each way."""
    return Link((key,), (ours,), layer, lambda w: [to_ours(w)], lambda k: [to_hf(k)], lambda shape: [hf_shape])


def moe_links(c: LLMConfig, hf: str, ours: Path, layer: int, layout: str) -> List[Link]:
    """Router and experts of one block. `hf`: the block's MoE module prefix, e.g.
    "model.layers.3.mlp" (OLMoE), "model.transformer.blocks.3.mlp" (MolmoE),
    "transformer.blocks.3.ffn" (megablocks); `ours`: path of the MoEFeedForward."""
    d, e, f = c.d_model, c.moe_num_experts, c.moe_hidden_size
    if layout == "megablocks":
        def stacked_gate(w):  # [E*F, D] rows of expert i = its [F, D] weight
            return w.reshape(e, f, d).transpose(0, 2, 1)

        def flat_gate(k):
            return k.transpose(0, 2, 1).reshape(e * f, d)

        return [linear_link(f"{hf}.router.layer.weight", ours + ("router",), layer, (d,), (e,)),
                _whole(f"{hf}.experts.mlp.w1", ours + ("gate",), layer, (e * f, d), stacked_gate, flat_gate),
                _whole(f"{hf}.experts.mlp.v1", ours + ("up",), layer, (e * f, d), stacked_gate, flat_gate),
                _whole(f"{hf}.experts.mlp.w2", ours + ("down",), layer, (e * f, d),
                       lambda w: w.reshape(e, f, d), lambda k: k.reshape(e * f, d))]
    links = [linear_link(f"{hf}.gate.weight", ours + ("router",), layer, (d,), (e,))]
    if layout == "per_expert":
        def names(proj):
            return [f"{hf}.experts.{i}.{proj}.weight" for i in range(e)]

        return links + [_per_expert(names("gate_proj"), ours + ("gate",), layer, d, f),
                        _per_expert(names("up_proj"), ours + ("up",), layer, d, f),
                        _per_expert(names("down_proj"), ours + ("down",), layer, f, d)]
    if layout == "fused":
        gate_up = Link((f"{hf}.experts.gate_up_proj",), (ours + ("gate",), ours + ("up",)), layer,
                       lambda w: [w[:, :f].transpose(0, 2, 1), w[:, f:].transpose(0, 2, 1)],
                       lambda g, u: [_xp(g, u).concatenate([g.transpose(0, 2, 1), u.transpose(0, 2, 1)], axis=1)],
                       lambda sg, su: [(e, 2 * f, d)])
        down = _whole(f"{hf}.experts.down_proj", ours + ("down",), layer, (e, d, f),
                      lambda w: w.transpose(0, 2, 1), lambda k: k.transpose(0, 2, 1))
        return links + [gate_up, down]
    raise CheckpointError(f"unknown MoE checkpoint layout {layout!r}; choose from {LAYOUTS}")


def molmoe_llm_links(c: LLMConfig, hf: str, ours: Path) -> List[Link]:
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


# ----------------------------------------------------------------------------- config.json

_VISION_KEYS = ("vision_backbone", "vit_layers", "image_pooling_2d", "image_pooling_h", "image_pooling_w",
                "image_padding_embed", "image_projector", "rope_impl", "activation_type", "include_bias")


def molmoe_config_from_hf(cfg: Mapping) -> MolmoConfig:
    """The MolmoE remote-code config.json (OLMo-style keys: d_model, n_layers, mlp_ratio,
    moe_*) -> MolmoConfig. Vision and connector fields are read by `config_from_hf`."""
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
    config = config_from_hf(dense_view)
    llm = dataclasses.replace(
        config.llm, block_type="moe", moe_num_experts=cfg["moe_num_experts"], moe_top_k=cfg["moe_top_k"],
        moe_hidden_size=hidden // 2, moe_renormalize=False, moe_dispatch="sorted",
        moe_capacity_factor=cfg.get("moe_capacity_factor", 1.25),
        moe_load_balance_weight=cfg.get("moe_loss_weight") or 0.0,
        moe_router_z_weight=cfg.get("moe_zloss_weight") or 0.0)
    return config.replace(llm=llm)


def molmoe_config_to_hf(config: MolmoConfig) -> Dict:
    """MolmoConfig (block_type "moe") -> a MolmoE remote-code config.json that
    `molmoe_config_from_hf` reads back equal."""
    c = config.llm
    if c.moe_hidden_size * 2 != c.mlp_hidden_size or c.moe_renormalize:
        raise CheckpointError("the MolmoE config.json needs moe_hidden_size == mlp_hidden_size / 2 and "
                              "no top-k renormalisation")
    dense = config_to_hf(config.replace(llm=dataclasses.replace(c, block_type="dense")))
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

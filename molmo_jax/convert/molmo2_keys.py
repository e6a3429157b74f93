"""The checkpoint layout of the Molmo2 releases (allenai/Molmo2-4B, -8B, -O-7B) as transformers'
`Molmo2ForConditionalGeneration` reads and writes it: the key map and the config.json translation.

    key_map(config)                     # every checkpoint key <-> one slice of our parameters
    config_from_hf(cfg)                 # config.json dict -> Molmo2Config
    config_to_hf(config)                # Molmo2Config -> config.json dict (transformers' format)
    released_embedding(tensors, config) # wte tables split as the releases split them

transformers renames these keys to its module tree on load (conversion_mapping.py "molmo2" /
"Molmo2TextModel") and back on save, so the files keep the original names:
  model.transformer.wte.{embedding [V, D], new_embedding [extra, D]}, model.transformer.ln_f.weight
  model.transformer.blocks.N.self_attn.{att_proj [q; k; v], attn_out, q_norm, k_norm}.weight
  model.transformer.blocks.N.{attn_norm, ff_norm}.weight
  model.transformer.blocks.N.mlp.{ff_proj [up; gate], ff_out}.weight
  lm_head.weight [V, D]
  model.vision_backbone.image_vit.*          (the Molmo v1 ViT names, SigLIP: patch bias, no CLS / pre_ln)
  model.vision_backbone.image_pooling_2d.w{q,k,v,o}.{weight,bias}
  model.vision_backbone.image_projector.w{1 gate, 3 up, 2 down}.weight
transformers' save re-splits the concatenated embedding into two equal halves rather than at
V (it keeps no record of the split); `released_embedding` reads either split, and we write
the releases' [V] + [extra].
"""
from __future__ import annotations

from typing import Dict, List, Mapping

import numpy as np

from molmo_jax.convert import molmo_keys
from molmo_jax.convert.links import (CheckpointError, Link, Path, fused_linear_link, fused_vector_link,
                                     linear_link, mha_links, same_link)
from molmo_jax.model.config import LLMConfig, RopeScaling, VisionConfig
from molmo_jax.model.molmo2_config import AdapterConfig, Molmo2Config

PREFIX = "model."
EMBEDDING = PREFIX + "transformer.wte.embedding"
NEW_EMBEDDING = PREFIX + "transformer.wte.new_embedding"

# ----------------------------------------------------------------------------- links


def llm_links(c: LLMConfig, hf: str, ours: Path) -> List[Link]:
    d, nh, nkv, hd, f = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.mlp_hidden_size // 2
    links = [same_link(f"{hf}.wte.embedding", ours + ("embed", "embedding")),
             same_link(f"{hf}.wte.new_embedding", ours + ("embed", "new_embedding")),
             same_link(f"{hf}.ln_f.weight", ours + ("ln_f", "scale")),
             linear_link("lm_head.weight", ours + ("lm_head", "kernel"), None, (d,), (c.embedding_size,))]
    blocks = ours + ("blocks",)
    att, mlp = blocks + ("attention",), blocks + ("ffn", "mlp")
    qkv_shapes = [(nh, hd), (nkv, hd), (nkv, hd)]
    for i in range(c.n_layers):
        p = f"{hf}.blocks.{i}"
        links.append(fused_linear_link(f"{p}.self_attn.att_proj.weight", [att + (n, "kernel") for n in "qkv"], i,
                                       (d,), qkv_shapes))
        if c.qkv_bias:
            links.append(fused_vector_link(f"{p}.self_attn.att_proj.bias", [att + (n, "bias") for n in "qkv"], i,
                                           qkv_shapes))
        if c.qk_norm:
            links += [same_link(f"{p}.self_attn.q_norm.weight", att + ("q_norm", "scale"), i),
                      same_link(f"{p}.self_attn.k_norm.weight", att + ("k_norm", "scale"), i)]
        links += [linear_link(f"{p}.self_attn.attn_out.weight", att + ("o", "kernel"), i, (nh, hd), (d,)),
                  same_link(f"{p}.attn_norm.weight", blocks + ("attn_norm", "scale"), i),
                  same_link(f"{p}.ff_norm.weight", blocks + ("ff_norm", "scale"), i),
                  # ff_proj rows are [up; gate], as in Molmo v1 (transformers: Chunk -> up_proj, gate_proj).
                  fused_linear_link(f"{p}.mlp.ff_proj.weight", [mlp + ("up", "kernel"), mlp + ("gate", "kernel")], i,
                                    (d,), [(f,), (f,)]),
                  linear_link(f"{p}.mlp.ff_out.weight", mlp + ("down", "kernel"), i, (f,), (d,))]
    return links


def adapter_links(config: Molmo2Config, hf: str, ours: Path) -> List[Link]:
    vc, ac = config.vision, config.adapter
    feat = vc.width * len(vc.feature_layers)
    links = mha_links(f"{hf}.image_pooling_2d", ours + ("pooling",), None, feat, ac.num_heads, ac.head_dim, ac.width)
    proj = ours + ("projector",)
    return links + [
        linear_link(f"{hf}.image_projector.w1.weight", proj + ("gate", "kernel"), None, (ac.width,),
                    (ac.projector_hidden,)),
        linear_link(f"{hf}.image_projector.w3.weight", proj + ("up", "kernel"), None, (ac.width,),
                    (ac.projector_hidden,)),
        linear_link(f"{hf}.image_projector.w2.weight", proj + ("down", "kernel"), None, (ac.projector_hidden,),
                    (config.llm.d_model,))]


def key_map(config: Molmo2Config) -> List[Link]:
    """The links of the whole model: LLM, vision tower and adapter."""
    return (llm_links(config.llm, PREFIX + "transformer", ("llm",))
            + molmo_keys.vision_links(config.vision, PREFIX + "vision_backbone.image_vit", ("vision",))
            + adapter_links(config, PREFIX + "vision_backbone", ("adapter",)))


class _ReleasedEmbedding(Mapping):
    """`tensors` with the two wte tables re-split at vocab_size (read together on lookup)."""

    def __init__(self, tensors: Mapping[str, object], vocab_size: int):
        self.tensors, self.vocab_size = tensors, vocab_size

    def __getitem__(self, key: str):
        if key not in (EMBEDDING, NEW_EMBEDDING):
            return self.tensors[key]
        table = np.concatenate([np.asarray(self.tensors[EMBEDDING]), np.asarray(self.tensors[NEW_EMBEDDING])])
        return table[:self.vocab_size] if key == EMBEDDING else table[self.vocab_size:]

    def __contains__(self, key) -> bool:
        return key in self.tensors

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def released_embedding(tensors: Mapping[str, object], config: Molmo2Config) -> Mapping[str, object]:
    """`tensors` whose wte.embedding / new_embedding rows split anywhere (transformers' save: two
    equal halves) read as the releases split them, [vocab_size] + [additional_vocab_size]."""
    c = config.llm
    if EMBEDDING not in tensors or NEW_EMBEDDING not in tensors:
        return tensors  # the key check names what is missing
    shapes = [tuple(tensors.shape(k) if hasattr(tensors, "shape") else np.shape(tensors[k]))
              for k in (EMBEDDING, NEW_EMBEDDING)]
    if shapes[0][0] == c.embedding_size or len({s[1:] for s in shapes}) != 1 or \
            shapes[0][0] + shapes[1][0] != c.total_vocab:
        return tensors  # already the released split, or a mismatch the shape check reports
    return _ReleasedEmbedding(tensors, c.embedding_size)


# ----------------------------------------------------------------------------- config.json

_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu", "quick_gelu": "quick_gelu"}


def _require(d: Mapping, key: str, expected, where: str) -> None:
    value = d.get(key, expected)
    if value != expected:
        raise CheckpointError(f"{where}: {key}={value!r} is not supported (expected {expected!r})")


def _get(d: Mapping, where: str, *names, default=KeyError):
    """The first of `names` present in `d` (the releases' legacy names and transformers' own)."""
    for name in names:
        if name in d:
            return d[name]
    if default is KeyError:
        raise CheckpointError(f"{where}: missing required key {names[0]!r}")
    return default


def _vision_from_hf(v: Mapping, layers, legacy: bool) -> VisionConfig:
    where = "config.json vision_config"
    heads = _get(v, where, "num_attention_heads")
    if _get(v, where, "num_key_value_heads", default=heads) != heads:
        raise CheckpointError(f"{where}: num_key_value_heads must equal num_attention_heads")
    _require(v, "attention_bias", True, where)
    _require(v, "num_channels", 3, where)
    act = _get(v, where, "hidden_act", default="gelu_pytorch_tanh")
    if act not in _ACTIVATIONS:
        raise CheckpointError(f"{where}: hidden_act={act!r} is not supported ({sorted(_ACTIVATIONS)})")
    size = _get(v, where, "image_size", "image_default_input_size", default=[378, 378])
    n_layers = _get(v, where, "num_hidden_layers")
    layers = [int(i) for i in layers]
    if not all(-n_layers <= i < n_layers for i in layers):
        raise CheckpointError(f"config.json: vision feature layers {layers} do not index the {n_layers} ViT layers")
    if legacy:  # as transformers: the hub config declares more layers than the weights hold
        layers = [i % n_layers for i in layers]
        n_layers = max(layers) + 1
    vc = VisionConfig(
        kind="siglip", image_size=tuple(size), patch_size=_get(v, where, "patch_size", "image_patch_size", default=14),
        width=_get(v, where, "hidden_size"), num_heads=heads, head_dim=_get(v, where, "head_dim"),
        mlp_dim=_get(v, where, "intermediate_size"), num_layers=n_layers, activation=_ACTIVATIONS[act],
        norm_eps=_get(v, where, "layer_norm_eps", default=1e-6), use_cls_token=False, pre_ln=False, patch_bias=True,
        feature_layers=tuple(layers))
    positions = _get(v, where, "num_position_embeddings", "image_num_pos", default=None)
    if positions not in (None, vc.num_positions):
        raise CheckpointError(f"{where}: {positions} position embeddings, but image_size {list(size)} and patch "
                              f"size {vc.patch_size} give {vc.num_positions} patches")
    return vc


def _rope_from_hf(t: Mapping, where: str):
    """(rope_theta, RopeScaling or None) from transformers' rope_parameters or the legacy rope_theta / rope_scaling."""
    params = dict(t.get("rope_parameters") or {})
    if "rope_theta" not in params:
        params["rope_theta"] = _get(t, where, "rope_theta", default=1_000_000.0)
    legacy = t.get("rope_scaling")
    if legacy:
        params.update(legacy)
    theta = float(params.pop("rope_theta"))
    kind = params.pop("rope_type", params.pop("type", "default"))
    if kind == "default":
        return theta, None
    known = {"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "truncate"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise CheckpointError(f"{where}: rope parameters {unknown} are not supported")
    try:
        return theta, RopeScaling(rope_type=kind, **params)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: {e}") from e


def _llm_from_hf(t: Mapping) -> LLMConfig:
    where = "config.json text_config"
    _require(t, "hidden_act", "silu", where)
    _require(t, "tie_word_embeddings", False, where)
    _require(t, "use_qk_norm", True, where)
    qk = _get(t, where, "qk_norm_type", default="qwen3")
    if qk not in ("qwen3", "olmo"):
        raise CheckpointError(f"{where}: qk_norm_type={qk!r} is not supported (qwen3 or olmo)")
    theta, scaling = _rope_from_hf(t, where)
    n_layers, vocab = _get(t, where, "num_hidden_layers"), _get(t, where, "vocab_size")
    layers = t.get("rope_scaling_layers")
    if scaling is None or layers is None or sorted(layers) == list(range(n_layers)):
        layers = None
    heads = _get(t, where, "num_attention_heads")
    try:
        return LLMConfig(
            d_model=_get(t, where, "hidden_size"), n_layers=n_layers, n_heads=heads,
            n_kv_heads=_get(t, where, "num_key_value_heads", default=heads),
            head_dim=_get(t, where, "head_dim", default=_get(t, where, "hidden_size") // heads),
            mlp_hidden_size=2 * _get(t, where, "intermediate_size"), vocab_size=vocab, embedding_size=vocab,
            additional_vocab_size=_get(t, where, "additional_vocab_size", default=128),
            norm_eps=_get(t, where, "rms_norm_eps", "layer_norm_eps", default=1e-6), rope_theta=theta,
            max_position_embeddings=_get(t, where, "max_position_embeddings", default=36864),
            qkv_bias=bool(_get(t, where, "attention_bias", "qkv_bias", default=False)), qk_norm=True,
            qk_norm_per_head=qk == "qwen3", norm_after=bool(t.get("norm_after", False)), rope_scaling=scaling,
            rope_scaling_layers=None if layers is None else tuple(sorted(layers)))
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from e


_TOKEN_IDS = ("image_start_token_id", "image_end_token_id", "image_patch_id", "low_res_image_start_token_id",
              "frame_start_token_id", "frame_end_token_id")


def config_from_hf(cfg: Mapping) -> Molmo2Config:
    """A Molmo2 config.json dict (transformers' save or the hub's original keys) -> Molmo2Config."""
    if cfg.get("model_type") != "molmo2":
        raise CheckpointError(f"config.json: model_type={cfg.get('model_type')!r}, expected 'molmo2'")
    _require(cfg, "tie_word_embeddings", False, "config.json")
    legacy = "vit_config" in cfg and "vision_config" not in cfg
    for name in ("text_config", "adapter_config"):
        if not isinstance(cfg.get(name), Mapping):
            raise CheckpointError(f"config.json: missing {name!r}")
    vision_json = cfg.get("vision_config") or cfg.get("vit_config")
    if not isinstance(vision_json, Mapping):
        raise CheckpointError("config.json: missing 'vision_config'")
    a, where = cfg["adapter_config"], "config.json adapter_config"
    heads = _get(a, where, "num_attention_heads")
    if _get(a, where, "num_key_value_heads", default=heads) != heads:
        raise CheckpointError(f"{where}: num_key_value_heads must equal num_attention_heads")
    _require(a, "attention_bias", True, where)
    _require(a, "mlp_bias", False, where)
    _require(a, "hidden_act", "silu", where)
    vision = _vision_from_hf(vision_json, _get(a, where, "vision_feature_layer", "vit_layers", default=[24, 18]),
                             legacy)
    llm = _llm_from_hf(cfg["text_config"])
    if _get(a, where, "text_hidden_size", default=llm.d_model) != llm.d_model:
        raise CheckpointError(f"{where}: text_hidden_size={a['text_hidden_size']} but the text model is "
                              f"{llm.d_model} wide")
    adapter = AdapterConfig(width=_get(a, where, "hidden_size"), num_heads=heads, head_dim=_get(a, where, "head_dim"),
                            projector_hidden=_get(a, where, "intermediate_size"))
    defaults = Molmo2Config()
    ids = {k: int(cfg.get(k, getattr(defaults, k))) for k in _TOKEN_IDS}
    return Molmo2Config(vision=vision, adapter=adapter, llm=llm, **ids)


def config_to_hf(config: Molmo2Config) -> Dict:
    """Molmo2Config -> the config.json transformers writes for Molmo2ForConditionalGeneration
    (`config_from_hf` reads it back equal)."""
    vc, ac, c = config.vision, config.adapter, config.llm
    if (vc.use_cls_token or vc.pre_ln or not vc.patch_bias or c.block_type != "dense" or not c.qk_norm
            or c.embedding_size != c.vocab_size):
        raise CheckpointError("a Molmo2 config.json describes SigLIP towers (no CLS, no pre_ln, patch bias) and "
                              "dense QK-normed decoders with embedding_size == vocab_size only")
    act = {v: k for k, v in _ACTIVATIONS.items() if k != "gelu_new"}[vc.activation]
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling is not None:
        s = c.rope_scaling
        rope = {"rope_type": s.rope_type, "rope_theta": c.rope_theta, "factor": s.factor}
        if s.rope_type == "yarn":
            rope.update(original_max_position_embeddings=s.original_max_position_embeddings,
                        attention_factor=s.attention_factor, beta_fast=s.beta_fast, beta_slow=s.beta_slow,
                        truncate=s.truncate)
    scaled = list(range(c.n_layers)) if c.rope_scaling_layers is None else list(c.rope_scaling_layers)
    return {
        "architectures": ["Molmo2ForConditionalGeneration"], "model_type": "molmo2", "dtype": "float32",
        "tie_word_embeddings": False, "initializer_range": 0.02,
        **{k: getattr(config, k) for k in _TOKEN_IDS},
        "vision_config": {
            "model_type": "molmo2_vision", "hidden_size": vc.width, "intermediate_size": vc.mlp_dim,
            "num_hidden_layers": vc.num_layers, "num_attention_heads": vc.num_heads,
            "num_key_value_heads": vc.num_heads, "head_dim": vc.head_dim, "hidden_act": act,
            "layer_norm_eps": vc.norm_eps, "image_size": list(vc.image_size), "patch_size": vc.patch_size,
            "num_position_embeddings": vc.num_positions, "num_channels": 3, "attention_dropout": 0.0,
            "attention_bias": True, "initializer_range": 0.02},
        "adapter_config": {
            "model_type": "molmo2_adapter", "vision_feature_layer": list(vc.feature_layers),
            "hidden_size": ac.width, "num_attention_heads": ac.num_heads, "num_key_value_heads": ac.num_heads,
            "head_dim": ac.head_dim, "attention_dropout": 0.0, "attention_bias": True, "hidden_act": "silu",
            "intermediate_size": ac.projector_hidden, "text_hidden_size": c.d_model, "mlp_bias": False,
            "initializer_range": 0.02},
        "text_config": {
            "model_type": "molmo2_text", "hidden_size": c.d_model, "num_attention_heads": c.n_heads,
            "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim, "vocab_size": c.vocab_size,
            "additional_vocab_size": c.additional_vocab_size, "attention_bias": c.qkv_bias,
            "qk_norm_type": "qwen3" if c.qk_norm_per_head else "olmo", "num_hidden_layers": c.n_layers,
            "intermediate_size": c.mlp_hidden_size // 2, "hidden_act": "silu", "attention_dropout": 0.0,
            "max_position_embeddings": c.max_position_embeddings, "rope_parameters": rope,
            "rope_scaling_layers": scaled, "rms_norm_eps": c.norm_eps, "norm_after": c.norm_after,
            "initializer_range": 0.02, "use_cache": True, "tie_word_embeddings": False},
    }

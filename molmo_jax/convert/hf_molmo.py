"""Official Hugging Face Molmo checkpoints <-> molmo-jax parameters (spec §7).

    config, params = load_hf_checkpoint("Molmo-7B-D-0924/")   # nnx.State of the Molmo params
    model = load_hf_model("Molmo-7B-D-0924/")                  # the same, merged into a Molmo
    save_hf_checkpoint("out/", params, config)                 # official key layout again

A folder holds config.json and model.safetensors or a sharded model.safetensors.index.json.
Every official key maps to exactly one slice of our parameters and back ("links" below):
fused `att_proj` [q; k; v] rows and `ff_proj` [up; gate] rows are split, PyTorch Linear
weights [out, in] are transposed to kernels [in, ..., out], per-block tensors are stacked on
the leading "layers" axis. A missing, unexpected or wrongly shaped tensor is an error that
names the key and both shapes; nothing is skipped or broadcast. Keys may carry the `model.`
prefix (HF hub) or not (official training checkpoints); written keys always carry it.

The link functions run on numpy arrays (fast, exact) and on tracers (through jnp), so
`jax.eval_shape` checks a whole mapping on shapes without allocating anything.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from molmo_jax.model.config import (CLIP_VIT_L14_336, ConnectorConfig, LLMConfig, MolmoConfig,
                                    VisionConfig)

Path = Tuple[str, ...]
PREFIX = "model."
SAFETENSORS = "model.safetensors"
INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint folder or tensor that does not fit (message names file / key / shapes)."""


# ----------------------------------------------------------------------------- links


@dataclasses.dataclass(frozen=True)
class Link:
    """hf tensors <-> our arrays. `layer` indexes the stacked axis of every path in `ours`."""

    hf: Tuple[str, ...]
    ours: Tuple[Path, ...]
    layer: Optional[int]
    to_ours: Callable[..., Sequence[jax.Array]]
    to_hf: Callable[..., Sequence[jax.Array]]
    hf_shapes: Callable[..., Sequence[Tuple[int, ...]]]  # our per-layer shapes -> official shapes


def _xp(*arrays):
    """numpy for concrete arrays, jnp under tracing (jax.eval_shape / jit)."""
    return jnp if any(isinstance(a, jax.core.Tracer) for a in arrays) else np


def fused_linear_link(hf: str, ours: Sequence[Path], layer, in_shape, out_shapes) -> Link:
    """PyTorch weight [sum(prod(out_i)), prod(in)] (rows = the parts in order) <->
    kernels [*in_shape, *out_i]."""
    sizes = [math.prod(s) for s in out_shapes]
    n_in = math.prod(in_shape)

    def to_ours(w):
        parts = _xp(w).split(w, np.cumsum(sizes)[:-1].tolist(), axis=0)
        return [p.T.reshape(*in_shape, *s) for p, s in zip(parts, out_shapes)]

    def to_hf(*kernels):
        return [_xp(*kernels).concatenate([k.reshape(n_in, -1).T for k in kernels], axis=0)]

    def hf_shapes(*shapes):
        return [(sum(math.prod(s[len(in_shape):]) for s in shapes), n_in)]

    return Link((hf,), tuple(ours), layer, to_ours, to_hf, hf_shapes)


def fused_vector_link(hf: str, ours: Sequence[Path], layer, out_shapes) -> Link:
    """A 1-D tensor of concatenated parts (fused biases) <-> arrays of out_shapes."""
    sizes = [math.prod(s) for s in out_shapes]

    def to_ours(b):
        parts = _xp(b).split(b, np.cumsum(sizes)[:-1].tolist(), axis=0)
        return [p.reshape(s) for p, s in zip(parts, out_shapes)]

    def to_hf(*arrays):
        return [_xp(*arrays).concatenate([a.reshape(-1) for a in arrays], axis=0)]

    return Link((hf,), tuple(ours), layer, to_ours, to_hf, lambda *shapes: [(sum(map(math.prod, shapes)),)])


def linear_link(hf: str, ours: Path, layer, in_shape, out_shape) -> Link:
    return fused_linear_link(hf, [ours], layer, in_shape, [out_shape])


def same_link(hf: str, ours: Path, layer=None) -> Link:
    return Link((hf,), (ours,), layer, lambda a: [a], lambda a: [a], lambda s: [tuple(s)])


def vector_link(hf: str, ours: Path, layer, shape) -> Link:
    return fused_vector_link(hf, [ours], layer, [shape])


def mha_links(hf: str, ours: Path, layer, d_in, heads, head_dim, d_out) -> List[Link]:
    """ViT / pooling attention: wq, wk, wv [H*N, d_in] + bias, wo [d_out, N*H] + bias."""
    out = []
    for name in ("wq", "wk", "wv"):
        out.append(linear_link(f"{hf}.{name}.weight", ours + (name, "kernel"), layer, (d_in,), (heads, head_dim)))
        out.append(vector_link(f"{hf}.{name}.bias", ours + (name, "bias"), layer, (heads, head_dim)))
    out.append(linear_link(f"{hf}.wo.weight", ours + ("wo", "kernel"), layer, (heads, head_dim), (d_out,)))
    out.append(same_link(f"{hf}.wo.bias", ours + ("wo", "bias"), layer))
    return out


def norm_links(hf: str, ours: Path, layer, with_bias: bool) -> List[Link]:
    links = [same_link(f"{hf}.weight", ours + ("scale",), layer)]
    if with_bias:
        links.append(same_link(f"{hf}.bias", ours + ("bias",), layer))
    return links


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
    if c.block_type == "moe":  # MolmoE-1B: its own key layout (convert/moe_weights.py)
        from molmo_jax.convert.moe_weights import molmoe_llm_links  # noqa: PLC0415 (import cycle)
        return molmoe_llm_links(c, hf, ours)
    if c.block_type != "dense":
        raise CheckpointError(f"block_type {c.block_type!r}: only dense and MoE Molmo checkpoints are mapped")
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


def molmo_links(config: MolmoConfig) -> List[Link]:
    return (llm_links(config.llm, PREFIX + "transformer", ("llm",))
            + vision_links(config.vision, PREFIX + "vision_backbone.image_vit", ("vision",))
            + connector_links(config, PREFIX + "vision_backbone", ("connector",)))


# ----------------------------------------------------------------------------- mapping


def _get(tree: Mapping, path: Path):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: Dict, path: Path, value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def abstract_params(config: MolmoConfig) -> Dict:
    """Pure nested dict of jax.ShapeDtypeStruct for the model's parameters (nothing allocated)."""
    from molmo_jax.model.molmo import Molmo  # noqa: PLC0415 (keeps the converter importable alone)

    model = nnx.eval_shape(lambda: Molmo(config, rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _layer_shape(abstract: Mapping, path: Path, layer: Optional[int]):
    shape = _get(abstract, path).shape
    return shape if layer is None else shape[1:]


def _apply(links: Sequence[Link], abstract: Mapping, fn) -> None:
    for link in links:
        fn(link, [_layer_shape(abstract, p, link.layer) for p in link.ours])


def tensors_to_params(state_dict: Mapping[str, object], links: Sequence[Link], abstract: Mapping, *,
                      dropped: Callable[[str], bool] = lambda key: False) -> Dict:
    """Tensors named by `links` -> pure nested dict shaped like `abstract` (float32; numpy
    for numpy input). Keys for which `dropped(key)` holds are deliberately unused; any other
    missing, unexpected or wrongly shaped tensor raises CheckpointError naming it."""
    wanted = [k for link in links for k in link.hf]
    missing = [k for k in wanted if k not in state_dict]
    unexpected = sorted(k for k in set(state_dict) - set(wanted) if not dropped(k))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint keys do not fit the config: missing {missing[:10]}"
                              f"{' ...' if len(missing) > 10 else ''} ({len(missing)} in all), unexpected "
                              f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''} ({len(unexpected)} in all)")
    per_layer: Dict[Path, Dict[int, jax.Array]] = {}
    out: Dict = {}

    def convert(link: Link, our_shapes):
        arrays = []
        for key, expected in zip(link.hf, link.hf_shapes(*our_shapes)):
            got = tuple(state_dict[key].shape)
            if got != tuple(expected):
                raise CheckpointError(f"{key}: checkpoint shape {got} does not match the shape {tuple(expected)} "
                                      f"the config requires")
            value = state_dict[key]
            arrays.append(_xp(value).asarray(value, dtype=np.float32))
        for path, value in zip(link.ours, link.to_ours(*arrays)):
            if link.layer is None:
                _set(out, path, value)
            else:
                per_layer.setdefault(path, {})[link.layer] = value

    _apply(links, abstract, convert)
    for path, layers in per_layer.items():
        stack = [layers[i] for i in range(len(layers))]
        _set(out, path, _xp(*stack).stack(stack))
    return out


def params_to_tensors(params: Mapping, links: Sequence[Link], abstract: Mapping) -> Dict[str, jax.Array]:
    """Inverse of tensors_to_params: pure nested dict -> tensors named by `links`."""
    out: Dict[str, jax.Array] = {}

    def convert(link: Link, our_shapes):
        arrays = []
        for path, shape in zip(link.ours, our_shapes):
            value = _get(params, path)
            value = value if link.layer is None else value[link.layer]
            if tuple(value.shape) != tuple(shape):
                raise CheckpointError(f"parameter {'/'.join(path)}: shape {tuple(value.shape)} does not match "
                                      f"the config's {tuple(shape)}")
            arrays.append(value)
        out.update(zip(link.hf, link.to_hf(*arrays)))

    _apply(links, abstract, convert)
    return out


def hf_to_params(state_dict: Mapping[str, object], config: MolmoConfig) -> Dict:
    """Official tensors (name -> array [PyTorch layout], with or without the `model.`
    prefix) -> pure nested dict of our float32 parameters (stacked per block)."""
    if state_dict and not any(k.startswith(PREFIX) for k in state_dict):
        state_dict = {PREFIX + k: v for k, v in state_dict.items()}
    return tensors_to_params(state_dict, molmo_links(config), abstract_params(config))


def params_to_hf(params, config: MolmoConfig) -> Dict[str, jax.Array]:
    """Our parameters (pure nested dict, nnx.State or a Molmo) -> official tensors with the
    `model.` prefix, numpy arrays in PyTorch layout and the parameters' dtype (abstract
    under jax.eval_shape)."""
    params = jax.tree.map(lambda a: a if isinstance(a, jax.core.Tracer) else np.asarray(a), pure_params(params))
    return params_to_tensors(params, molmo_links(config), abstract_params(config))


def pure_params(params) -> Dict:
    """A Molmo, an nnx.State or a pure dict -> pure nested dict of parameter arrays."""
    if isinstance(params, nnx.Module):
        params = nnx.state(params, nnx.Param)
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    return params


# ----------------------------------------------------------------------------- config

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
    if cfg.get("block_type") == "moe":  # MolmoE-1B writes OLMo-style keys (convert/moe_weights.py)
        from molmo_jax.convert.moe_weights import molmoe_config_from_hf  # noqa: PLC0415 (import cycle)
        return molmoe_config_from_hf(cfg)
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
    if c.block_type == "moe":
        from molmo_jax.convert.moe_weights import molmoe_config_to_hf  # noqa: PLC0415 (import cycle)
        return molmoe_config_to_hf(config)
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


def _open_safetensors(path: str):
    from safetensors import SafetensorError, safe_open  # noqa: PLC0415

    try:
        return safe_open(path, framework="numpy")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def is_hf_folder(folder: str) -> bool:
    """config.json plus model.safetensors or a sharded index."""
    return os.path.exists(os.path.join(folder, "config.json")) and any(
        os.path.exists(os.path.join(folder, name)) for name in (SAFETENSORS, INDEX))


def read_hf_tensors(folder: str) -> Dict[str, np.ndarray]:
    """All tensors of model.safetensors or of the shards named in model.safetensors.index.json."""
    from safetensors import SafetensorError  # noqa: PLC0415

    index_path, single = os.path.join(folder, INDEX), os.path.join(folder, SAFETENSORS)
    if os.path.exists(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index_path}: not a safetensors index with a 'weight_map' ({e})") from e
    elif os.path.exists(single):
        weight_map = None
    else:
        raise CheckpointError(f"{folder}: neither {SAFETENSORS} nor {INDEX} found")
    files = [SAFETENSORS] if weight_map is None else sorted(set(weight_map.values()))
    tensors: Dict[str, np.ndarray] = {}
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            raise CheckpointError(f"{index_path}: names shard {name}, which does not exist")
        handle = _open_safetensors(path)
        for key in handle.keys():
            try:
                tensors[key] = handle.get_tensor(key)
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{path}: tensor {key} cannot be read, the file is truncated or corrupt "
                                      f"({e})") from e
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise CheckpointError(f"{index_path}: keys listed but absent from their shards: {absent[:10]}")
    return tensors


def read_hf_config(folder: str) -> MolmoConfig:
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise CheckpointError(f"{folder}: no config.json")
    try:
        with open(path) as f:
            return config_from_hf(json.load(f))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e


def load_hf_checkpoint(folder: str) -> Tuple[MolmoConfig, nnx.State]:
    """(config from config.json, nnx.State of float32 parameters) of an official HF folder."""
    from molmo_jax.model.molmo import Molmo  # noqa: PLC0415

    config = read_hf_config(folder)
    pure = jax.tree.map(jnp.asarray, hf_to_params(read_hf_tensors(folder), config))
    state = nnx.state(nnx.eval_shape(lambda: Molmo(config, rngs=nnx.Rngs(0))), nnx.Param)
    state.replace_by_pure_dict(pure)
    return config, state


def load_hf_model(folder: str, **config_changes):
    """A Molmo built from an HF folder; `config_changes` (e.g. dtype="bfloat16") override
    the numerics fields of the config read from config.json."""
    from molmo_jax.model.molmo import Molmo  # noqa: PLC0415

    config, state = load_hf_checkpoint(folder)
    config = config.replace(**config_changes)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Molmo(config, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, state)


def save_hf_checkpoint(folder: str, params, config: MolmoConfig, *, dtype=None,
                       max_shard_bytes: Optional[int] = None) -> None:
    """Writes config.json and model.safetensors (or shards + index above max_shard_bytes)."""
    from safetensors.numpy import save_file  # noqa: PLC0415

    tensors = {k: np.ascontiguousarray(v if dtype is None else v.astype(dtype))
               for k, v in params_to_hf(params, config).items()}
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config_to_hf(config), f, indent=1)
    meta = {"format": "pt"}
    total = sum(t.nbytes for t in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(tensors, os.path.join(folder, SAFETENSORS), metadata=meta)
        return
    shards: List[Dict[str, np.ndarray]] = [{}]
    size = 0
    for key in sorted(tensors):
        if shards[-1] and size + tensors[key].nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += tensors[key].nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, name), metadata=meta)
        weight_map.update({k: name for k in shard})
    with open(os.path.join(folder, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)

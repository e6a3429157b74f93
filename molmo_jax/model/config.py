"""Typed, frozen model configs and the presets of the four released Molmo models.

Everything the model modules need to know about shapes and numerics lives here; the
trainer builds a `MolmoConfig` once from the experiment ConfigDict (configs/*.py) and
passes it down. Values follow `shared/reference/molmo-spec.md` §1.2, §1.3 and §2.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple


# Attention backends (model/attention.py). "auto" picks one per platform and sequence length.
ATTENTION_IMPLEMENTATIONS = ("auto", "reference", "chunked", "splash", "cudnn")


def check_attention(name: str) -> None:
    """model.attention must name one of ATTENTION_IMPLEMENTATIONS."""
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"unknown model.attention {name!r}; choose from {list(ATTENTION_IMPLEMENTATIONS)}")


def _check_keys(cls, data: dict, where: str) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown config key(s) {unknown}; valid keys are {sorted(names)}")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The image encoder. Defaults: OpenAI CLIP ViT-L/14-336 as used by every release
    (23 of CLIP's 24 blocks, pre-LN, quick_gelu, CLS token, no post-LN)."""

    kind: str = "clip"  # "clip" | "siglip"
    image_size: Tuple[int, int] = (336, 336)
    patch_size: int = 14
    width: int = 1024
    num_heads: int = 16
    head_dim: int = 64
    mlp_dim: int = 4096
    num_layers: int = 23
    activation: str = "quick_gelu"  # "quick_gelu" | "gelu_tanh" | "gelu"
    norm_eps: float = 1e-5
    use_cls_token: bool = True
    pre_ln: bool = True
    patch_bias: bool = False
    # Hidden layers fed to the connector (negative: counted from the last block's output).
    feature_layers: Tuple[int, ...] = (-2, -9)

    @property
    def grid(self) -> Tuple[int, int]:
        return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid
        return gh * gw

    @property
    def num_positions(self) -> int:
        return self.num_patches + (1 if self.use_cls_token else 0)

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * 3


@dataclasses.dataclass(frozen=True)
class ConnectorConfig:
    """Vision -> LLM connector (spec §2.4): concat of the selected ViT layers, pad
    embeddings, 2x2 mean-query attention pooling, SwiGLU projector."""

    pooling: str = "attention_meanq"  # "attention_meanq" | "attention" (top-left query)
    pool_h: int = 2
    pool_w: int = 2
    padding_embed: str = "pad_and_partial_pad"  # "pad_and_partial_pad" | "none"
    # Width of one projector SwiGLU half. None = LLM mlp_hidden_size // 2 (spec §2.4 step 7).
    projector_hidden: Optional[int] = None


ROPE_TYPES = ("default", "linear", "yarn")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """transformers' `rope_parameters` beyond rope_theta: what a scaled layer uses (model/rope.py)."""

    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: Optional[int] = None  # yarn
    attention_factor: Optional[float] = None  # yarn; None = 0.1 ln(factor) + 1
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported rope_type {self.rope_type!r}; choose from {list(ROPE_TYPES)}")
        if self.rope_type == "yarn" and self.original_max_position_embeddings is None:
            raise ValueError("rope_type 'yarn' needs original_max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    """The decoder. `mlp_hidden_size` is the fused SwiGLU width H (up and gate, H/2 each)."""

    d_model: int = 3584
    n_layers: int = 28
    n_heads: int = 28
    n_kv_heads: int = 4
    head_dim: int = 128
    mlp_hidden_size: int = 37888
    vocab_size: int = 152064
    embedding_size: int = 152064
    additional_vocab_size: int = 128
    norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 4096
    qkv_bias: bool = True
    qk_norm: bool = False  # OLMo-style full-width RMSNorm on q and k before the head split
    qk_norm_per_head: bool = False  # with qk_norm: Qwen3-style, one RMSNorm [H] over each head instead
    # Scaled RoPE (None = plain) on the layers rope_scaling_layers names (None = all), the
    # others keep the plain table (Molmo2TextConfig.rope_parameters / rope_scaling_layers).
    rope_scaling: Optional[RopeScaling] = None
    rope_scaling_layers: Optional[Tuple[int, ...]] = None
    norm_after: bool = False  # post-norm blocks (OLMo-7B-1024)
    block_type: str = "dense"  # "dense" | "moe"
    # Residual dropout after attention / FFN (before the residual add); the response rate
    # applies where the trainer's response_mask is set (stage-1 recipe: 0.0 / 0.1, spec §5.2).
    residual_dropout: float = 0.0
    response_residual_dropout: float = 0.0
    # Mixture of experts (block_type == "moe"; OLMoE / MolmoE-1B).
    moe_num_experts: int = 0
    moe_top_k: int = 0
    moe_hidden_size: int = 0  # one expert's SwiGLU half width
    moe_renormalize: bool = False  # renormalise the top-k router weights to sum to 1
    moe_dispatch: str = "sorted"  # "sorted" (dropless) | "capacity"
    moe_capacity_factor: float = 1.25
    moe_load_balance_weight: float = 0.0
    moe_router_z_weight: float = 0.0

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):  # from_dict / JSON
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if self.rope_scaling_layers is not None:
            layers = tuple(self.rope_scaling_layers)
            bad = [i for i in layers if not 0 <= i < self.n_layers]
            if bad:
                raise ValueError(f"rope_scaling_layers {bad} out of range for {self.n_layers} layers")
            object.__setattr__(self, "rope_scaling_layers", layers)

    @property
    def total_vocab(self) -> int:
        """Rows of the embedding table: base rows + the extra (image/special) rows."""
        return self.embedding_size + self.additional_vocab_size


@dataclasses.dataclass(frozen=True)
class MolmoConfig:
    vision: VisionConfig = VisionConfig()
    connector: ConnectorConfig = ConnectorConfig()
    llm: LLMConfig = LLMConfig()
    # Numerics and compilation. Parameters are always float32.
    dtype: str = "float32"  # compute dtype: "float32" | "bfloat16"
    remat_policy: str = "none"  # "none" | "full" | "dots" | "dots_no_batch" | "dots_and_attention" (layers.py)
    # The attention backend, one of ATTENTION_IMPLEMENTATIONS, for the decoder, the ViT and the
    # pooling ("auto" gives the unmasked ViT / pooling attention the kernels only on CPU, see
    # attention.select_implementation).
    attention: str = "auto"
    # Random init of a model trained from scratch (pretrained weights replace it otherwise):
    # "normal": every weight N(0, 0.02), the official / transformers convention;
    # "fan_in": dense kernels N(0, 1 / fan_in) instead, so activations keep their scale through
    # the ViT, the connector's two multiplied SwiGLU halves and the LLM (with "normal", a tiny
    # model's image features reach the LLM ~1e-4x the token embeddings and are not learnt), and
    # the ViT's positional / class embeddings N(0, 1), the scale of the patch embeddings they are
    # added to (at 0.02 a from-scratch ViT does not learn where things are: a probe asking which
    # column holds the one white patch stayed at chance for 1000 steps; at 1 it learnt it by 500).
    # The LLM's token embeddings are N(0, 1) too (at 0.02 the text a question asks about is 1/50 of
    # the image features around it). The MoE router / expert weights keep N(0, 0.02) under both.
    init_scheme: str = "normal"

    def __post_init__(self):
        check_attention(self.attention)

    @property
    def projector_hidden(self) -> int:
        if self.connector.projector_hidden is not None:
            return self.connector.projector_hidden
        return self.llm.mlp_hidden_size // 2

    def replace(self, **changes: Any) -> "MolmoConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MolmoConfig":
        return config_from_dict(cls, data, {"vision": VisionConfig, "connector": ConnectorConfig, "llm": LLMConfig})


def config_from_dict(cls, data: dict, parts: dict):
    """`cls` from its `to_dict()` (a checkpoint's or an experiment's model dict): `parts` names
    the nested dataclass of each sub-dict; lists (JSON) become tuples; unknown keys raise."""
    data = dict(data)
    _check_keys(cls, data, cls.__name__)
    sub = {}
    for name, sub_cls in parts.items():
        if name in data:
            d = dict(data.pop(name))
            _check_keys(sub_cls, d, f"{cls.__name__}.{name}")
            for k, v in d.items():
                if isinstance(v, list):
                    d[k] = tuple(v)
            sub[name] = sub_cls(**d)
    return cls(**sub, **data)


# --------------------------------------------------------------------------- presets

CLIP_VIT_L14_336 = VisionConfig()

SIGLIP_SO400M_14_384 = VisionConfig(
    kind="siglip", image_size=(378, 378), width=1152, num_heads=16, head_dim=72, mlp_dim=4304,
    num_layers=27, activation="gelu_tanh", norm_eps=1e-6, use_cls_token=False, pre_ln=False,
    patch_bias=True, feature_layers=(-3, -9),
)

MOLMO_7B_D = MolmoConfig(vision=CLIP_VIT_L14_336, llm=LLMConfig())

MOLMO_72B = MolmoConfig(
    vision=CLIP_VIT_L14_336,
    llm=LLMConfig(d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, mlp_hidden_size=59136,
                  norm_eps=1e-5, rope_theta=1_000_000.0),
)

MOLMO_7B_O = MolmoConfig(
    vision=CLIP_VIT_L14_336,
    llm=LLMConfig(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden_size=22016,
                  vocab_size=100278, embedding_size=100352, norm_eps=1e-6, rope_theta=500_000.0,
                  qkv_bias=False, qk_norm=True, norm_after=True),
)

MOLMOE_1B = MolmoConfig(
    vision=CLIP_VIT_L14_336,
    llm=LLMConfig(d_model=2048, n_layers=16, n_heads=16, n_kv_heads=16, mlp_hidden_size=2048,
                  vocab_size=50280, embedding_size=50304, norm_eps=1e-5, rope_theta=10_000.0,
                  max_position_embeddings=32768, qkv_bias=False, qk_norm=True, norm_after=False,
                  block_type="moe", moe_num_experts=64, moe_top_k=8, moe_hidden_size=1024),
)

# Tiny configs for tests: real geometry where it matters for bookkeeping, toy widths.
TINY_VISION = VisionConfig(width=32, num_heads=2, head_dim=16, mlp_dim=64, num_layers=10)

TINY_QWEN2 = MolmoConfig(
    vision=TINY_VISION,
    llm=LLMConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, mlp_hidden_size=128,
                  vocab_size=512, embedding_size=512, norm_eps=1e-6, rope_theta=1_000_000.0),
)

TINY_OLMO = MolmoConfig(
    vision=TINY_VISION,
    llm=LLMConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=16, mlp_hidden_size=128,
                  vocab_size=500, embedding_size=512, norm_eps=1e-6, rope_theta=500_000.0,
                  qkv_bias=False, qk_norm=True, norm_after=True),
)

TINY_MOE = MolmoConfig(
    vision=TINY_VISION,
    llm=LLMConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=16, mlp_hidden_size=128,
                  vocab_size=500, embedding_size=512, norm_eps=1e-5, rope_theta=10_000.0,
                  qkv_bias=False, qk_norm=True, block_type="moe", moe_num_experts=8, moe_top_k=2,
                  moe_hidden_size=64),  # = mlp_hidden_size / 2, as in MolmoE
)

PRESETS = {
    "molmoe-1b": MOLMOE_1B,
    "molmo-7b-o": MOLMO_7B_O,
    "molmo-7b-d": MOLMO_7B_D,
    "molmo-72b": MOLMO_72B,
    "tiny-qwen2": TINY_QWEN2,
    "tiny-olmo": TINY_OLMO,
    "tiny-moe": TINY_MOE,
}


def lookup_preset(presets: dict, name: str, kind: str = "model"):
    """presets[name], or a ValueError naming the known presets."""
    try:
        return presets[name]
    except KeyError:
        raise ValueError(f"unknown {kind} preset {name!r}; known presets: {sorted(presets)}") from None


def get_preset(name: str) -> MolmoConfig:
    return lookup_preset(PRESETS, name)

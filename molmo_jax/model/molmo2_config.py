"""Typed, frozen configs of the Molmo2 family (SigLIP2 + the Molmo2 adapter + Qwen3 / OLMo3)
and the presets of its releases.

The vision tower and the decoder reuse VisionConfig and LLMConfig (config.py); only the
adapter and the special token ids are new. Values follow transformers' `models/molmo2`
(`Molmo2Config`), which is what the released checkpoints load in; convert/molmo2_keys.py
translates its config.json both ways.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from molmo_jax.model.config import (LLMConfig, RopeScaling, VisionConfig, check_attention, config_from_dict,
                                    lookup_preset)


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """ViT features -> LLM (transformers Molmo2Adapter): the selected layers concatenated,
    attention pooling over the patches each token's index row names (query = their mean),
    then a SwiGLU projector. Pool windows (2x2 image crops, 3x3 video frames) are decided by
    the processor's index arrays, not here."""

    width: int = 1152  # pooling output = projector input (adapter hidden_size)
    num_heads: int = 16
    head_dim: int = 72
    projector_hidden: int = 12288  # one SwiGLU half (adapter intermediate_size)


@dataclasses.dataclass(frozen=True)
class Molmo2Config:
    vision: VisionConfig = VisionConfig()
    adapter: AdapterConfig = AdapterConfig()
    llm: LLMConfig = LLMConfig()
    # Token ids (transformers' defaults): image features are added at image_patch_id tokens.
    image_start_token_id: int = 151936
    image_end_token_id: int = 151937
    image_patch_id: int = 151938
    low_res_image_start_token_id: int = 151940
    frame_start_token_id: int = 151943
    frame_end_token_id: int = 151944
    # Numerics and compilation, as MolmoConfig. Parameters are always float32.
    dtype: str = "float32"
    remat_policy: str = "none"
    attention: str = "auto"

    def __post_init__(self):
        check_attention(self.attention)

    def replace(self, **changes: Any) -> "Molmo2Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Molmo2Config":
        """The inverse of to_dict (experiment configs, checkpoint metadata); unknown keys raise."""
        return config_from_dict(cls, data, {"vision": VisionConfig, "adapter": AdapterConfig, "llm": LLMConfig})


# --------------------------------------------------------------------------- presets

# SigLIP2 so400m/14 at 378 px as Molmo2 runs it: the hub config declares 27 layers, the
# weights hold the 25 up to layer 24, the deepest of the two it reads (24 and 18 = -3, -9).
SIGLIP2_SO400M_14_378 = VisionConfig(
    kind="siglip", image_size=(378, 378), patch_size=14, width=1152, num_heads=16, head_dim=72,
    mlp_dim=4304, num_layers=25, activation="gelu_tanh", norm_eps=1e-6, use_cls_token=False,
    pre_ln=False, patch_bias=True, feature_layers=(24, 18))

# The releases (allenai/molmo2 README: Molmo2-8B uses qwen3_8b, Molmo2-4B qwen3_4b_instruct,
# Molmo2-O-7B olmo3_7b_instruct; their LlmConfigs in olmo/model_configs.py; the adapter's SwiGLU
# half = the LLM's, as convert_molmo2_to_hf.py sets it; max_position_embeddings = the
# --override_max_model_len the README gives for the HF conversion). Parameter totals
# (jax.eval_shape, = transformers' count of the same config): Molmo2-4B 4,850,869,200, the
# released total (metadata.total_parameters of the hub's model.safetensors.index.json);
# Molmo2-8B 8,661,703,120 and Molmo2-O-7B 7,760,786,896, not checked against released files
# (tests/test_convert_hf_molmo2.py says where each figure comes from). A structural check of 8B:
# a public copy of its hub folder has a 714-line model.safetensors.index.json, i.e. 706 tensor
# names plus the 8 lines around them, and this preset writes 706 tensors (O-7B's: 674).
MOLMO2_8B = Molmo2Config(
    vision=SIGLIP2_SO400M_14_378, adapter=AdapterConfig(projector_hidden=12288),
    llm=LLMConfig(d_model=4096, n_layers=36, n_heads=32, n_kv_heads=8, head_dim=128, mlp_hidden_size=2 * 12288,
                  vocab_size=151936, embedding_size=151936, additional_vocab_size=128, norm_eps=1e-6,
                  rope_theta=1_000_000.0, max_position_embeddings=36864, qkv_bias=False, qk_norm=True,
                  qk_norm_per_head=True))

MOLMO2_4B = Molmo2Config(
    vision=SIGLIP2_SO400M_14_378, adapter=AdapterConfig(projector_hidden=9728),
    llm=LLMConfig(d_model=2560, n_layers=36, n_heads=32, n_kv_heads=8, head_dim=128, mlp_hidden_size=2 * 9728,
                  vocab_size=151936, embedding_size=151936, additional_vocab_size=128, norm_eps=1e-6,
                  rope_theta=5_000_000.0, max_position_embeddings=36864, qkv_bias=False, qk_norm=True,
                  qk_norm_per_head=True))

# OLMo3-7B: post-norm, full-width QK-norm, YaRN on its 8 full-attention layers only (the
# official model's other layers are sliding-window in OLMo3, but Molmo2 runs every layer with
# full attention: its flash call passes window (-1, -1) and neither its HF config nor
# transformers has a window). Special token ids: the Qwen3 releases' offsets from the end of
# the base vocabulary (not checked against the hub config, which is not reachable from here).
_OLMO3_VOCAB = 100278
MOLMO2_O_7B = Molmo2Config(
    vision=SIGLIP2_SO400M_14_378, adapter=AdapterConfig(projector_hidden=11008),
    llm=LLMConfig(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128, mlp_hidden_size=2 * 11008,
                  vocab_size=_OLMO3_VOCAB, embedding_size=_OLMO3_VOCAB, additional_vocab_size=128, norm_eps=1e-6,
                  rope_theta=500_000.0, max_position_embeddings=65536, qkv_bias=False, qk_norm=True,
                  norm_after=True,
                  rope_scaling=RopeScaling(rope_type="yarn", factor=8.0, original_max_position_embeddings=8192,
                                           attention_factor=1.2079441541679836, beta_fast=32.0, beta_slow=1.0),
                  rope_scaling_layers=tuple(range(3, 32, 4))),
    image_start_token_id=_OLMO3_VOCAB, image_end_token_id=_OLMO3_VOCAB + 1, image_patch_id=_OLMO3_VOCAB + 2,
    low_res_image_start_token_id=_OLMO3_VOCAB + 4, frame_start_token_id=_OLMO3_VOCAB + 7,
    frame_end_token_id=_OLMO3_VOCAB + 8)

# Tiny configs for tests: 24 px crops of 4 px patches (6x6 patches), toy widths.
TINY_VISION2 = VisionConfig(
    kind="siglip", image_size=(24, 24), patch_size=4, width=32, num_heads=2, head_dim=16, mlp_dim=64,
    num_layers=4, activation="gelu_tanh", norm_eps=1e-6, use_cls_token=False, pre_ln=False, patch_bias=True,
    feature_layers=(-1, -3))
TINY_ADAPTER = AdapterConfig(width=32, num_heads=2, head_dim=16, projector_hidden=48)
_TINY_IDS = dict(image_start_token_id=500, image_end_token_id=501, image_patch_id=502,
                 low_res_image_start_token_id=503, frame_start_token_id=504, frame_end_token_id=505)

TINY_MOLMO2_QWEN3 = Molmo2Config(
    vision=TINY_VISION2, adapter=TINY_ADAPTER,
    llm=LLMConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, mlp_hidden_size=192,
                  vocab_size=500, embedding_size=500, additional_vocab_size=12, norm_eps=1e-6,
                  rope_theta=1_000_000.0, max_position_embeddings=4096, qkv_bias=False, qk_norm=True,
                  qk_norm_per_head=True),
    **_TINY_IDS)

TINY_MOLMO2_OLMO3 = Molmo2Config(
    vision=TINY_VISION2, adapter=TINY_ADAPTER,
    llm=LLMConfig(d_model=64, n_layers=3, n_heads=4, n_kv_heads=4, head_dim=16, mlp_hidden_size=192,
                  vocab_size=500, embedding_size=500, additional_vocab_size=12, norm_eps=1e-6,
                  rope_theta=500_000.0, max_position_embeddings=512, qkv_bias=False, qk_norm=True,
                  norm_after=True,
                  rope_scaling=RopeScaling(rope_type="yarn", factor=8.0, original_max_position_embeddings=64,
                                           attention_factor=1.2, beta_fast=32.0, beta_slow=1.0),
                  rope_scaling_layers=(0, 2)),
    **_TINY_IDS)

PRESETS = {
    "molmo2-4b": MOLMO2_4B,
    "molmo2-8b": MOLMO2_8B,
    "molmo2-o-7b": MOLMO2_O_7B,
    "tiny-molmo2-qwen3": TINY_MOLMO2_QWEN3,
    "tiny-molmo2-olmo3": TINY_MOLMO2_OLMO3,
}


def get_preset(name: str) -> Molmo2Config:
    return lookup_preset(PRESETS, name, "Molmo2")

"""Official Hugging Face Molmo checkpoints <-> molmo-jax parameters (spec §7).

    config, params = load_hf_checkpoint("Molmo-7B-D-0924/")   # nnx.State of the Molmo params
    model = load_hf_model("Molmo-7B-D-0924/")                  # the same, merged into a Molmo
    save_hf_checkpoint("out/", params, config)                 # official key layout again
    stream_hf_checkpoint("out/", params, config, max_shard_bytes=2**30)  # the same, shard by shard

A folder holds config.json and model.safetensors or a sharded model.safetensors.index.json
(convert/hf_folder.py). Which key map applies is read from the config: the dense releases
(convert/molmo_keys.py), MolmoE-1B (convert/molmoe_keys.py) or Molmo2 (convert/molmo2_keys.py,
model_type "molmo2", built as model/molmo2.Molmo2); each maps every official key to
exactly one slice of our parameters and back (convert/links.py). A missing, unexpected or
wrongly shaped tensor is an error that names the key and both shapes; nothing is skipped or
broadcast. Keys may carry the `model.` prefix (HF hub) or not (official training checkpoints);
written keys always carry it.
"""
from __future__ import annotations

import os
from typing import Dict, List, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from molmo_jax.convert import molmo2_keys, molmo_keys, molmoe_keys
from molmo_jax.convert.hf_folder import read_config_json, read_hf_tensors, write_hf_folder
from molmo_jax.convert.links import (Link, abstract_state, get_path, params_to_tensors, pure_params,
                                     tensors_to_params)
from molmo_jax.convert.safetensors_stream import write_json, write_safetensors
from molmo_jax.model.molmo2_config import Molmo2Config
from molmo_jax.model.models import ModelConfig as AnyConfig, build_model

PREFIX = molmo_keys.PREFIX


def family(config: AnyConfig):
    """The key-map module of a model config: Molmo2's, MolmoE-1B's for MoE blocks, the dense releases' otherwise."""
    if isinstance(config, Molmo2Config):
        return molmo2_keys
    return molmoe_keys if config.llm.block_type == "moe" else molmo_keys


def molmo_links(config: AnyConfig) -> List[Link]:
    return family(config).key_map(config)


def config_from_hf(cfg: Mapping) -> AnyConfig:
    """An HF Molmo config.json dict -> MolmoConfig (MolmoE-1B writes OLMo-style keys, block_type "moe"),
    or a Molmo2 one (model_type "molmo2") -> Molmo2Config."""
    if cfg.get("model_type") == "molmo2":
        return molmo2_keys.config_from_hf(cfg)
    return (molmoe_keys if cfg.get("block_type") == "moe" else molmo_keys).config_from_hf(cfg)


def config_to_hf(config: AnyConfig) -> Dict:
    """MolmoConfig -> the HF config.json dict that `config_from_hf` reads back equal."""
    return family(config).config_to_hf(config)


def abstract_params(config: AnyConfig) -> Dict:
    """Pure nested dict of jax.ShapeDtypeStruct for the model's parameters (nothing allocated)."""
    return abstract_state(lambda: build_model(config, nnx.Rngs(0)))


class _Prefixed(Mapping):
    """`tensors` with the `model.` prefix before every key; values are looked up only when asked
    for, so a lazy mapping (hf_folder.HFTensors) stays lazy."""

    def __init__(self, tensors: Mapping[str, object]):
        self.tensors = tensors

    def __getitem__(self, key: str):
        if not key.startswith(PREFIX):
            raise KeyError(key)
        return self.tensors[key[len(PREFIX):]]

    def __contains__(self, key) -> bool:  # without reading the tensor
        return isinstance(key, str) and key.startswith(PREFIX) and key[len(PREFIX):] in self.tensors

    def __iter__(self):
        return (PREFIX + k for k in self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def hf_to_params(state_dict: Mapping[str, object], config: AnyConfig) -> Dict:
    """Official tensors (name -> array [PyTorch layout], with or without the `model.`
    prefix) -> pure nested dict of our float32 parameters (stacked per block)."""
    if state_dict and not any(k.startswith(PREFIX) for k in state_dict):
        state_dict = _Prefixed(state_dict)
    if family(config) is molmo2_keys:
        state_dict = molmo2_keys.released_embedding(state_dict, config)
    return tensors_to_params(state_dict, molmo_links(config), abstract_params(config))


def params_to_hf(params, config: AnyConfig) -> Dict[str, jax.Array]:
    """Our parameters (pure nested dict, nnx.State or a Molmo) -> official tensors with the
    `model.` prefix, numpy arrays in PyTorch layout and the parameters' dtype (abstract
    under jax.eval_shape)."""
    params = jax.tree.map(lambda a: a if isinstance(a, jax.core.Tracer) else np.asarray(a), pure_params(params))
    return params_to_tensors(params, molmo_links(config), abstract_params(config))


def read_hf_config(folder: str) -> AnyConfig:
    return config_from_hf(read_config_json(folder))


def load_hf_checkpoint(folder: str) -> Tuple[AnyConfig, nnx.State]:
    """(config from config.json, nnx.State of float32 parameters) of an official HF folder."""
    config = read_hf_config(folder)
    pure = jax.tree.map(jnp.asarray, hf_to_params(read_hf_tensors(folder), config))
    state = nnx.state(nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0))), nnx.Param)
    state.replace_by_pure_dict(pure)
    return config, state


def load_hf_model(folder: str, **config_changes):
    """A Molmo built from an HF folder; `config_changes` (e.g. dtype="bfloat16") override
    the numerics fields of the config read from config.json."""
    config, state = load_hf_checkpoint(folder)
    config = config.replace(**config_changes)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0))))
    return nnx.merge(graphdef, state)


def save_hf_checkpoint(folder: str, params, config: AnyConfig, *, dtype=None,
                       max_shard_bytes: Optional[int] = None) -> None:
    """Writes config.json and model.safetensors (or shards + index above max_shard_bytes), in memory;
    `python -m molmo_jax.export` streams a trainer checkpoint instead (train/hf_interop.py)."""
    tensors = {k: v if dtype is None else v.astype(dtype) for k, v in params_to_hf(params, config).items()}
    write_hf_folder(folder, tensors, config_to_hf(config), max_shard_bytes=max_shard_bytes)


def stream_hf_checkpoint(folder: str, params, config: AnyConfig, *, max_shard_bytes: int, dtype=np.float32) -> None:
    """Writes config.json, safetensors shards and their index, converting one parameter group
    at a time (convert/safetensors_stream.py): host memory holds `params` plus one group's
    tensors, never the whole checkpoint a second time. dtype: np.float32 or ml_dtypes.bfloat16."""
    pure = pure_params(params)
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, "config.json"), config_to_hf(config))
    write_safetensors(folder, lambda paths: {p: np.asarray(get_path(pure, p)) for p in paths}, molmo_links(config),
                      abstract_params(config), dtype, max_shard_bytes)

"""The model a typed config describes: Molmo for a MolmoConfig, Molmo2 for a Molmo2Config.

    model = build_model(config, nnx.Rngs(0))

    config = recorded_config(meta)                # a checkpoint's meta -> its typed model config

One place that maps a config type to its model class, for the code that serves both families
(LoRA in model/lora.py, the checkpoint converters in convert/hf_molmo.py, the readers of
training checkpoints: inference/predictor.py, train/hf_interop.py).
"""
from __future__ import annotations

from typing import Mapping, Union

from flax import nnx

from molmo_jax.model.config import MolmoConfig
from molmo_jax.model.molmo import Molmo
from molmo_jax.model.molmo2 import Molmo2
from molmo_jax.model.molmo2_config import Molmo2Config

ModelConfig = Union[MolmoConfig, Molmo2Config]


def build_model(config: ModelConfig, rngs: nnx.Rngs) -> Union[Molmo, Molmo2]:
    """Molmo2 for a Molmo2Config, Molmo otherwise."""
    return Molmo2(config, rngs=rngs) if isinstance(config, Molmo2Config) else Molmo(config, rngs=rngs)


CONFIG_CLASSES = {"molmo": MolmoConfig, "molmo2": Molmo2Config}


def recorded_family(meta: Mapping) -> str:
    """The family a checkpoint's meta names ("model_family"). Checkpoints of trainers that did
    not record it tell by their model dict: Molmo2's has an "adapter", Molmo's a "connector"."""
    return meta.get("model_family") or ("molmo2" if "adapter" in meta.get("model", {}) else "molmo")


def recorded_config(meta: Mapping) -> ModelConfig:
    """The typed model config of a checkpoint's meta (its "model" dict, of recorded_family).
    ValueError names an unknown family or a model dict that does not read."""
    name = recorded_family(meta)
    if name not in CONFIG_CLASSES:
        raise ValueError(f"model_family {name!r} is none of {', '.join(CONFIG_CLASSES)}")
    if "model" not in meta:
        raise ValueError(f"no 'model' config (keys: {sorted(meta)})")
    try:
        return CONFIG_CLASSES[name].from_dict(meta["model"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"the recorded {name} model config does not read: {e}") from None

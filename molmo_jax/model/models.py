"""The model a typed config describes: Molmo for a MolmoConfig, Molmo2 for a Molmo2Config.

    model = build_model(config, nnx.Rngs(0))

One place that maps a config type to its model class, for the code that serves both families
(LoRA in model/lora.py, the checkpoint converters in convert/hf_molmo.py).
"""
from __future__ import annotations

from typing import Union

from flax import nnx

from molmo_jax.model.config import MolmoConfig
from molmo_jax.model.molmo import Molmo
from molmo_jax.model.molmo2 import Molmo2
from molmo_jax.model.molmo2_config import Molmo2Config

ModelConfig = Union[MolmoConfig, Molmo2Config]


def build_model(config: ModelConfig, rngs: nnx.Rngs) -> Union[Molmo, Molmo2]:
    """Molmo2 for a Molmo2Config, Molmo otherwise."""
    return Molmo2(config, rngs=rngs) if isinstance(config, Molmo2Config) else Molmo(config, rngs=rngs)

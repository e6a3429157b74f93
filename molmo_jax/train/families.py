"""The model families the trainer runs, chosen by config.model_family ("molmo" | "molmo2").

A family says what differs between them for training: its typed model config, how the model is
built, which batch keys it consumes and how they become the model's call arguments, the shapes
of a global batch (for tools/aot) and its FLOPs. Everything else (the update step, the loss,
optimizer groups, sharding, checkpoints, exact resume) is shared. Molmo2's pieces are in
train/molmo2_family.py.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Tuple, Union

import jax.numpy as jnp

from data_pipelines.pipeline import crop_fields, crops_per_row, make_pipeline
from molmo_jax.model import flops, lora
from molmo_jax.model.config import MolmoConfig
from molmo_jax.model.molmo2_config import Molmo2Config
from molmo_jax.train import molmo2_family
from molmo_jax.train.metrics_logging import trained_step_flops, useful_train_step_flops


ModelConfig = Union[MolmoConfig, Molmo2Config]


@dataclasses.dataclass(frozen=True)
class Family:
    """inputs: batch keys the model consumes besides the targets; build(model_cfg, lora_cfg,
    rngs) -> model; model_kwargs(batch) -> its call arguments; batch_shapes(model_cfg, config,
    rows) -> {key: (shape, dtype)}; forward_flops(model_cfg, config, rows) -> {'vit',
    'connector', 'llm', 'total'}; useful_step_flops(model_cfg, host_batch) -> the FLOPs of a
    step over the batch's real tokens and crops; describe(config) -> the row geometry in words;
    make_pipeline(config, process_index=, process_count=) -> this host's iterable of batches;
    check_config(config) raises ValueError (one line) for what only this family cannot run;
    data_meta(config) -> what every checkpoint records of the data layout (for export / predict)."""
    name: str
    config_cls: type
    inputs: Tuple[str, ...]
    build: Callable
    model_kwargs: Callable
    batch_shapes: Callable
    forward_flops: Callable
    useful_step_flops: Callable
    describe: Callable
    make_pipeline: Callable
    check_config: Callable
    data_meta: Callable


MOLMO_INPUTS = ("input_ids", "images", "image_masks", "image_input_idx", "position_ids", "subsegment_ids")


def molmo_batch_shapes(cfg: MolmoConfig, rows: int, seq_len: int, crops: int) -> Dict[str, tuple]:
    """{key: (shape, dtype)} of a Molmo batch as data_pipelines.pipeline emits it."""
    v, c = cfg.vision, cfg.connector
    tokens = -(-v.grid[0] // c.pool_h) * -(-v.grid[1] // c.pool_w)  # pooled tokens per crop
    text = (rows, seq_len)
    return {"input_ids": (text, jnp.int32), "target_tokens": (text, jnp.int32), "loss_masks": (text, jnp.float32),
            "position_ids": (text, jnp.int32), "subsegment_ids": (text, jnp.int32),
            "images": ((rows, crops, v.num_patches, v.patch_dim), jnp.float32),
            "image_masks": ((rows, crops, v.num_patches), jnp.float32),
            "image_input_idx": ((rows, crops, tokens), jnp.int32)}


MOLMO = Family(
    name="molmo", config_cls=MolmoConfig, inputs=MOLMO_INPUTS, build=lora.build,
    model_kwargs=lambda batch: {k: batch[k] for k in MOLMO_INPUTS if k in batch},
    batch_shapes=lambda cfg, config, rows: molmo_batch_shapes(cfg, rows, config.data.seq_len, crops_per_row(config)),
    forward_flops=lambda cfg, config, rows: flops.forward_flops(cfg, rows, config.data.seq_len, crops_per_row(config)),
    useful_step_flops=lambda cfg, b: useful_train_step_flops(cfg, b["input_ids"], b.get("images")),
    describe=lambda config: f"{config.data.seq_len} tokens, {crops_per_row(config)} crops per row",
    make_pipeline=make_pipeline, check_config=lambda config: None,
    data_meta=lambda config: {"crop": crop_fields(config)})

MOLMO2 = Family(
    name="molmo2", config_cls=Molmo2Config, inputs=molmo2_family.INPUTS, build=lora.build,
    model_kwargs=molmo2_family.model_kwargs, batch_shapes=molmo2_family.batch_shapes,
    forward_flops=molmo2_family.forward_flops,
    useful_step_flops=lambda cfg, b: trained_step_flops(molmo2_family.useful_forward_flops(cfg, b)),
    describe=molmo2_family.describe, make_pipeline=molmo2_family.make_pipeline,
    check_config=molmo2_family.check_config, data_meta=molmo2_family.data_meta)

FAMILIES = {f.name: f for f in (MOLMO, MOLMO2)}


ALL_INPUTS = tuple(dict.fromkeys(k for f in FAMILIES.values() for k in f.inputs))


def family_of(config: Any) -> Family:
    """The family config.model_family names; an unknown name is one error naming the known."""
    name = config["model_family"]
    if name not in FAMILIES:
        raise ValueError(f"config.model_family={name!r}: choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of_model(model_cfg: Any) -> Family:
    """The family of a typed model config (MolmoConfig or Molmo2Config)."""
    for family in FAMILIES.values():
        if isinstance(model_cfg, family.config_cls):
            return family
    raise TypeError(f"no model family has configs of type {type(model_cfg).__name__}")


def model_config_of(family: Family, model: Dict[str, Any], platform: str) -> Any:
    """The typed model config of config.model's dict; dtype "auto" is float32 on CPU and
    bfloat16 on accelerators."""
    d = dict(model)
    if d.get("dtype", "auto") == "auto":
        d["dtype"] = "float32" if platform == "cpu" else "bfloat16"
    return family.config_cls.from_dict(d)


def step_flops(family: Family, cfg: Any, config, rows: int) -> float:
    """The analytic FLOPs of one training step over `rows` full rows (all parts trained)."""
    return trained_step_flops(family.forward_flops(cfg, config, rows))


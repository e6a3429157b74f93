"""Checks of an experiment config before anything is built, compiled or written.

Every problem is one `ConfigError` line naming the key, the value and what is allowed (or the
keys that come close to a misspelt one), so a typo costs seconds instead of a compile and a
traceback. `validate` covers the values that would otherwise crash later (a zero checkpoint
interval is a ZeroDivisionError after compiling, a negative width a JAX shape error).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Iterator, Mapping, Optional, Tuple

import ml_collections

from molmo_jax.model import lora
from molmo_jax.model.config import MolmoConfig
from molmo_jax.model.layers import ACTIVATIONS, REMAT_POLICIES
from molmo_jax.train import families


class ConfigError(ValueError):
    """A config key or value the trainer cannot run with; the message is one line."""


# Training keys: (dotted key, smallest allowed value). Integers unless a float default says otherwise.
AT_LEAST = (
    ("train.global_batch", 1), ("train.grad_accum_steps", 1), ("train.total_steps", 1),
    ("train.z_loss_weight", 0.0), ("train.ce_chunk_tokens", 0),
    ("checkpoint.every", 1), ("checkpoint.keep", 1), ("checkpoint.keep_every", 0),
    ("log.every", 1),
    ("data.seq_len", 1), ("data.max_crops", 1), ("data.num_workers", 0), ("data.prefetch", 0),
    ("data.num_examples", 1), ("data.max_points", 0), ("data.synthetic_image_size", 1),
    ("data.synthetic_examples", 1), ("data.clock_image_size", 1), ("data.examples_per_row", 1),
    ("data.skip_check_after", 0),
    ("optimizer.eps", 0.0), ("optimizer.weight_decay", 0.0), ("optimizer.clip_norm", 0.0),
    ("optimizer.final_lr_fraction", 0.0),
    ("sharding.max_replicated_fraction", 0.0),
)
# Keys whose values must lie in [0, 1) (decay rates, rates of skipped examples).
FRACTIONS = ("optimizer.b1", "optimizer.b2", "data.max_skip_rate")
OPTIMIZER_GROUPS = ("vit", "connector", "llm")
MESH_AXES = ("data", "fsdp", "tensor", "expert")

# Model fields that may be 0 (they are unused or mean "none" at 0); every other int is > 0.
MODEL_ZERO_OK = {"llm.additional_vocab_size", "llm.moe_num_experts", "llm.moe_top_k", "llm.moe_hidden_size"}
MODEL_RATES = {"llm.residual_dropout", "llm.response_residual_dropout"}
MODEL_CHOICES = {
    "dtype": ("auto", "float32", "bfloat16"),
    "remat_policy": tuple(sorted(REMAT_POLICIES)),
    "init_scheme": ("normal", "fan_in"),
    "vision.kind": ("clip", "siglip"),
    "vision.activation": tuple(sorted(ACTIVATIONS)),
    "connector.pooling": ("attention_meanq", "attention"),
    "connector.padding_embed": ("pad_and_partial_pad", "none"),
    "llm.block_type": ("dense", "moe"),
    "llm.moe_dispatch": ("sorted", "capacity"),
}


def unknown_key(config: Mapping, dotted: str) -> Optional[str]:
    """The problem with override key `dotted` (e.g. "optimizer.lrr"), or None when it exists.

    Names the keys close to the misspelt one (its siblings first, else any key of the config)
    and the valid keys where the path stopped matching.
    """
    node, walked = config, []
    for key in dotted.split("."):
        if not _is_node(node):
            return f"config.{'.'.join(walked)} holds a {type(node).__name__} value and has no key {key!r}"
        if key not in node:
            keys = sorted(node.keys())
            prefix = "config." + "".join(k + "." for k in walked)
            close = [prefix + c for c in difflib.get_close_matches(key, keys, n=3, cutoff=0.6)]
            if not close:
                every = [k for k, _ in _leaves(config)]
                close = ["config." + c for c in difflib.get_close_matches(dotted, every, n=3, cutoff=0.75)]
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            return f"unknown config key config.{dotted}: {hint}the keys of {prefix.rstrip('.')} are {', '.join(keys)}"
        node, walked = node[key], walked + [key]
    return None


def validate(config: Mapping) -> None:
    """Raises ConfigError naming the first value the trainer cannot run with."""
    for key, low in AT_LEAST:
        _check_number(config, key, low)
    for key in FRACTIONS:
        _check_number(config, key, 0.0, high=1.0)
    for group in OPTIMIZER_GROUPS:
        _check_number(config, f"optimizer.{group}.lr", 0.0)
        _check_number(config, f"optimizer.{group}.warmup_steps", 0)
    for axis in MESH_AXES:
        size = _get(config, f"mesh.{axis}")
        if not _is_int(size) or not (size >= 1 or size == -1):
            raise ConfigError(f"config.mesh.{axis}={size!r}: a mesh axis size is a positive integer, "
                              "or -1 for all remaining devices")
    batch, accum = _get(config, "train.global_batch"), _get(config, "train.grad_accum_steps")
    if batch % accum:
        raise ConfigError(f"config.train.global_batch={batch} is not divisible by config.train.grad_accum_steps={accum}")
    try:
        family = families.family_of(config)
    except KeyError:
        raise ConfigError("config.model_family is missing (experiment configs build on configs.common.base_config)"
                          ) from None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    built = _validate_model(_get(config, "model"), family.config_cls)
    try:
        family.check_config(config)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _validate_lora(_get(config, "lora"), built)


def _validate_lora(node: Mapping, model: MolmoConfig) -> None:
    """config.lora: rank >= 0, alpha > 0, dropout in [0, 1), a known base_dtype, targets that each
    select a layer."""
    d = node.to_dict() if hasattr(node, "to_dict") else dict(node)
    try:
        cfg = lora.LoraConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.lora: {e}") from None
    if not _is_int(cfg.rank) or cfg.rank < 0:
        raise ConfigError(f"config.lora.rank={cfg.rank!r}: expected an integer >= 0 (0 = no LoRA)")
    if not cfg.enabled:
        if cfg.base_dtype != "float32":  # a quantized base trains only through adapters
            raise ConfigError(f"config.lora.base_dtype={cfg.base_dtype!r} needs config.lora.rank > 0 (LoRA); full "
                              "fine-tuning trains float32 weights")
        return
    if not _is_number(cfg.alpha) or not math.isfinite(cfg.alpha) or cfg.alpha <= 0:
        raise ConfigError(f"config.lora.alpha={cfg.alpha!r}: expected a finite number > 0")
    if not _is_number(cfg.dropout) or not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"config.lora.dropout={cfg.dropout!r}: expected a number in [0, 1) (0 = no dropout)")
    if cfg.base_dtype not in lora.BASE_DTYPES:
        raise ConfigError(f"config.lora.base_dtype={cfg.base_dtype!r}: choose one of {', '.join(lora.BASE_DTYPES)}")
    if not cfg.targets or not all(isinstance(t, str) for t in cfg.targets):
        raise ConfigError(f"config.lora.targets={cfg.targets!r}: expected preset names "
                          f"({', '.join(lora.TARGET_PRESETS)}) or regexes over layer paths")
    try:
        # The layer paths do not depend on the compute dtype ("auto" resolves only on devices).
        lora.target_paths(list(lora.dense_shapes(dataclasses.replace(model, dtype="float32"))), cfg.targets)
    except ValueError as e:
        raise ConfigError(f"config.lora.targets: {e}") from None


def _validate_model(model: Mapping, config_cls: type = MolmoConfig) -> MolmoConfig:
    """The model part (a config_cls: the family's MolmoConfig or Molmo2Config): unknown keys,
    choices, sizes; value types are those of the defaults."""
    data = model.to_dict() if hasattr(model, "to_dict") else dict(model)
    try:
        built = config_cls.from_dict(data)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.model: {e}") from None
    types = dict(_leaf_types(config_cls()))
    for key, value in _leaves(data):
        where = f"config.model.{key}={value!r}"
        if key in MODEL_CHOICES:
            if value not in MODEL_CHOICES[key]:
                raise ConfigError(f"{where}: choose one of {', '.join(MODEL_CHOICES[key])}")
        elif key in MODEL_RATES:
            if not _is_number(value) or not 0.0 <= value < 1.0:
                raise ConfigError(f"{where}: a dropout rate lies in [0, 1)")
        elif types.get(key) is int or (key == "connector.projector_hidden" and value is not None):
            low = 0 if key in MODEL_ZERO_OK else 1
            if not _is_int(value) or value < low:
                raise ConfigError(f"{where}: expected an integer >= {low}")
        elif types.get(key) is float:
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{where}: expected a finite number >= 0")
    image_size = built.vision.image_size
    if len(image_size) != 2 or not all(_is_int(s) and s > 0 for s in image_size):
        raise ConfigError(f"config.model.vision.image_size={tuple(image_size)!r}: expected (height, width) > 0")
    if built.llm.n_heads % built.llm.n_kv_heads:
        raise ConfigError(f"config.model.llm.n_heads={built.llm.n_heads} is not a multiple of "
                          f"config.model.llm.n_kv_heads={built.llm.n_kv_heads}")
    return built


def _leaves(d: Mapping, prefix: str = "") -> Iterator[Tuple[str, Any]]:
    for k, v in d.items():
        if _is_node(v):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield prefix + k, v


def _leaf_types(cfg: Any, prefix: str = "") -> Iterator[Tuple[str, type]]:
    """(dotted field, type of its value in the built config) of a model config dataclass."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            yield from _leaf_types(v, f"{prefix}{f.name}.")
        elif v is not None:
            yield prefix + f.name, type(v)


def _get(config: Mapping, dotted: str) -> Any:
    node = config
    for k in dotted.split("."):
        if not _is_node(node) or k not in node:
            raise ConfigError(f"config.{dotted} is missing (experiment configs build on configs.common.base_config)")
        node = node[k]
    return node


def _is_node(v: Any) -> bool:
    return isinstance(v, (Mapping, ml_collections.ConfigDict))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_number(config: Mapping, key: str, low: float, high: Optional[float] = None) -> None:
    value = _get(config, key)
    wants_int = isinstance(low, int) and high is None
    ok = (_is_int(value) if wants_int else _is_number(value) and math.isfinite(value)) and value >= low
    if ok and high is not None:
        ok = value < high
    if not ok:
        kind = "an integer" if wants_int else "a number"
        bound = f">= {low}" if high is None else f"in [{low}, {high})"
        raise ConfigError(f"config.{key}={value!r}: expected {kind} {bound}")

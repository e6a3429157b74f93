"""What the trainer needs to know about Molmo2 (config.model_family = "molmo2"): its model,
its training batch (data_pipelines.molmo2_batch rows: one fixed crop / frame and pooled-token
budget per row), the model call on that batch, and its FLOPs. The update step, loss, optimizer
groups, checkpoints and resume are the trainer's own, shared with Molmo (train/families.py).

The budget lives in config.data: seq_len tokens, row_crops crops or frames, row_pooled_tokens
pooled tokens of row_pool_slots slots (9: a video frame's 3x3 window). The input pipeline
(`make_pipeline`) runs the real Molmo2 processor (config.data.processor: a transformers
processor folder, or a preset name of molmo2_processor.PRESETS; config.data.tokenizer: a
tokenizer with Molmo2's tokens) over mixture "video_shapes", the synthetic moving-shape videos
(config.data.synthetic_options["video_shapes"]: VideoShapesSource's task, num_frames, fps,
image_size, out_dir). The released Molmo2 data sets and their packing are not here yet.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict

import jax.numpy as jnp
import numpy as np

from data_pipelines import molmo2_batch, molmo2_processor
from data_pipelines.sources.synthetic.video_shapes import VideoShapesSource
from data_pipelines.tokenizer import load_tokenizer
from molmo_jax.model import molmo2_flops
from molmo_jax.model.molmo2_config import Molmo2Config

# Batch keys the model consumes besides the loss targets (data_pipelines.molmo2_batch.TEXT_KEYS
# and the image arrays).
INPUTS = ("input_ids", "position_ids", "mm_token_type_ids", "pixel_values", "token_pooling")


def check_config(config) -> None:
    """What a Molmo2 run cannot take: an empty row budget, Molmo's backbone folders."""
    d = config.data
    for key in ("row_crops", "row_pooled_tokens", "row_pool_slots"):
        value = d[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"config.data.{key}={value!r}: a Molmo2 row budget is an integer >= 1")
    if config.init.vit or config.init.llm:
        raise ValueError(f"config.init.vit={config.init.vit!r} / config.init.llm={config.init.llm!r} load Molmo's "
                         "backbones; a Molmo2 run starts from config.init.checkpoint (a run's checkpoints)")


def model_kwargs(batch: Dict[str, Any]) -> Dict[str, Any]:
    """Molmo2.__call__ arguments of a training batch: padding (-1 ids) becomes attention_mask 0
    at token id 0 and position 0 (masked, so neither is read)."""
    ids = batch["input_ids"]
    return {"input_ids": jnp.maximum(ids, 0), "attention_mask": ids != -1,
            "position_ids": jnp.maximum(batch["position_ids"], 0), "mm_token_type_ids": batch["mm_token_type_ids"],
            "pixel_values": batch["pixel_values"], "token_pooling": batch["token_pooling"]}


def budget(config) -> Dict[str, int]:
    """The row budget of an experiment config: {seq_len, crops, pooled_tokens, slots}."""
    d = config.data
    return {"seq_len": int(d.seq_len), "crops": int(d.row_crops), "pooled_tokens": int(d.row_pooled_tokens),
            "slots": int(d.row_pool_slots)}


def batch_shapes(cfg: Molmo2Config, config, batch: int) -> Dict[str, tuple]:
    """{key: (shape, dtype)} of a global batch of `batch` rows (what molmo2_batch emits)."""
    b = budget(config)
    v = cfg.vision
    text = (batch, b["seq_len"])
    return {"input_ids": (text, jnp.int32), "target_tokens": (text, jnp.int32), "loss_masks": (text, jnp.float32),
            "position_ids": (text, jnp.int32), "mm_token_type_ids": (text, jnp.int32),
            "pixel_values": ((batch, b["crops"], v.num_patches, v.patch_dim), jnp.float32),
            "token_pooling": ((batch, b["pooled_tokens"], b["slots"]), jnp.int32)}


def forward_flops(cfg: Molmo2Config, config, batch: int) -> Dict[str, float]:
    """One forward pass over `batch` full rows of the config's budget."""
    b = budget(config)
    return molmo2_flops.forward_flops(cfg, batch, b["seq_len"], b["crops"], b["pooled_tokens"], b["slots"])


def useful_forward_flops(cfg: Molmo2Config, host_batch: Dict[str, np.ndarray]) -> Dict[str, float]:
    """The forward FLOPs of a host batch's real work: each row's tokens (ids != -1), crops that
    are not padding (not all -1) and pooled tokens with a valid slot."""
    ids = np.asarray(host_batch["input_ids"])
    slots = host_batch["token_pooling"].shape[-1]
    crops = np.sum(~np.all(np.asarray(host_batch["pixel_values"]) == -1, axis=(2, 3)), axis=1)
    pooled = np.sum(np.any(np.asarray(host_batch["token_pooling"]) >= 0, axis=-1), axis=1)
    total: Dict[str, float] = {}
    for length, c, m in zip(np.sum(ids != -1, axis=1).tolist(), crops.tolist(), pooled.tolist()):
        if length:
            for part, value in molmo2_flops.forward_flops(cfg, 1, length, c, m, slots).items():
                total[part] = total.get(part, 0.0) + value
    return total or {"vit": 0.0, "connector": 0.0, "llm": 0.0, "total": 0.0}


def data_meta(config) -> Dict[str, Any]:
    """Checkpoint metadata of the data layout: the processor and the row budget."""
    return {"processor": config.data.processor, "row_budget": budget(config)}


def describe(config) -> str:
    b = budget(config)
    return (f"{b['seq_len']} tokens, {b['crops']} crops/frames, {b['pooled_tokens']} pooled tokens x "
            f"{b['slots']} slots per row")


def processor_config(name_or_folder: str) -> molmo2_processor.Molmo2ProcessorConfig:
    """config.data.processor: a preset name (molmo2_processor.PRESETS) or a processor folder."""
    if name_or_folder in molmo2_processor.PRESETS:
        return molmo2_processor.PRESETS[name_or_folder]
    if not name_or_folder:
        raise ValueError(f"config.data.processor is empty: give a Molmo2 processor folder or one of "
                         f"{sorted(molmo2_processor.PRESETS)}")
    return molmo2_processor.load_config(name_or_folder)


def make_pipeline(config, *, process_index: int = 0, process_count: int = 1):
    """This host's grain dataset of training batches (module docstring)."""
    d = config.data
    if d.mixture != "video_shapes":
        raise ValueError(f"config.data.mixture={d.mixture!r}: Molmo2 trains on 'video_shapes' (synthetic "
                         "moving-shape videos) so far; the released Molmo2 data sets are not in data_pipelines yet")
    if not d.tokenizer:
        raise ValueError("config.data.tokenizer is empty: give a tokenizer.json / folder with Molmo2's tokens")
    global_batch = int(config.train.global_batch)
    if global_batch % process_count:
        raise ValueError(f"config.train.global_batch={global_batch} is not divisible by {process_count} processes")
    tok = load_tokenizer(d.tokenizer, pad_to=int(config.model.llm.vocab_size))
    options = dict(d.synthetic_options.to_dict() if hasattr(d.synthetic_options, "to_dict") else d.synthetic_options)
    source = VideoShapesSource(int(d.synthetic_examples), seed=int(d.seed), **dict(options.get("video_shapes", {})))
    b = budget(config)
    processor = processor_config(d.processor)
    # A stage's frame budget is its row budget (the official stages set video.max_frames to it).
    sampling = dataclasses.replace(processor.sampling, max_frames=min(processor.sampling.max_frames, b["crops"]))
    rows = molmo2_batch.Molmo2Rows(source, tok, dataclasses.replace(processor, sampling=sampling),
                                   molmo2_batch.RowBudget(b["seq_len"], b["crops"], b["pooled_tokens"], b["slots"]))
    return molmo2_batch.make_rows_pipeline(rows, batch_size=global_batch // process_count,
                                           num_examples=int(d.num_examples), process_index=process_index,
                                           process_count=process_count)

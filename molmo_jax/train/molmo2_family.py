"""What the trainer needs to know about Molmo2 (config.model_family = "molmo2"): its model,
its training batch (data_pipelines.molmo2_pipeline: packed rows of one fixed crop / frame and
pooled-token budget), the model call on that batch, and its FLOPs. The update step, loss,
optimizer groups, checkpoints and resume are the trainer's own, shared with Molmo (train/families.py).

The budget lives in config.data: seq_len tokens, row_crops crops or frames, row_pooled_tokens
pooled tokens of row_pool_slots slots (9: a video frame's 3x3 window). The input pipeline
(`make_pipeline`) runs the real Molmo2 processor (config.data.processor: a transformers
processor folder, or a preset name of molmo2_processor.PRESETS; config.data.tokenizer: a
tokenizer with Molmo2's tokens) over config.data.mixture: a mixture of data_pipelines.mixtures or
one dataset (config.data.mixture_datasets: only those of its sets), each "video_shapes" (the synthetic moving-shape videos,
config.data.synthetic_options["video_shapes"]: VideoShapesSource's task, num_frames, fps,
image_size, out_dir) or a released Molmo2 set (data_pipelines.sources.molmo2, under
config.data.molmo2_dir), and packs its examples as the official trainer does
(config.data.pack_buffer examples in the packer's buffer, 0 = one example per row;
pack_image_weight; loss_token_weighting; max_text_tokens, 0 = none; last_message_loss_only).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict

import jax.numpy as jnp
import numpy as np

from data_pipelines import molmo2_pipeline, molmo2_processor
from data_pipelines.mixtures import get_mixture, mixture_datasets, mixture_rates, override_rates, restrict
from data_pipelines.sources import molmo2 as molmo2_sources
from data_pipelines.sources.synthetic.video_shapes import VideoShapesSource
from data_pipelines.tokenizer import load_tokenizer
from molmo_jax.model import molmo2_flops
from molmo_jax.model.molmo2_config import Molmo2Config

# Batch keys the model consumes besides the loss targets (data_pipelines.molmo2_packing.TEXT_KEYS
# and the image arrays).
INPUTS = ("input_ids", "position_ids", "subsegment_ids", "mm_token_type_ids", "pixel_values", "token_pooling")


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
    at token id 0 and position 0 (masked, so neither is read); its subsegment id -1 is below every
    real one, so no real token sees it."""
    ids = batch["input_ids"]
    return {"input_ids": jnp.maximum(ids, 0), "attention_mask": ids != -1,
            "position_ids": jnp.maximum(batch["position_ids"], 0), "subsegment_ids": batch["subsegment_ids"],
            "mm_token_type_ids": batch["mm_token_type_ids"],
            "pixel_values": batch["pixel_values"], "token_pooling": batch["token_pooling"]}


def budget(config) -> Dict[str, int]:
    """The row budget of an experiment config: {seq_len, crops, pooled_tokens, slots}."""
    d = config.data
    return {"seq_len": int(d.seq_len), "crops": int(d.row_crops), "pooled_tokens": int(d.row_pooled_tokens),
            "slots": int(d.row_pool_slots)}


def batch_shapes(cfg: Molmo2Config, config, batch: int) -> Dict[str, tuple]:
    """{key: (shape, dtype)} of a global batch of `batch` rows (what molmo2_pipeline emits)."""
    b = budget(config)
    v = cfg.vision
    text = (batch, b["seq_len"])
    return {"input_ids": (text, jnp.int32), "target_tokens": (text, jnp.int32), "loss_masks": (text, jnp.float32),
            "position_ids": (text, jnp.int32), "subsegment_ids": (text, jnp.int32),
            "mm_token_type_ids": (text, jnp.int32), "pixel_values": ((batch, b["crops"], v.num_patches, v.patch_dim), jnp.float32),
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
    if not name_or_folder:
        raise ValueError(f"config.data.processor is empty: give a Molmo2 processor folder or one of "
                         f"{sorted(molmo2_processor.PRESETS)}")
    return molmo2_processor.config_for(name_or_folder)


def mixture_groups(config):
    """The groups of config.data.mixture (a mixture of data_pipelines.mixtures or one dataset),
    restricted to config.data.mixture_datasets when it names some (each group keeps its rate,
    shared among the sets kept: the official rates over the sets that are here)."""
    d = config.data
    groups = get_mixture(d.mixture, ("video_shapes", *sorted(molmo2_sources.SOURCES)))
    if len(d.mixture_datasets):
        try:
            groups = restrict(groups, list(d.mixture_datasets))
        except ValueError as e:
            raise ValueError(f"config.data.mixture_datasets: {e} {d.mixture!r}") from None
    return groups


def sources(config) -> Dict[str, Any]:
    """Dataset name -> source of the datasets config.data.mixture names: "video_shapes" (the synthetic
    videos, config.data.synthetic_options["video_shapes"]) or a Molmo2 set of data_pipelines.sources.molmo2
    read from config.data.molmo2_dir (videos from video_dir and / or the download cache video_cache_dir
    with video_manifest; images from image_dir). config.data.split "train" reads each set's training
    split (its own HF split for the sets of molmo2.TRAIN_SPLITS, as the official loaders do)."""
    d = config.data
    names = mixture_datasets(mixture_groups(config))
    served = ("video_shapes", *sorted(molmo2_sources.SOURCES))
    unserved = [n for n in names if n not in served]
    if unserved:
        raise ValueError(f"config.data.mixture={d.mixture!r} needs datasets no Molmo2 source serves yet: {unserved}; "
                         f"the Molmo2 pipeline serves {list(served)}")
    unsupported = {n: molmo2_pipeline.NOT_SUPPORTED[n] for n in names if n in molmo2_pipeline.NOT_SUPPORTED}
    if unsupported:
        why = "; ".join(f"{n}: {reason}" for n, reason in unsupported.items())
        raise ValueError(f"config.data.mixture={d.mixture!r} has sets the Molmo2 pipeline cannot train on yet ({why}); "
                         "use a mixture or dataset without them")
    if any(n != "video_shapes" for n in names) and not d.molmo2_dir:
        raise ValueError("config.data.molmo2_dir is empty: give the folder of the Molmo2 HF data sets")
    out = {}
    for name in names:
        if name == "video_shapes":
            options = d.synthetic_options.to_dict() if hasattr(d.synthetic_options, "to_dict") else d.synthetic_options
            out[name] = VideoShapesSource(int(d.synthetic_examples), seed=int(d.seed),
                                          **dict(dict(options).get("video_shapes", {})))
        else:
            split = molmo2_sources.TRAIN_SPLITS.get(name, d.split) if d.split == "train" else d.split
            out[name] = molmo2_sources.load(name, d.molmo2_dir, split, video_dir=d.video_dir or None,
                                            cache_dir=d.video_cache_dir or None, manifest=d.video_manifest or None,
                                            image_dir=d.image_dir or None)
    return out


def make_pipeline(config, *, process_index: int = 0, process_count: int = 1):
    """This host's pipeline of packed training batches (data_pipelines.molmo2_pipeline) over the
    mixture's sources (`sources`), in the row budget of the config."""
    d = config.data
    if not d.tokenizer:
        raise ValueError("config.data.tokenizer is empty: give a tokenizer.json / folder with Molmo2's tokens")
    global_batch = int(config.train.global_batch)
    if global_batch % process_count:
        raise ValueError(f"config.train.global_batch={global_batch} is not divisible by {process_count} processes")
    if int(d.num_workers):
        raise ValueError(f"config.data.num_workers={d.num_workers}: the Molmo2 pipeline runs in the training "
                         "process with a prefetch thread (config.data.prefetch); set num_workers=0")
    srcs = sources(config)
    tok = load_tokenizer(d.tokenizer, pad_to=int(config.model.llm.vocab_size))
    b = budget(config)
    processor = processor_config(d.processor)
    # A stage's frame budget is its row budget (the official stages set video.max_frames to it).
    sampling = dataclasses.replace(processor.sampling, max_frames=min(processor.sampling.max_frames, b["crops"]))
    processor = dataclasses.replace(processor, sampling=sampling)
    preprocess = molmo2_pipeline.Molmo2Preprocess(
        tok, processor, molmo2_pipeline.pack_config(tok, processor, b),
        formats={"video_shapes": molmo2_pipeline.PLAIN_FORMAT}, loss_token_weighting=d.loss_token_weighting or None,
        max_text_tokens=int(d.max_text_tokens) or None, last_message_loss_only=bool(d.last_message_loss_only))
    rates = mixture_rates(mixture_groups(config), {name: len(src) for name, src in srcs.items()})
    if d.get("mixture_rates"):  # some datasets' rates set by hand; 0 drops one
        rates = override_rates(rates, d.mixture_rates)
        srcs = {name: src for name, src in srcs.items() if name in rates}
    return molmo2_pipeline.make_pipeline_from_parts(
        srcs, rates, preprocess, seed=int(d.seed), batch_size=global_batch // process_count,
        num_examples=int(d.num_examples), process_index=process_index, process_count=process_count,
        buffer_size=int(d.pack_buffer), image_weight=float(d.pack_image_weight), prefetch=int(d.prefetch),
        max_points=int(d.max_points), max_skip_rate=float(d.max_skip_rate), skip_check_after=int(d.skip_check_after))

"""Image + prompt -> answer: checkpoint loading, preprocessing, batching and generation.

    predictor = Predictor.from_checkpoint("Molmo-7B-D-0924/")      # HF folder or orbax run
    [answer] = predictor.predict([Request(image="cat.jpg", prompt="Point to the cat")])
    answer.text, answer.points                                      # points: list[PointGroup]

A checkpoint is either an official Hugging Face folder (config.json, model.safetensors[.index.json]
and the tokenizer files) or a molmo-jax training checkpoint directory (orbax `<dir>/<step>/` with
the model config in its meta, or a run directory holding `checkpoints/`); the latter needs the
tokenizer given separately (`tokenizer=`).
Prompts are formatted as the released models were trained ("demo_or_style", spec §4.3): with the
default style "user_qa" the model sees " User: {prompt} Assistant:", exactly what the official HF
processor builds; a style such as "vqa2" or "pointing" adds its prefix where training did.
A request that cannot be answered (a dead or hostile image URL, a file that is no image) gets an
Answer with `error` set, and the other requests of the batch are answered.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from data_pipelines import formatting, images, multicrop, preprocess, tokenizer as tokenizer_lib
from data_pipelines.fetch import FetchConfig, FetchError, fetch
from data_pipelines.image_cache import refuse_non_image
from molmo_jax.convert import hf_molmo
from molmo_jax.convert.hf_folder import SAFETENSORS, is_hf_folder
from molmo_jax.inference.drawing import PointGroup, find_points
from molmo_jax.inference.generate import GenerationConfig, Generator
from molmo_jax.model import lora
from molmo_jax.model.config import MolmoConfig
from molmo_jax.model.models import recorded_config
from molmo_jax.model.molmo import Molmo
from molmo_jax.train.checkpointing import quiet_absl

# Inference preprocessing per model: the crop geometry of the releases, image ids from the tokenizer.
CROP_KEYS = ("images", "image_masks", "image_input_idx")
# Image URLs: 30 s for the whole exchange (connect, headers, body, one retry), bodies up to 32 MiB.
IMAGE_FETCH = FetchConfig(connect_timeout=10.0, read_timeout=15.0, deadline=30.0, max_bytes=32 * 2**20,
                          max_attempts=2, backoff=0.5, max_retry_after=5.0, user_agent="molmo-jax-predict/0.1")


class RequestError(ValueError):
    """A request that cannot be answered; the message is one line naming the input and the reason."""


@dataclasses.dataclass
class Request:
    """image: path, URL, bytes, uint8[H, W, 3] or None (text only). style: formatting style."""
    prompt: str
    image: Any = None
    style: str = "user_qa"


@dataclasses.dataclass
class Answer:
    text: str
    points: list[PointGroup]
    tokens: np.ndarray  # int32[N] generated ids (stop token excluded)
    error: Optional[str] = None  # why the request was not answered (text and points are then empty)


def read_image_source(source: Any, fetch_config: FetchConfig = IMAGE_FETCH) -> Any:
    """URLs are downloaded (bytes) within `fetch_config`'s deadline and size cap, a body that does
    not start like an image refused from its first bytes; anything else is passed on to
    `images.load_image`. A URL that fails raises RequestError naming it and the cause."""
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        try:
            return fetch(source, fetch_config, refuse_non_image)
        except FetchError as e:
            raise RequestError(f"image {source}: {e.cause}" + (f" ({e.detail})" if e.detail else "")) from None
    return source


def crop_bucket(crops: int, max_crops: int) -> int:
    """Crops (global included) padded to the next power of two, at most 1 + max_crops: a handful
    of compiled shapes instead of one per tiling, for little extra ViT work."""
    return min(1 << max(0, crops - 1).bit_length(), max(crops, max_crops + 1))


def collate(examples: Sequence[dict], max_crops: Optional[int] = None) -> dict[str, np.ndarray]:
    """Right-pad preprocessed examples into a batch: input_ids with -1 to the longest prompt,
    crops with -1 to the most crops (as the official collator), rounded up by `crop_bucket` when
    max_crops is given. Text-only batches get no images; a mix of image and text-only examples
    gives the text-only ones all-padding crops."""
    length = max(len(e["input_tokens"]) for e in examples)
    ids = np.full((len(examples), length), -1, np.int32)
    for row, e in enumerate(examples):
        ids[row, :len(e["input_tokens"])] = e["input_tokens"]
    batch = {"input_ids": ids}
    with_images = [e for e in examples if "images" in e]
    if with_images:
        crops = max(e["images"].shape[0] for e in with_images)
        if max_crops is not None:
            crops = crop_bucket(crops, max_crops)
        for key in CROP_KEYS:
            ref = with_images[0][key]
            out = np.full((len(examples), crops, *ref.shape[1:]), -1, ref.dtype)
            for row, e in enumerate(examples):
                if key in e:
                    out[row, :e[key].shape[0]] = e[key]
            batch[key] = out
    return batch


def _orbax_step_dir(path: str) -> str:
    """The newest `<step>/` with a `state` item under a run dir, its checkpoints/ dir, or itself."""
    for base in (path, os.path.join(path, "checkpoints")):
        if os.path.isdir(os.path.join(base, "state")):
            return base
        steps = [d for d in os.listdir(base) if d.isdigit()] if os.path.isdir(base) else []
        if steps:
            return os.path.join(base, max(steps, key=int))
    raise FileNotFoundError(f"{path}: neither an HF Molmo folder (config.json + {SAFETENSORS}) "
                            f"nor a molmo-jax checkpoint (<step>/state, or checkpoints/<step>/state)")


def orbax_meta(path: str) -> tuple[str, dict]:
    """(the step dir, its meta item) of a molmo-jax training checkpoint (_orbax_step_dir)."""
    step_dir = _orbax_step_dir(os.path.abspath(path))  # orbax reads no metadata through a relative path
    meta_path = os.path.join(step_dir, "meta", "metadata")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{step_dir}: no meta/metadata (the model config) in this checkpoint")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except ValueError as e:
        raise ValueError(f"{meta_path}: not JSON ({e})") from None
    if not isinstance(meta, dict) or "model" not in meta:
        raise KeyError(f"{meta_path}: no 'model' config (keys: {sorted(meta) if isinstance(meta, dict) else meta})")
    return step_dir, meta


def load_orbax_model(path: str):
    """The model of a molmo-jax training checkpoint (params only: trainable + frozen): a Molmo,
    or a Molmo2 where the meta records that family (models.recorded_config). A LoRA run's
    checkpoint (meta "lora") gives its base (the checkpoint step it records, in the run's
    base_dtype) with the adapters, unmerged."""
    step_dir, meta = orbax_meta(path)
    try:
        config = recorded_config(meta)
    except ValueError as e:
        raise ValueError(f"{step_dir}/meta: {e}") from None
    info = meta.get("lora")
    lora_cfg = lora.LoraConfig() if info is None else lora.LoraConfig(
        rank=info["rank"], alpha=info["alpha"], targets=tuple(info["targets"]), base_dtype=info["base_dtype"])
    if info is not None and info.get("base_step") is None:
        raise FileNotFoundError(f"{step_dir}: its adapters apply to a {info['base']}, which no checkpoint holds")
    abstract = nnx.eval_shape(lambda: lora.build(config, lora_cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    pure = nnx.to_pure_dict(abstract_state)
    with quiet_absl():  # it looks for the step's metadata file inside the item and warns
        checkpointer = ocp.PyTreeCheckpointer()
        stored = checkpointer.metadata(os.path.join(step_dir, "state")).item_metadata.tree
        if "params" not in stored:
            raise KeyError(f"{step_dir}/state has no 'params' (it holds {sorted(stored)})")
        # Trainable and frozen params are stored apart; the optimizer state is not read.
        target = {group: _subtree_like(stored[group], pure) for group in ("params", "frozen") if stored.get(group)}
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=device), target)
        restored = checkpointer.restore(
            os.path.join(step_dir, "state"),
            args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True))
    params = _merge(restored["params"], restored.get("frozen", {}))
    if info is not None:  # the base is not in the checkpoint: read it where the run read it
        base = nnx.to_pure_dict(nnx.state(load_orbax_model(os.path.join(info["base"], str(info["base_step"])))))
        params = _merge(lora.base_params(base, lora.dense_shapes(config), lora_cfg.base_dtype), params)
    nnx.replace_by_pure_dict(abstract_state, params)
    return nnx.merge(graphdef, abstract_state)


def _subtree_like(stored: Any, pure: Any) -> Any:
    """The part of the model's abstract pure dict that `stored` (checkpoint metadata) holds."""
    if isinstance(stored, dict):
        return {k: _subtree_like(v, pure[k if k in pure else int(k)]) for k, v in stored.items() if v}
    return jax.ShapeDtypeStruct(pure.shape, pure.dtype)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and k in out else v
    return out


def model_crop_config(config: MolmoConfig, max_crops: int) -> multicrop.CropConfig:
    """The crop geometry a model was built for: its ViT input and patch size and its pooling
    (the released models: 336 px crops of 14 px patches, 2x2 pooling). Overlap margins are the
    releases' 4 patches a side where the crop leaves a window, else one pooling window (small
    crops, e.g. the demo's 112 px)."""
    crop_patches = config.vision.image_size[0] // config.vision.patch_size
    pool = config.connector.pool_h
    margin = 4 if crop_patches - 8 >= pool else pool
    return multicrop.CropConfig(crop_size=config.vision.image_size[0], patch_size=config.vision.patch_size,
                                overlap_margins=(margin, margin), pool=pool, max_crops=max_crops)


class Predictor:
    """A model, its tokenizer and crop geometry, with compiled generation."""

    def __init__(self, model: Molmo, tokenizer: tokenizer_lib.Tokenizer,
                 crop: multicrop.CropConfig = multicrop.CropConfig(),
                 format_cfg: formatting.FormatConfig = formatting.FINETUNED, fetch_config: FetchConfig = IMAGE_FETCH):
        """format_cfg: FINETUNED (released chat models) or CAPTIONER (stage-1 checkpoints, which
        expect " long_caption 65:" and no chat roles; use style "long_caption"). fetch_config:
        the deadline and size cap of image URLs."""
        self.model, self.tokenizer, self.crop, self.format_cfg = model, tokenizer, crop, format_cfg
        self.fetch_config = fetch_config
        self.generator = Generator(model)

    @classmethod
    def from_checkpoint(cls, path: str, *, tokenizer: Optional[str] = None, max_crops: int = 12,
                        dtype: Optional[str] = None, captioner: bool = False,
                        fetch_config: FetchConfig = IMAGE_FETCH, weights: Optional[str] = None) -> "Predictor":
        """path: HF folder or orbax checkpoint (a LoRA run's: base + adapters, unmerged);
        tokenizer: file/folder (default: the checkpoint's); dtype: compute dtype override
        ("bfloat16" for speed); captioner: a stage-1 checkpoint; weights "int8" / "nf4":
        weight-only quantized inference (model/quantization.py)."""
        changes = {"dtype": dtype} if dtype else {}
        if is_hf_folder(path):
            model = hf_molmo.load_hf_model(path, **changes)
        else:
            model = load_orbax_model(path)
            if dtype:
                model = with_compute_dtype(model, dtype)
        if not isinstance(model, Molmo):
            raise ValueError(f"{path} holds a Molmo2 model, which this (Molmo) predictor does not run: "
                             f"python -m molmo_jax.predict and evaluate take it, the server does not yet")
        if weights:
            model = with_compute_dtype(model, model.config.dtype, weights)
        tok = tokenizer_lib.load_tokenizer(tokenizer or path, pad_to=model.config.llm.vocab_size)
        return cls(model, tok, model_crop_config(model.config, max_crops),
                   formatting.CAPTIONER if captioner else formatting.FINETUNED, fetch_config)

    def prepare(self, request: Request) -> dict:
        """One request -> unbatched model inputs (see `preprocess.preprocess_example`); RequestError
        when its image cannot be fetched or decoded."""
        if not isinstance(request.prompt, str):
            raise RequestError(f"prompt: expected a string, got {type(request.prompt).__name__}")
        example = {"question": request.prompt, "style": request.style}
        if request.image is not None:
            source = read_image_source(request.image, self.fetch_config)
            try:
                example["image"] = images.load_image(source)
            except images.ImageDecodeError as e:  # its message names the file (or the bytes' size)
                raise RequestError(f"image {e}") from None
        return preprocess.preprocess_example(example, self.tokenizer, self.crop,
                                             format_cfg=self.format_cfg, for_inference=True)

    def generate_batch(self, examples: Sequence[dict], config: GenerationConfig,
                       max_crops: Optional[int] = None, batch_size: Optional[int] = None) -> list[Answer]:
        """Prepared examples -> answers (one generate call). max_crops: of their preprocessing
        (default: this predictor's), bounds the crop padding. batch_size: pad a smaller (last)
        batch with copies of its first example, so it reuses the full batch's compiled program."""
        config = dataclasses.replace(config, stop_token_ids=tuple(config.stop_token_ids) or (self.tokenizer.eos_id,))
        padded = list(examples) + [examples[0]] * max(0, (batch_size or 0) - len(examples))
        out = self.generator(collate(padded, max_crops or self.crop.max_crops), config, self.tokenizer.decode)
        return [Answer(text.strip(), find_points(text), tokens[tokens >= 0])
                for text, tokens in zip(out.texts[:len(examples)], out.tokens[:len(examples)])]

    def predict(self, requests: Sequence[Request], config: GenerationConfig = GenerationConfig(max_new_tokens=200),
                batch_size: int = 8) -> list[Answer]:
        """Answers in request order; a request that fails `prepare` gets an Answer with `error`."""
        answers: list[Optional[Answer]] = [None] * len(requests)
        prepared = []
        for index, request in enumerate(requests):
            try:
                prepared.append((index, self.prepare(request)))
            except RequestError as e:
                answers[index] = Answer("", [], np.zeros((0,), np.int32), error=str(e))
        for start in range(0, len(prepared), batch_size):
            chunk = prepared[start:start + batch_size]
            done = self.generate_batch([example for _, example in chunk], config,
                                       batch_size=batch_size if len(prepared) > batch_size else None)
            for (index, _), answer in zip(chunk, done):
                answers[index] = answer
        return answers


def with_compute_dtype(model: Molmo, dtype: str, weights: Optional[str] = None) -> Molmo:
    """The same parameters (adapters included) in a model that computes in `dtype`; weights
    "int8" / "nf4" stores its float32 Dense kernels so, weight-only (model/quantization.py)."""
    lora_cfg = getattr(model, "lora_config", lora.LoraConfig())
    params = nnx.to_pure_dict(nnx.state(model))
    if weights and weights != lora_cfg.base_dtype:
        if lora_cfg.base_dtype != "float32":
            raise ValueError(f"the model's weights are {lora_cfg.base_dtype} already; cannot store them as {weights}")
        params = lora.base_params(params, lora.dense_shapes(model.config), weights)
        lora_cfg = dataclasses.replace(lora_cfg, base_dtype=weights)
    new = nnx.eval_shape(lambda: lora.build(model.config.replace(dtype=dtype), lora_cfg, rngs=nnx.Rngs(0)))
    new_graphdef, new_state = nnx.split(new)
    nnx.replace_by_pure_dict(new_state, params)
    return nnx.merge(new_graphdef, new_state)

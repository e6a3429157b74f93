"""Images or a video + prompt -> answer with a Molmo2 checkpoint: a folder in the transformers
layout, or a molmo-jax training checkpoint of a Molmo2 run.

    predictor = Molmo2Predictor.from_checkpoint("Molmo2-8B/")   # config.json + safetensors +
                                                                # tokenizer.json + processor_config.json
    predictor = Molmo2Predictor.from_checkpoint("runs/sft/")    # the trainer's checkpoints: its meta
                                                                # names the processor and tokenizer
    answer = predictor.predict("Point to the cat", images=["cat.jpg"])
    answer = predictor.predict("What happens?", video="clip.mp4")
    answer.text, answer.points, answer.frame_indices, answer.timestamps

The prompt is the processor's text (`molmo2_processor.process`): one that already holds
`<|image|>` / `<|video|>` placeholders is used as written; any other becomes one user message
(its images / video, then the text) rendered with the folder's chat template, as transformers'
`apply_chat_template(..., add_generation_prompt=True)` renders it (chat_template.jinja, else
"chat_template" in processor_config.json, else in tokenizer_config.json); a folder without one
asks "User: {prompt} Assistant:". Media the rendered text leaves out go in front (the processor's
rule).
Generation is Molmo2Generator's, greedy by default, stopping at the EOS ids of the folder's
generation_config.json, else the tokenizer's EOS. Points are read from the answer's html-v2 tags
(Molmo2's SFT point format, `<points coords="...">label</points>` / `<tracks ...>`,
data_pipelines/molmo2_points.py), else the v1 formats (`drawing.find_molmo2_points`): image
answers give PointGroups in percent of the image, video answers VideoPointGroups whose points
each carry the time (seconds) of the frame they name.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional, Sequence

import jinja2.sandbox
import numpy as np

from data_pipelines import images as images_lib, molmo2_processor, tokenizer as tokenizer_lib
from data_pipelines.fetch import FetchConfig
from molmo_jax.convert import hf_molmo
from molmo_jax.convert.hf_folder import read_config_json
from molmo_jax.inference.drawing import PointGroup, find_molmo2_points
from molmo_jax.inference.generate import GenerationConfig
from molmo_jax.inference.generate_molmo2 import Molmo2Generator
from molmo_jax.inference.predictor import (IMAGE_FETCH, RequestError, load_orbax_model, orbax_meta, read_image_source,
                                           with_compute_dtype)
from molmo_jax.model.models import recorded_config, recorded_family


def is_molmo2_folder(path: str) -> bool:
    """Whether `path` holds a config.json with model_type "molmo2"."""
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return False
    try:
        with open(config, encoding="utf-8") as f:
            return json.load(f).get("model_type") == "molmo2"
    except (OSError, ValueError, AttributeError):
        return False  # the v1 loader reports the unreadable config.json


def is_molmo2_checkpoint(path: str) -> bool:
    """A Molmo2 folder, or a molmo-jax training checkpoint whose meta records the Molmo2 family."""
    if is_molmo2_folder(path):
        return True
    try:
        return recorded_family(orbax_meta(path)[1]) == "molmo2"
    except (OSError, ValueError, KeyError):
        return False  # the v1 loader reports what is wrong with it


def stop_ids(folder: str, tok: tokenizer_lib.Tokenizer) -> tuple[int, ...]:
    """EOS ids of generation_config.json (an int or a list), else the tokenizer's EOS."""
    path = os.path.join(folder, "generation_config.json")
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                eos = json.load(f).get("eos_token_id")
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: unreadable ({e})") from None
        if isinstance(eos, int):
            return (eos,)
        if isinstance(eos, list) and eos and all(isinstance(i, int) for i in eos):
            return tuple(eos)
    return (tok.eos_id,)


def read_chat_template(folder: str) -> Optional[str]:
    """The folder's jinja chat template (module docstring for where it is looked for), or None."""
    path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    for name in ("processor_config.json", "tokenizer_config.json"):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                template = json.load(f).get("chat_template")
        except (OSError, ValueError, AttributeError) as e:
            raise ValueError(f"{path}: unreadable ({e})") from None
        if isinstance(template, list):  # transformers' named templates: the "default" one
            template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}.get("default")
        if isinstance(template, str):
            return template
    return None


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def chat_prompt(prompt: str, template: Optional[str], tok: tokenizer_lib.Tokenizer, num_images: int = 0,
                video: bool = False) -> str:
    """The processor text for a user prompt (module docstring). A template that fails to
    render is a ValueError naming the cause."""
    if molmo2_processor.IMAGE_PLACEHOLDER in prompt or molmo2_processor.VIDEO_PLACEHOLDER in prompt:
        return prompt
    if template is None:
        return f"User: {prompt} Assistant:"
    content = [{"type": "image"}] * num_images + [{"type": "video"}] * video + [{"type": "text", "text": prompt}]
    special = lambda i: tok.decode([i], skip_special_tokens=False)  # noqa: E731
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    try:
        return env.from_string(template).render(
            messages=[{"role": "user", "content": content}], add_generation_prompt=True,
            bos_token=special(tok.bos_id), eos_token=special(tok.eos_id))
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat template: {type(e).__name__}: {e}") from None


def model_batch(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Processor arrays (transformers' names) -> Molmo2Generator's batch (module doc there)."""
    batch = {"input_ids": inputs["input_ids"].astype(np.int32),
             "mm_token_type_ids": inputs["mm_token_type_ids"].astype(np.int32)}
    for pixels, pooling in (("pixel_values", "image_token_pooling"), ("pixel_values_videos", "video_token_pooling")):
        if pixels in inputs:
            batch.update(pixel_values=inputs[pixels], token_pooling=inputs[pooling].astype(np.int32))
    return batch


def check_processor(processor: molmo2_processor.Molmo2ProcessorConfig, vision) -> None:
    """ValueError unless the processor's crops are the vision tower's input (size and patch)."""
    for name, crop in (("image", processor.image), ("video", processor.video)):
        if (crop.crop_size, crop.patch_size) != (vision.image_size[0], vision.patch_size):
            raise ValueError(f"processor {name} crops are {crop.crop_size} px of {crop.patch_size} px patches, "
                             f"the model's vision tower takes {vision.image_size[0]} px of {vision.patch_size}")


@dataclasses.dataclass
class Molmo2Answer:
    """frame_indices int64[T] / timestamps float64[T] (seconds): the sampled frames of a video."""
    text: str
    points: list[PointGroup]  # VideoPointGroups (points with times) for html-v2 video answers
    tokens: np.ndarray  # int32[N] generated ids (stop token excluded)
    frame_indices: Optional[np.ndarray] = None
    timestamps: Optional[np.ndarray] = None


class Molmo2Predictor:
    """A Molmo2 model, its tokenizer and processor settings, with compiled generation."""

    def __init__(self, model, tokenizer: tokenizer_lib.Tokenizer,
                 processor: molmo2_processor.Molmo2ProcessorConfig, stop_token_ids: Sequence[int],
                 chat_template: Optional[str] = None, fetch_config: FetchConfig = IMAGE_FETCH):
        """chat_template: jinja text (None: "User: ... Assistant:")."""
        check_processor(processor, model.config.vision)
        molmo2_processor.token_ids(tokenizer)  # a tokenizer without Molmo2's tokens fails here, not mid-request
        self.model, self.tokenizer, self.processor = model, tokenizer, processor
        self.stop_token_ids, self.chat_template = tuple(stop_token_ids), chat_template
        self.fetch_config = fetch_config
        self.generator = Molmo2Generator(model)

    @classmethod
    def from_checkpoint(cls, path: str, *, dtype: Optional[str] = None, fetch_config: FetchConfig = IMAGE_FETCH,
                        weights: Optional[str] = None, tokenizer: Optional[str] = None) -> "Molmo2Predictor":
        """path: a transformers Molmo2 folder, or a molmo-jax training checkpoint of a Molmo2 run
        (from_training_checkpoint); dtype: compute dtype override ("bfloat16"); weights "int8" /
        "nf4": every Dense kernel stored so, weight-only (model/quantization.py, as for Molmo:
        predictor.with_compute_dtype); tokenizer: a tokenizer file or folder instead of the
        checkpoint's own."""
        if not is_molmo2_folder(path):
            return cls.from_training_checkpoint(path, dtype=dtype, fetch_config=fetch_config, weights=weights,
                                                tokenizer=tokenizer)
        processor = molmo2_processor.load_config(path)  # before the weights: a missing file fails fast
        config = hf_molmo.config_from_hf(read_config_json(path))
        check_processor(processor, config.vision)  # before reading the weights
        model = hf_molmo.load_hf_model(path, **({"dtype": dtype} if dtype else {}))
        if weights:
            model = with_compute_dtype(model, model.config.dtype, weights)
        tok = tokenizer_lib.load_tokenizer(tokenizer or path, pad_to=config.llm.vocab_size)
        return cls(model, tok, processor, stop_ids(path, tok), read_chat_template(path), fetch_config)

    @classmethod
    def from_training_checkpoint(cls, path: str, *, dtype: Optional[str] = None,
                                 fetch_config: FetchConfig = IMAGE_FETCH, weights: Optional[str] = None,
                                 tokenizer: Optional[str] = None) -> "Molmo2Predictor":
        """A Molmo2 run's checkpoint (a run dir, its checkpoints/ dir or one step; a LoRA run's:
        base + adapters, unmerged) with what its meta records: the processor (config.data.processor,
        a preset name or a processor folder) and the tokenizer (config.data.tokenizer, unless
        `tokenizer`). The chat template and the generation_config.json EOS ids are looked for in the
        processor folder, then the tokenizer's folder (read_chat_template, stop_ids)."""
        step_dir, meta = orbax_meta(path)
        family = recorded_family(meta)
        if family != "molmo2":
            raise ValueError(f"{step_dir}: a {family} checkpoint, not a Molmo2 one")
        source = tokenizer or meta.get("tokenizer")
        if not source:
            raise ValueError(f"{step_dir}: the checkpoint records no tokenizer; give the tokenizer the run "
                             f"trained with (--tokenizer)")
        try:
            processor = molmo2_processor.config_for(meta.get("processor") or "")
            check_processor(processor, recorded_config(meta).vision)  # before reading the weights
        except ValueError as e:
            raise ValueError(f"{step_dir}: the recorded processor: {e}") from None
        model = load_orbax_model(path)
        if dtype or weights:
            model = with_compute_dtype(model, dtype or model.config.dtype, weights)
        tok = tokenizer_lib.load_tokenizer(source, pad_to=model.config.llm.vocab_size)
        folders = [f for f in (meta.get("processor"), source if os.path.isdir(source) else os.path.dirname(source))
                   if f and os.path.isdir(f)]
        template = next((t for t in map(read_chat_template, folders) if t is not None), None)
        stops = next((stop_ids(f, tok) for f in folders
                      if os.path.isfile(os.path.join(f, "generation_config.json"))), (tok.eos_id,))
        return cls(model, tok, processor, stops, template, fetch_config)

    def prepare(self, prompt: str, images: Sequence = (), video: Optional[str] = None) -> dict[str, np.ndarray]:
        """The processor's arrays (`molmo2_processor.process`); RequestError for a bad image,
        video.VideoDecodeError (a ValueError) for a bad video."""
        pixels = []
        for source in images:
            try:
                pixels.append(images_lib.load_image(read_image_source(source, self.fetch_config)))
            except images_lib.ImageDecodeError as e:
                raise RequestError(f"image {e}") from None
        text = chat_prompt(prompt, self.chat_template, self.tokenizer, len(pixels), video is not None)
        return molmo2_processor.process(text, self.tokenizer, self.processor, images=pixels, video=video)

    def generate(self, inputs: dict[str, np.ndarray], config: GenerationConfig) -> Molmo2Answer:
        """Processor arrays -> the answer (stop ids default to this checkpoint's EOS ids)."""
        config = dataclasses.replace(config, stop_token_ids=tuple(config.stop_token_ids) or self.stop_token_ids)
        out = self.generator(model_batch(inputs), config, self.tokenizer.decode)
        text, tokens = out.texts[0].strip(), out.tokens[0]
        timestamps = inputs.get("timestamps")
        return Molmo2Answer(text, find_molmo2_points(text, video=timestamps is not None), tokens[tokens >= 0],
                            inputs.get("frame_indices"), timestamps)

    def predict(self, prompt: str, images: Sequence = (), video: Optional[str] = None,
                config: GenerationConfig = GenerationConfig(max_new_tokens=200)) -> Molmo2Answer:
        return self.generate(self.prepare(prompt, images, video), config)

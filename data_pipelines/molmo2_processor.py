"""Molmo2's processor: a prompt with image / video placeholders plus the media -> model inputs
under transformers' names (`Molmo2Processor(...)` with return_tensors="np").

The prompt is the processor's own text: each `<|image|>` is replaced by that image's tokens
(`molmo2_images.image_tokens`), a `<|video|>` by, for every sampled frame, its timestamp text
("0.5 ", frames after the first preceded by a space) and its frame tokens; a BOS (the
tokenizer's BOS, else its EOS) goes first. A prompt without placeholders gets them in front
(the released chat template also puts the media before the text). The vision tokens are built
as ids and only the text between them is encoded, which gives the ids transformers gets by
tokenizing the expanded string (added tokens split the text the same way).

Settings come from a transformers processor folder (`load_config`): processor_config.json,
whose "image_processor" / "video_processor" entries (or preprocessor_config.json /
video_preprocessor_config.json beside it) give the crop and sampling settings.
"""
import dataclasses
import json
import pathlib

import numpy as np

from data_pipelines import molmo2_images, tokenizer as tokenizer_lib, video as video_lib

IMAGE_PLACEHOLDER = "<|image|>"
VIDEO_PLACEHOLDER = "<|video|>"
VISION_TOKENS = ("<im_patch>", "<im_col>", "<im_start>", "<low_res_im_start>", "<frame_start>",
                 "<im_end>", "<frame_end>", "<im_low>")


@dataclasses.dataclass(frozen=True)
class VideoSampling:
  """Frame sampling (video.sample_frame_indices). Defaults: the released Molmo2 models."""
  mode: str = "uniform_last_frame"
  max_frames: int = 384
  max_fps: float | None = 2.0
  sampling_fps: float = 2.0


@dataclasses.dataclass(frozen=True)
class Molmo2ProcessorConfig:
  """Everything but the tokenizer. Token-layout flags keep transformers' names and defaults."""
  image: molmo2_images.Molmo2CropConfig = molmo2_images.Molmo2CropConfig()
  video: molmo2_images.Molmo2CropConfig = molmo2_images.Molmo2CropConfig(pool=(3, 3))
  sampling: VideoSampling = VideoSampling()
  image_use_col_tokens: bool = True
  use_single_crop_col_tokens: bool | None = None
  use_single_crop_start_token: bool = True
  video_use_col_tokens: bool = False
  use_frame_special_tokens: bool = True


# The released Molmo2 models share one processor (SigLIP2 at 378 px): these are its settings,
# the class defaults above. A --processor folder is authoritative where it says otherwise.
PRESETS = {name: Molmo2ProcessorConfig() for name in ("molmo2-4b", "molmo2-8b", "molmo2-o-7b")}


def _read_json(path: pathlib.Path) -> dict:
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: unreadable processor config ({e})") from e


def _crop(settings: dict, base: molmo2_images.Molmo2CropConfig) -> molmo2_images.Molmo2CropConfig:
  size = settings.get("size") or {}
  for flag in ("do_resize", "do_rescale", "do_normalize"):
    if settings.get(flag) is False:  # None (transformers' video default) counts as on
      raise ValueError(f"processor config sets {flag}=false; Molmo2 inputs are always resized, "
                       f"rescaled and normalised here")
  if size and size.get("height") != size.get("width"):
    raise ValueError(f"Molmo2 needs a square size, got {size}")
  kw = {}
  for name, key, cast in (("crop_size", "height", int),):
    if key in size:
      kw[name] = cast(size[key])
  for name, key, cast in (("patch_size", "patch_size", int), ("max_crops", "max_crops", int),
                          ("overlap_margins", "overlap_margins", tuple),
                          ("pool", "pooling_size", tuple), ("mean", "image_mean", tuple),
                          ("std", "image_std", tuple)):
    if settings.get(key) is not None:
      kw[name] = cast(settings[key])
  return dataclasses.replace(base, **kw)


def load_config(folder: str | pathlib.Path) -> Molmo2ProcessorConfig:
  """Molmo2ProcessorConfig of a transformers processor (or checkpoint) folder."""
  folder = pathlib.Path(folder)
  path = folder / "processor_config.json"
  if not path.exists():
    raise ValueError(f"{folder}: no processor_config.json (not a Molmo2 processor folder)")
  top = _read_json(path)
  image = top.get("image_processor")
  if image is None and (folder / "preprocessor_config.json").exists():
    image = _read_json(folder / "preprocessor_config.json")
  video = top.get("video_processor")
  if video is None and (folder / "video_preprocessor_config.json").exists():
    video = _read_json(folder / "video_preprocessor_config.json")
  base = Molmo2ProcessorConfig()
  image, video = image or {}, video or {}
  sampling = base.sampling
  for name, key in (("mode", "frame_sample_mode"), ("max_frames", "num_frames"),
                    ("max_fps", "max_fps"), ("sampling_fps", "sampling_fps")):
    if key in video:
      sampling = dataclasses.replace(sampling, **{name: video[key]})
  flags = {f.name: top[f.name] for f in dataclasses.fields(base)
           if f.name not in ("image", "video", "sampling") and f.name in top}
  return Molmo2ProcessorConfig(image=_crop(image, base.image), video=_crop(video, base.video),
                               sampling=sampling, **flags)


def config_for(name_or_folder: str) -> Molmo2ProcessorConfig:
  """A preset name (PRESETS) or a processor folder (load_config): what config.data.processor
  and a training checkpoint's meta "processor" hold."""
  if name_or_folder in PRESETS:
    return PRESETS[name_or_folder]
  if not name_or_folder:
    raise ValueError(f"no Molmo2 processor given: a processor folder or one of {sorted(PRESETS)}")
  return load_config(name_or_folder)


def token_ids(tok: tokenizer_lib.Tokenizer) -> molmo2_images.Molmo2TokenIds:
  """Ids of Molmo2's vision tokens; a tokenizer without them is an error naming the missing."""
  ids = {t: tok.token_to_id(t) for t in VISION_TOKENS + (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER)}
  missing = [t for t, i in ids.items() if i is None]
  if missing:
    raise ValueError(f"tokenizer lacks Molmo2's tokens {missing} (not a Molmo2 tokenizer)")
  return molmo2_images.Molmo2TokenIds(*(ids[t] for t in VISION_TOKENS))


def _video_parts(grid, times, ids, cfg: Molmo2ProcessorConfig) -> list:
  """Timestamp strings and frame token arrays of one video, in order."""
  frame = molmo2_images.frame_tokens(int(grid[1]), int(grid[2]), ids,
                                     use_col_tokens=cfg.video_use_col_tokens,
                                     frame_special_tokens=cfg.use_frame_special_tokens)
  parts = []
  for k, t in enumerate(times):
    parts += [(" " if k else "") + f"{t:.1f} ", frame]
  return parts


def _encode(prompt: str, media: dict[str, list[list]], tok, ids) -> np.ndarray:
  """int64[L]: BOS + prompt with each placeholder replaced by its parts (str / int arrays)."""
  bos_text = tok.decode([tok.bos_id], skip_special_tokens=False)
  if bos_text and prompt.startswith(bos_text):
    prompt = prompt[len(bos_text):]
  counts = {p: prompt.count(p) for p in media}
  for p, items in media.items():
    if counts[p] not in (0, len(items)):
      raise ValueError(f"the prompt has {counts[p]} {p} placeholders for {len(items)} inputs")
  prefix = "".join(p * len(items) for p, items in media.items() if counts[p] == 0)
  text = prefix + prompt
  parts, queue = [], {p: list(items) for p, items in media.items()}
  while True:
    hits = [(text.find(p), p) for p in queue if queue[p] and text.find(p) >= 0]
    if not hits:
      parts.append(text)
      break
    at, p = min(hits)
    parts.append(text[:at])
    parts += queue[p].pop(0)
    text = text[at + len(p):]
  out, pending = [np.array([tok.bos_id], np.int64)], ""
  for part in parts + [None]:
    if isinstance(part, str):
      pending += part  # text around the vision tokens is encoded in one piece
      continue
    if pending:
      out.append(np.asarray(tok.encode(pending), np.int64))
      pending = ""
    if part is not None:
      out.append(np.asarray(part, np.int64))
  return np.concatenate(out)


def process(prompt: str, tok: tokenizer_lib.Tokenizer, cfg: Molmo2ProcessorConfig, *,
            images: list[np.ndarray] = (), video: str | None = None) -> dict[str, np.ndarray]:
  """Model inputs of one example (images or one video), transformers' names and layouts:

    input_ids, mm_token_type_ids: int64[1, L] (type 1 on every vision token).
    images: pixel_values float32[C, 729, 588], image_token_pooling int32[N, 4] (-1 = none),
      image_grids int64[I, 4], image_num_crops int64[I].
    video: pixel_values_videos float32[T, 729, 588], video_token_pooling int64[T * 81, 9],
      video_grids int64[1, 3], plus frame_indices int64[T] and timestamps float64[T] (seconds).
  Raises ValueError (video.VideoDecodeError for bad videos) naming the problem.
  """
  ids = token_ids(tok)
  if len(images) and video is not None:
    raise ValueError("an example has images or one video, not both")
  if len(images) > cfg.image.max_images:
    raise ValueError(f"{len(images)} images, more than max_images={cfg.image.max_images}")
  out, media = {}, {}
  if len(images):
    per_image = [molmo2_images.preprocess_image(image, cfg.image) for image in images]
    offsets = np.cumsum([0] + [p["pixel_values"].shape[0] * p["pixel_values"].shape[1]
                               for p in per_image])
    out["pixel_values"] = np.concatenate([p["pixel_values"] for p in per_image])
    out["image_token_pooling"] = np.concatenate([
        np.where(p["image_token_pooling"] >= 0, p["image_token_pooling"] + o, -1)
        for p, o in zip(per_image, offsets)]).astype(np.int32)
    out["image_grids"] = np.stack([p["image_grid"] for p in per_image])
    out["image_num_crops"] = np.array([p["pixel_values"].shape[0] for p in per_image], np.int64)
    media[IMAGE_PLACEHOLDER] = [[molmo2_images.image_tokens(
        p["image_grid"], ids, use_col_tokens=cfg.image_use_col_tokens,
        low_res_col_tokens=cfg.use_single_crop_col_tokens,
        low_res_start_token=cfg.use_single_crop_start_token)] for p in per_image]
  if video is not None:
    info = video_lib.probe(video)
    s = cfg.sampling
    indices = video_lib.sample_frame_indices(info.num_frames, info.fps, mode=s.mode,
                                             max_frames=s.max_frames, max_fps=s.max_fps,
                                             sampling_fps=s.sampling_fps)
    frames = molmo2_images.preprocess_frames(video_lib.iter_frames(info, indices), cfg.video)
    times = video_lib.timestamps(indices, info.fps)
    out.update(pixel_values_videos=frames["pixel_values_videos"],
               video_token_pooling=frames["video_token_pooling"],
               video_grids=frames["video_grid"][None], frame_indices=indices, timestamps=times)
    media[VIDEO_PLACEHOLDER] = [_video_parts(frames["video_grid"], times, ids, cfg)]
  for placeholder in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER):
    if placeholder not in media and placeholder in prompt:
      raise ValueError(f"the prompt has a {placeholder} placeholder but no such input")
  input_ids = _encode(prompt, media, tok, ids)
  out["input_ids"] = input_ids[None]
  out["mm_token_type_ids"] = np.isin(input_ids, ids.all()).astype(np.int64)[None]
  return out

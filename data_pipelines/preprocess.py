"""One example -> the model's input arrays, and a tool to see what the model sees of an image.

`preprocess_example` = decode + multi-crop (`multicrop`) + chat formatting (`formatting`) +
`tokenize_conversations`, the token-level sequence of spec 4.6:

    [BOS] [image tokens] [conversation 1] [conversation 2] ...

each conversation = its messages encoded one by one (no special tokens), EOS after every
assistant message. In training the input is `[BOS] + sequence[:-1]` and the target `sequence`;
at inference the input is `[BOS] + sequence` and the target is shifted with a final -1. Loss
masks are 1 on assistant tokens and their EOS. Several conversations about one image
(`message_list`) get subsegment ids 1, 2, ... (image and BOS: 10000) and positions that restart
after the image for each conversation. The packing module pads these to fixed shapes.
Text-only examples get the same shifted form with a BOS (the official preprocessor returns
inputs equal to targets without a BOS there, which would train the model to copy its input;
that quirk is deliberately not reproduced).

Command line (prints the tiling and the token counts):
  python -m data_pipelines.preprocess IMAGE --preset molmo-7b-d [--max-crops N]
      [--out FILE.npz] [--show FILE.png [--points MODEL_OUTPUT]]
  Molmo2 (images, several images, or one video; `molmo2_processor`):
  python -m data_pipelines.preprocess FILE [FILE ...] (--processor DIR | --preset molmo2-8b
      --tokenizer PATH) --prompt TEXT [--max-crops N] [--max-frames N] --out OUT.npz [--show PNG]
  writes transformers' arrays (input_ids, pixel_values, image_token_pooling, ...).
"""
import argparse
import dataclasses
import sys

import numpy as np

from data_pipelines import formatting, images as images_lib, molmo2_images, molmo2_processor
from data_pipelines import molmo2_show, multicrop, tokenizer as tokenizer_lib

IMAGE_SUBSEGMENT = 10000


@dataclasses.dataclass(frozen=True)
class Preset:
  """Preprocessing of a released model: crop geometry and the ids of its image tokens."""
  crop: multicrop.CropConfig
  image_token_ids: multicrop.ImageTokenIds


def _ids(first: int) -> multicrop.ImageTokenIds:  # image tokens at vocab_size + 0..3 (spec 4.1)
  return multicrop.ImageTokenIds(first, first + 1, first + 2, first + 3)


PRESETS = {
    "molmo-7b-d": Preset(multicrop.CropConfig(), _ids(152064)),
    "molmo-72b": Preset(multicrop.CropConfig(), _ids(152064)),
    "molmo-7b-o": Preset(multicrop.CropConfig(), _ids(100278)),
    "molmoe-1b": Preset(multicrop.CropConfig(), _ids(50280)),
}


def _positions(subsegments: np.ndarray) -> np.ndarray:
  """Each token's position counts only tokens of its own subsegment or a higher one (the image's
  10000 is highest), so every conversation continues right after the image."""
  positions = np.empty(len(subsegments), np.int32)
  for s in np.unique(subsegments):
    own = subsegments == s
    positions[own] = (np.cumsum(subsegments >= s) - 1)[own]
  return positions


def tokenize_conversations(conversations: list[list[str]], tokenizer, *,
                           image_tokens: np.ndarray | None = None, for_inference: bool = False,
                           ) -> dict[str, np.ndarray]:
  """Token-level sequence of one example.

  Args:
    conversations: from `formatting.format_example` (messages alternate user / assistant).
    tokenizer: a `tokenizer.Tokenizer`.
    image_tokens: int32[T] image token layout, or None for text-only examples.
    for_inference: the last message is a prompt to continue (no EOS after it; target ends -1).
  Returns (n = 1 + T + text length, minus 1 in training):
    input_tokens, target_tokens, position_ids: int32[n]; loss_masks: float32[n] (-1 on the
    padded last target at inference); subsegment_ids: int32[n], only when there are several
    conversations (else the sequence is one plain causal segment).
  """
  packed = len(conversations) > 1
  n_image = 0 if image_tokens is None else len(image_tokens)
  tokens = [np.asarray(image_tokens if n_image else [], np.int32)]
  loss = [np.zeros(n_image, np.float32)]
  subsegments = [np.full(n_image, IMAGE_SUBSEGMENT, np.int32)]
  for k, conversation in enumerate(conversations, 1):
    for i, message in enumerate(conversation):
      is_answer = i % 2 == 1
      ids = tokenizer.encode(message) + ([tokenizer.eos_id] if is_answer else [])
      tokens.append(np.asarray(ids, np.int32))
      loss.append(np.full(len(ids), float(is_answer), np.float32))
      subsegments.append(np.full(len(ids), k, np.int32))
  sequence, loss, subsegments = (np.concatenate(x) for x in (tokens, loss, subsegments))
  if len(sequence) == 0:
    raise ValueError("tokenize_conversations: empty example (no image and no text)")
  bos = np.array([tokenizer.bos_id], np.int32)
  if for_inference:
    inputs = np.concatenate([bos, sequence])
    targets = np.concatenate([sequence, [-1]]).astype(np.int32)
    loss = np.concatenate([loss, [-1.0]]).astype(np.float32)
    input_subsegments = np.concatenate([subsegments[:1], subsegments])
  else:
    inputs = np.concatenate([bos, sequence[:-1]])
    targets = sequence
    input_subsegments = np.concatenate([subsegments[:1], subsegments[:-1]])
  out = {"input_tokens": inputs, "target_tokens": targets, "loss_masks": loss,
         "position_ids": _positions(input_subsegments) if packed else
         np.arange(len(inputs), dtype=np.int32)}
  if packed:
    out["subsegment_ids"] = input_subsegments
  return out


def preprocess_example(example: dict, tokenizer, crop: multicrop.CropConfig, *,
                       format_cfg: formatting.FormatConfig = formatting.FINETUNED,
                       for_inference: bool = False, rng=None,
                       max_pixels: int = images_lib.DEFAULT_MAX_PIXELS) -> dict:
  """Example dict -> model inputs of one sequence.

  Returns `tokenize_conversations`' keys plus, for examples with an "image": images
  float32[C, P, D], image_masks float32[C, P], image_input_idx int32[C, T'] (positions in
  input_tokens, i.e. shifted by the BOS; -100 = dropped), and "metadata" (from the formatter).
  Raises images.ImageDecodeError for undecodable images, ValueError for malformed examples.
  """
  crops, image_hw = None, None
  if example.get("image") is not None:
    image = images_lib.load_image(example["image"], max_pixels=max_pixels)
    image_hw = image.shape[:2]
    crops = multicrop.preprocess_image(image, crop, tokenizer.image_token_ids)
  conversations, metadata = formatting.format_example(
      example, format_cfg, for_inference=for_inference, rng=rng, image_hw=image_hw)
  out = tokenize_conversations(conversations, tokenizer, for_inference=for_inference,
                               image_tokens=None if crops is None else crops["image_tokens"])
  if crops is not None:
    idx = crops["image_input_idx"]
    out.update(images=crops["images"], image_masks=crops["image_masks"],
               image_input_idx=np.where(idx >= 0, idx + 1, idx).astype(np.int32))
  out["metadata"] = metadata
  return out


# ---------------------------------------------------------------------------------------------
# Command line.

def _summary(name: str, image: np.ndarray, out: dict, cfg: multicrop.CropConfig) -> str:
  rows, cols = (int(v) for v in out["tiling"])
  top, left, sh, sw = (int(v) for v in out["hires_box"])
  gtop, gleft, gh, gw = (int(v) for v in out["global_box"])
  canvas = cfg.canvas_size((rows, cols))
  features = int((out["image_input_idx"] >= 0).sum())
  return "\n".join([
      f"image            {name}: {image.shape[0]}x{image.shape[1]} (HxW)",
      f"max_crops        {cfg.max_crops}",
      f"tiling           {rows}x{cols} (rows x cols), {rows * cols} high-res crops + 1 global",
      f"high-res canvas  {canvas[0]}x{canvas[1]}, image resized to {sh}x{sw} at (top {top}, "
      f"left {left})",
      f"global crop      {cfg.crop_size}x{cfg.crop_size}, image resized to {gh}x{gw} at "
      f"(top {gtop}, left {gleft})",
      f"image tokens     {len(out['image_tokens'])} ({features} receive image features)",
      f"images           float32{list(out['images'].shape)}",
  ])


def _show(path: str, out: dict, cfg: multicrop.CropConfig, points: np.ndarray) -> None:
  """Draws the crop grid over the resized high-res canvas, the global crop on its right, and
  `points` (float[N, 2] percent of the image, as the model writes them) on both."""
  from PIL import Image, ImageDraw
  rows, cols = (int(v) for v in out["tiling"])
  n, p = cfg.crop_patches, cfg.patch_size
  mean, std = np.asarray(cfg.mean, np.float32), np.asarray(cfg.std, np.float32)

  def unpatch(crop):  # float32[P, D] -> uint8[crop, crop, 3]
    pixels = crop.reshape(n, n, p, p, 3).transpose(0, 2, 1, 3, 4).reshape(n * p, n * p, 3)
    return np.clip((pixels * std + mean) * 255 + 0.5, 0, 255).astype(np.uint8)

  w = cfg.window_size
  canvas = np.zeros(cfg.canvas_size((rows, cols)) + (3,), np.uint8)
  for k in range(rows * cols):
    r, c = divmod(k, cols)
    canvas[r * w:r * w + cfg.crop_size, c * w:c * w + cfg.crop_size] = unpatch(out["images"][1 + k])
  glob = unpatch(out["images"][0])
  sheet = Image.new("RGB", (canvas.shape[1] + glob.shape[1] + 16, max(canvas.shape[0],
                                                                        glob.shape[0])), "white")
  sheet.paste(Image.fromarray(canvas), (0, 0))
  sheet.paste(Image.fromarray(glob), (canvas.shape[1] + 16, 0))
  draw = ImageDraw.Draw(sheet)
  colors = ["red", "lime", "blue", "yellow", "magenta", "cyan", "orange"]
  for k in range(rows * cols):
    r, c = divmod(k, cols)
    y, x = r * w, c * w
    draw.rectangle([x, y, x + cfg.crop_size - 1, y + cfg.crop_size - 1], outline=colors[k % 7])
    draw.text((x + 4, y + 4), f"crop {k + 1}", fill=colors[k % 7])
  top, left, sh, sw = (int(v) for v in out["hires_box"])
  draw.rectangle([left, top, left + sw - 1, top + sh - 1], outline="white")
  draw.text((canvas.shape[1] + 20, 4), "crop 0 (global)", fill="red")
  gtop, gleft, gh, gw = (int(v) for v in out["global_box"])
  for x, y in points:
    for (t, l, h, w_), dx in (((top, left, sh, sw), 0),
                              ((gtop, gleft, gh, gw), canvas.shape[1] + 16)):
      cx, cy = dx + l + x / 100 * w_, t + y / 100 * h
      draw.ellipse([cx - 5, cy - 5, cx + 5, cy + 5], outline="white", fill="red")
  sheet.save(path)


VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".ts")


def _molmo2_config(args) -> molmo2_processor.Molmo2ProcessorConfig:
  cfg = (molmo2_processor.load_config(args.processor) if args.processor else
         molmo2_processor.PRESETS[args.preset])
  if args.max_crops is not None:
    cfg = dataclasses.replace(cfg, image=dataclasses.replace(cfg.image, max_crops=args.max_crops))
  if args.max_frames is not None:
    cfg = dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling,
                                                                max_frames=args.max_frames))
  return cfg


def _molmo2_main(args) -> int:
  """The Molmo2 command: files -> transformers' processor arrays in an npz (+ a picture)."""
  if args.processor is None and args.tokenizer is None:
    print(f"error: --preset {args.preset} needs --tokenizer PATH (the model's tokenizer.json; "
          "it cannot be downloaded here), or use --processor DIR", file=sys.stderr)
    return 2
  if args.prompt is None or not args.out:
    print("error: Molmo2 preprocessing needs --prompt TEXT and --out OUT.npz", file=sys.stderr)
    return 2
  videos = [f for f in args.files if f.lower().endswith(VIDEO_SUFFIXES)]
  try:
    if videos and len(args.files) > 1:
      raise ValueError(f"give images or one video, not {len(args.files)} files with "
                       f"{len(videos)} video(s)")
    cfg = _molmo2_config(args)
    tok = tokenizer_lib.load_tokenizer(args.tokenizer or args.processor)
    images = [] if videos else [images_lib.load_image(f) for f in args.files]
    out = molmo2_processor.process(args.prompt, tok, cfg, images=images,
                                   video=videos[0] if videos else None)
  except (ValueError, OSError) as e:  # ImageDecodeError and VideoDecodeError are ValueErrors
    print(f"error: {e}", file=sys.stderr)
    return 1
  tilings = [molmo2_images.crop_geometry(image.shape[0], image.shape[1], cfg.image)[0]
             for image in images]
  for name, image, tiling in zip(args.files, images, tilings):
    print(f"image            {name}: {image.shape[0]}x{image.shape[1]} (HxW), tiling "
          f"{tiling[0]}x{tiling[1]}, {tiling[0] * tiling[1]} high-res crops + 1 low-res")
  if videos:
    times = ", ".join(f"{t:.1f}" for t in out["timestamps"])
    print(f"video            {videos[0]}: {len(out['frame_indices'])} frames sampled "
          f"({cfg.sampling.mode}) at {times} s")
  n_vision = int(out["mm_token_type_ids"].sum())
  print(f"input_ids        {out['input_ids'].shape[1]} tokens ({n_vision} vision tokens)")
  np.savez(args.out, **out)
  print(f"wrote {args.out}")
  if args.show:
    molmo2_show.draw(args.show, out, tilings, cfg.image, cfg.video)
    print(f"wrote {args.show}")
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m data_pipelines.preprocess",
                                   description="Show how an image is cropped for a Molmo model; "
                                               "for Molmo2, write the processor's arrays of "
                                               "images or a video.")
  parser.add_argument("files", nargs="+", metavar="FILE",
                      help="an image (Molmo); images or one video (Molmo2)")
  parser.add_argument("--preset", default="molmo-7b-d",
                      choices=sorted(PRESETS) + sorted(molmo2_processor.PRESETS))
  parser.add_argument("--processor", help="Molmo2: a transformers processor or checkpoint folder "
                                          "(processor_config.json + tokenizer files)")
  parser.add_argument("--tokenizer", help="Molmo2 with --preset: tokenizer file or folder")
  parser.add_argument("--prompt", help="Molmo2: the processor's prompt text; <|image|> / "
                                       "<|video|> placeholders, else the media go first")
  parser.add_argument("--max-crops", type=int, default=None)
  parser.add_argument("--max-frames", type=int, default=None, help="Molmo2 video: most frames")
  parser.add_argument("--out", help="write image_tokens, image_input_idx, image_masks, tiling, "
                                    "images (+ geometry) to this .npz")
  parser.add_argument("--show", help="draw the crops over the resized image into this .png")
  parser.add_argument("--points", default="",
                      help="with --show: points to draw, as model output text (<point x=.. y=..>, "
                           "<points ...>, (x, y); percent of the image)")
  args = parser.parse_args(argv)
  if args.processor or args.preset in molmo2_processor.PRESETS:
    return _molmo2_main(args)
  if len(args.files) != 1:
    parser.error(f"--preset {args.preset} takes one image, got {len(args.files)} files")
  args.image = args.files[0]
  preset = PRESETS[args.preset]
  cfg = preset.crop
  if args.max_crops is not None:
    cfg = dataclasses.replace(cfg, max_crops=args.max_crops)
  try:
    image = images_lib.load_image(args.image)
  except images_lib.ImageDecodeError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  out = multicrop.preprocess_image(image, cfg, preset.image_token_ids)
  print(_summary(args.image, image, out, cfg))
  if args.out:
    np.savez(args.out, image_tokens=out["image_tokens"], image_input_idx=out["image_input_idx"],
             image_masks=out["image_masks"], tiling=out["tiling"], images=out["images"],
             image_hw=np.array(image.shape[:2], np.int32), max_crops=np.int32(cfg.max_crops),
             hires_target_hw=np.array(cfg.canvas_size(tuple(out["tiling"])), np.int32),
             hires_scaled_hw=out["hires_box"][2:], hires_pad_top_left=out["hires_box"][:2],
             global_scaled_hw=out["global_box"][2:], global_pad_top_left=out["global_box"][:2])
    print(f"wrote {args.out}")
  if args.show:
    _show(args.show, out, cfg, formatting.parse_points(args.points))
    print(f"wrote {args.show}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Pictures of what Molmo2 sees: the crops of each image, or a contact sheet of the sampled video
frames with their timestamps, drawn back from the model inputs (`molmo2_processor.process`)."""
import numpy as np
from PIL import Image, ImageDraw

from data_pipelines import molmo2_images

COLORS = ("red", "lime", "blue", "yellow", "magenta", "cyan", "orange")
GAP = 8


def crop_pixels(patches: np.ndarray, cfg: molmo2_images.Molmo2CropConfig) -> np.ndarray:
  """float32[P, D] normalised patches of one crop -> uint8[crop, crop, 3]."""
  n, p = cfg.crop_patches, cfg.patch_size
  pixels = patches.reshape(n, n, p, p, 3).transpose(0, 2, 1, 3, 4).reshape(n * p, n * p, 3)
  mean, std = np.asarray(cfg.mean, np.float32), np.asarray(cfg.std, np.float32)
  return np.clip((pixels * std + mean) * 255 + 0.5, 0, 255).astype(np.uint8)


def _image_rows(out: dict, tilings: list[tuple[int, int]], cfg) -> list[Image.Image]:
  """One picture per image: its low-res crop, then its high-res crops in their grid (each crop
  at its full size, spaced apart, so the overlaps stay visible)."""
  pictures, first = [], 0
  for k, (rows, cols) in enumerate(tilings):
    crops = out["pixel_values"][first:first + 1 + rows * cols]
    first += 1 + rows * cols
    side = cfg.crop_size
    sheet = Image.new("RGB", (side + GAP + cols * (side + GAP), max(1, rows) * (side + GAP)),
                      "gray")
    draw = ImageDraw.Draw(sheet)
    sheet.paste(Image.fromarray(crop_pixels(crops[0], cfg)), (0, 0))
    draw.text((4, 4), f"image {k + 1}: low-res", fill="red")
    for j in range(rows * cols):
      r, c = divmod(j, cols)
      x, y = side + GAP + c * (side + GAP), r * (side + GAP)
      sheet.paste(Image.fromarray(crop_pixels(crops[1 + j], cfg)), (x, y))
      draw.rectangle([x, y, x + side - 1, y + side - 1], outline=COLORS[j % len(COLORS)])
      draw.text((x + 4, y + 4), f"crop {j + 1}", fill=COLORS[j % len(COLORS)])
    pictures.append(sheet)
  return pictures


def _frame_sheet(out: dict, cfg, columns: int = 8) -> Image.Image:
  frames = out["pixel_values_videos"]
  side = cfg.crop_size
  rows = -(-len(frames) // columns)
  sheet = Image.new("RGB", (min(columns, len(frames)) * (side + GAP), rows * (side + GAP)),
                    "gray")
  draw = ImageDraw.Draw(sheet)
  for k, (frame, index, t) in enumerate(zip(frames, out["frame_indices"], out["timestamps"])):
    r, c = divmod(k, columns)
    x, y = c * (side + GAP), r * (side + GAP)
    sheet.paste(Image.fromarray(crop_pixels(frame, cfg)), (x, y))
    draw.text((x + 4, y + 4), f"frame {int(index)}  {t:.1f} s", fill="yellow")
  return sheet


def draw(path: str, out: dict, tilings: list[tuple[int, int]], image_cfg, video_cfg) -> None:
  """Writes the crops of every image (stacked) or the video's contact sheet to `path`."""
  if "pixel_values_videos" in out:
    sheet = _frame_sheet(out, video_cfg)
  else:
    pictures = _image_rows(out, tilings, image_cfg)
    sheet = Image.new("RGB", (max(p.width for p in pictures),
                              sum(p.height for p in pictures)), "gray")
    y = 0
    for picture in pictures:
      sheet.paste(picture, (0, y))
      y += picture.height
  sheet.save(path)

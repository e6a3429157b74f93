"""Image decoding and the aspect-preserving resize + pad that Molmo's image encoder sees.

Two jobs, both numpy-only (this module runs in data-loader worker processes):

* `load_image`: bytes / path / array / PIL image -> uint8[H, W, 3] RGB. Handles EXIF orientation,
  every PIL mode (L, P, CMYK, RGBA, 16-bit, ...), animated files (first frame) and refuses bad
  input (truncated or corrupt data, zero-size images, decompression bombs) with one error type,
  `ImageDecodeError`, whose message names the cause.
* `resize_and_pad`: the official aspect-preserving resize (float32 size arithmetic), centred
  zero padding and CLIP normalisation after padding; the resize itself is `resize.resize_many`,
  bit-identical to the TF resize the released weights were trained with.
"""
import io
import os
import pathlib
import struct
import warnings
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps, UnidentifiedImageError

from data_pipelines import resize as resize_lib

# OpenAI CLIP normalisation (the released Molmo models).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# 100 megapixels: above PIL's own warning threshold (89M), so our limit is the one that applies.
DEFAULT_MAX_PIXELS = 100_000_000


class ImageDecodeError(ValueError):
  """An image could not be turned into RGB pixels. The message names the source and the cause:
  'empty input', 'not an image', 'truncated or corrupt data', 'zero-size image',
  'decompression bomb', 'unsupported input type', 'unreadable file'."""


def _describe(src: Any) -> str:
  if isinstance(src, (str, os.PathLike)):
    return str(src)
  if isinstance(src, (bytes, bytearray, memoryview)):
    return f"<{len(src)} bytes>"
  return f"<{type(src).__name__}>"


def _allow_single_block(n_bytes: int) -> None:
  """Lets PIL allocate an image of n_bytes as one memory block, so that it can be exported to
  numpy without a copy.

  PIL splits large images into 16 MiB blocks; `np.asarray(img)` then copies through `tobytes()`,
  which costs as much as decoding a 12-megapixel JPEG. The block size is a process-wide PIL
  setting that only changes how image memory is laid out (smaller images still get blocks of
  their own size), so it is only ever raised, never restored: that is safe with concurrent
  decodes.
  """
  if n_bytes > Image.core.get_block_size():
    Image.core.set_block_size(-(-int(n_bytes) // 4096) * 4096)  # a multiple of 4 KiB


def _pil_to_numpy(img: Image.Image) -> np.ndarray:
  """uint8[H, W, C] view of a loaded PIL image, zero-copy (Arrow export) when it is stored as
  one memory block, else a copy."""
  try:
    flat = pa.array(img)
  except ValueError:  # not one contiguous block
    return np.asarray(img)
  w, h = img.size
  return np.asarray(flat.flatten()).reshape(h, w, -1)


def _to_rgb(img: Image.Image) -> Image.Image | np.ndarray:
  """Converts any PIL mode to RGB. 16-bit / 32-bit integer and float images are rescaled to
  8 bits first (PIL's own convert('RGB') would clip them at 255)."""
  if img.mode == "RGB":
    return img
  if img.mode.startswith("I;16") or img.mode == "I":
    gray = np.asarray(img, dtype=np.float64)
    gray = np.clip(gray * (255.0 / 65535.0) + 0.5, 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)
  if img.mode == "F":
    gray = np.asarray(img, dtype=np.float64)
    if np.nanmax(gray, initial=0.0) <= 1.0:
      gray = gray * 255.0
    gray = np.clip(np.nan_to_num(gray) + 0.5, 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)
  return img.convert("RGB")  # L, LA, P, PA, RGBA, RGBX, CMYK, YCbCr, 1, ... (alpha dropped)


def _check_size(w: int, h: int, name: str, max_pixels: int) -> None:
  if w <= 0 or h <= 0:
    raise ImageDecodeError(f"{name}: zero-size image ({w}x{h})")
  if w * h > max_pixels:
    raise ImageDecodeError(
        f"{name}: decompression bomb: {w}x{h} = {w * h} pixels > max_pixels={max_pixels}")


def _decode(data: Any, name: str, max_pixels: int) -> np.ndarray:
  try:
    with warnings.catch_warnings():
      # Our own max_pixels check below replaces PIL's global bomb warning.
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      img = Image.open(data)
      w, h = img.size
      _check_size(w, h, name, max_pixels)
      _allow_single_block(w * h * 4)
      img.load()  # first frame of animated files
      ImageOps.exif_transpose(img, in_place=True)  # the copying form copies even when upright
      rgb = _to_rgb(img)
      return rgb if isinstance(rgb, np.ndarray) else _pil_to_numpy(rgb)[:, :, :3]
  except ImageDecodeError:
    raise
  except UnidentifiedImageError as e:
    raise ImageDecodeError(
        f"{name}: not an image (unrecognised format, or a header PIL rejects, e.g. a zero width)"
    ) from e
  except Image.DecompressionBombError as e:
    raise ImageDecodeError(f"{name}: decompression bomb: {e}") from e
  except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError,
          ZeroDivisionError) as e:
    raise ImageDecodeError(
        f"{name}: truncated or corrupt data ({type(e).__name__}: {e})") from e


def load_image(src: Any, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """Decodes an image to RGB pixels.

  Args:
    src: encoded bytes, a file path, a PIL image, or an array uint8[H, W] / uint8[H, W, 1|3|4]
      (already decoded: only validated and converted to 3 channels).
    max_pixels: images with more pixels are refused before their pixel data is decoded.
  Returns:
    uint8[H, W, 3] (possibly a strided view; treat as read-only).
  Raises:
    ImageDecodeError naming the source and the cause.
  """
  name = _describe(src)
  if isinstance(src, np.ndarray):
    return _check_array(src, name, max_pixels)
  if isinstance(src, Image.Image):
    if src.width * src.height == 0:
      raise ImageDecodeError(f"{name}: zero-size image ({src.width}x{src.height})")
    if src.width * src.height > max_pixels:
      raise ImageDecodeError(f"{name}: decompression bomb: {src.width}x{src.height} pixels")
    rgb = _to_rgb(ImageOps.exif_transpose(src))
    return rgb if isinstance(rgb, np.ndarray) else np.asarray(rgb)
  if isinstance(src, (bytes, bytearray, memoryview)):
    if len(src) == 0:
      raise ImageDecodeError(f"{name}: empty input (0 bytes)")
    return _decode(io.BytesIO(bytes(src)), name, max_pixels)
  if isinstance(src, (str, os.PathLike)):
    path = pathlib.Path(src)
    try:
      data = path.read_bytes()  # decoding from memory leaves no file handle open
    except (OSError, ValueError) as e:  # ValueError: a NUL byte or a lone surrogate in the path
      raise ImageDecodeError(f"{name}: unreadable file ({getattr(e, 'strerror', None) or e})") from e
    if not data:
      raise ImageDecodeError(f"{name}: empty input (0-byte file)")
    return _decode(io.BytesIO(data), name, max_pixels)
  raise ImageDecodeError(f"{name}: unsupported input type {type(src).__name__}")


def image_size(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
  """(height, width) of the pixels `load_image(path)` returns, read from the file's header only.

  Cheap (no pixel data is decoded), so a data file of many images can be checked at start-up:
  EXIF orientation is applied as `load_image` does, and a missing file, a non-image, a zero-size
  image or a decompression bomb raise the same ImageDecodeError. Broken pixel data behind a
  good header is found only by `load_image`.
  """
  name = _describe(path)
  try:
    file = open(path, "rb")
  except (OSError, ValueError) as e:  # ValueError: a NUL byte or a lone surrogate in the path
    raise ImageDecodeError(f"{name}: unreadable file ({getattr(e, 'strerror', None) or e})") from e
  with file:
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(file) as img:
          w, h = img.size
          orientation = img.getexif().get(0x0112, 1)  # the EXIF Orientation tag
    except UnidentifiedImageError as e:
      raise ImageDecodeError(f"{name}: not an image (unrecognised format, or a header PIL rejects)") from e
    except Image.DecompressionBombError as e:
      raise ImageDecodeError(f"{name}: decompression bomb: {e}") from e
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError, struct.error) as e:
      raise ImageDecodeError(f"{name}: truncated or corrupt data ({type(e).__name__}: {e})") from e
  _check_size(w, h, name, max_pixels)
  return (w, h) if orientation in (5, 6, 7, 8) else (h, w)  # these orientations swap the axes


def _check_array(arr: np.ndarray, name: str, max_pixels: int) -> np.ndarray:
  if arr.dtype != np.uint8:
    raise ImageDecodeError(f"{name}: unsupported input type: array dtype {arr.dtype}, want uint8")
  if arr.ndim == 2:
    arr = arr[:, :, None]
  if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
    raise ImageDecodeError(f"{name}: unsupported input type: array shape {arr.shape}")
  if arr.shape[0] == 0 or arr.shape[1] == 0:
    raise ImageDecodeError(f"{name}: zero-size image {arr.shape}")
  if arr.shape[0] * arr.shape[1] > max_pixels:
    raise ImageDecodeError(f"{name}: decompression bomb: {arr.shape[:2]} pixels")
  if arr.shape[2] == 1:
    return np.repeat(arr, 3, axis=2)
  return arr[:, :, :3]


# ---------------------------------------------------------------------------------------------
# Resize + pad (the official `resize_and_pad`).

def scaled_size(h: int, w: int, out_h: int, out_w: int) -> tuple[int, int]:
  """Size of an (h, w) image fitted into (out_h, out_w) with its aspect ratio kept.

  float32 arithmetic with truncation, as the official code (e.g. 1080x1920 into 784x1008 gives
  567x1007: 1920 * float32(1008/1920) = 1007.99...). Never below 1 px (the official code fails on
  such extreme aspect ratios instead).
  """
  f32 = np.float32
  scale = min(f32(out_h) / f32(h), f32(out_w) / f32(w))
  return max(1, int(f32(h) * scale)), max(1, int(f32(w) * scale))


def resize_and_pad_many(image: np.ndarray, sizes: list[tuple[int, int]], *, mean=CLIP_MEAN,
                        std=CLIP_STD) -> list[tuple[np.ndarray, tuple[int, int, int, int]]]:
  """`resize_and_pad` to several canvas sizes, sharing the decode-side work."""
  boxes = []
  for out_h, out_w in sizes:
    sh, sw = scaled_size(image.shape[0], image.shape[1], out_h, out_w)
    boxes.append(((out_h - sh) // 2, (out_w - sw) // 2, sh, sw))
  resized = resize_lib.resize_many(image, [(sh, sw) for _, _, sh, sw in boxes])
  out = []
  for (out_h, out_w), (top, left, sh, sw), pixels in zip(sizes, boxes, resized):
    canvas = np.zeros((out_h, out_w, 3), np.float32)
    canvas[top:top + sh, left:left + sw] = np.clip(pixels, 0.0, 1.0, out=pixels)[:, :, :3]
    # Normalise after padding, over whole rows (long inner loops: much faster than [..., 3]).
    rows = canvas.reshape(out_h, out_w * 3)
    rows -= np.tile(np.asarray(mean, np.float32), out_w)
    rows /= np.tile(np.asarray(std, np.float32), out_w)
    out.append((canvas, (top, left, sh, sw)))
  return out


def resize_and_pad(image: np.ndarray, out_hw: tuple[int, int], *, mean=CLIP_MEAN, std=CLIP_STD,
                   ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
  """Aspect-preserving resize, centred zero padding, then normalisation.

  Args:
    image: uint8[H, W, 3] (or float32 in [0, 1]).
    out_hw: (out_h, out_w) canvas size.
  Returns:
    pixels: float32[out_h, out_w, 3], (clip(resized, 0, 1) padded with 0 - mean) / std: the
      padding is normalised too, as in the official code.
    box: (top, left, height, width) of the resized image inside the canvas.
  """
  return resize_and_pad_many(image, [out_hw], mean=mean, std=std)[0]

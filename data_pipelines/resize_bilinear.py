"""PyTorch's plain bilinear resize (`F.interpolate(mode="bilinear", align_corners=False,
antialias=False)`, what torchvision's `resize(..., antialias=False)` runs on float tensors) in
numpy.

Molmo2's processors resize with it: the uint8 image is converted to float, resized, rounded
(half to even, as `torch.round`) and clamped back to uint8. No antialiasing: each output pixel
reads the 2x2 input pixels around its sample centre, whatever the scale. The arithmetic follows
the CPU kernel in float32: scale = in / out, source = max(scale * (x + 0.5) - 0.5, 0), index =
floor(source) (clamped to the last pixel), lambda = source - index, and the output is
h0 * (w0 * x00 + w1 * x01) + h1 * (w0 * x10 + w1 * x11) (the width pass nested inside).
"""
import functools

import numpy as np


@functools.lru_cache(maxsize=512)
def _axis(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(index0, index1, lambda0, lambda1) of one axis: int64[out] x 2, float32[out] x 2."""
  f32 = np.float32
  scale = f32(in_size) / f32(out_size)
  source = np.maximum(scale * (np.arange(out_size, dtype=f32) + f32(0.5)) - f32(0.5), f32(0))
  index0 = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
  lambda1 = np.clip(source - index0.astype(f32), f32(0), f32(1)).astype(f32)
  index1 = np.where(index0 < in_size - 1, index0 + 1, index0)
  for a in (index0, index1, lambda1):
    a.setflags(write=False)
  lambda0 = (f32(1) - lambda1).astype(f32)
  lambda0.setflags(write=False)
  return index0, index1, lambda0, lambda1


def resize_bilinear_uint8(image: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
  """uint8[H, W, C] -> uint8[out_h, out_w, C]: float32 bilinear resize, rounded half to even and
  clamped, as Molmo2's `resize_and_normalize_image` does for uint8 inputs."""
  h, w = image.shape[:2]
  out_h, out_w = out_hw
  if (h, w) == (out_h, out_w):  # torchvision returns the input unchanged
    return np.ascontiguousarray(image)
  y0, y1, hl0, hl1 = _axis(h, out_h)
  x0, x1, wl0, wl1 = _axis(w, out_w)
  # Width pass on the input rows that some output row reads (all of them when downscaling
  # by less than 2x), then the height pass: the same float32 products and sums as the kernel.
  rows = np.unique(np.concatenate([y0, y1]))
  src = image[rows].astype(np.float32)
  inner = src[:, x0] * wl0[None, :, None] + src[:, x1] * wl1[None, :, None]
  where = np.searchsorted(rows, y0), np.searchsorted(rows, y1)
  out = inner[where[0]] * hl0[:, None, None] + inner[where[1]] * hl1[:, None, None]
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)

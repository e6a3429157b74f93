"""TensorFlow's antialiased bilinear resize in numpy, bit for bit.

The released Molmo weights were trained on images resized with
`tf.image.resize(image, size, "bilinear", antialias=True)`, i.e. TensorFlow's `ScaleAndTranslate`
op with the triangle kernel. This module reproduces it without TensorFlow: the same float32
kernel weights (`ComputeSpansCore`: sample centres (x + 0.5) / scale, kernel widened by 1/scale
when downscaling, spans rounded with ceil / floor, weights summed in order and multiplied by
1/sum), applied rows first then columns, each output value accumulated sequentially in float32
in the same order (`GatherRows` / `GatherColumns`). The weights are cached sparse matrices and
scipy's CSR product adds a row's nonzeros one by one, so the results are identical, not just
close. uint8 input is converted like `tf.image.convert_image_dtype` (x * float32(1/255)).
"""
import functools

import numpy as np
import scipy.sparse


@functools.lru_cache(maxsize=256)
def resize_weights(in_size: int, out_size: int) -> scipy.sparse.csr_matrix:
  """Sparse float32[out_size, in_size] resampling matrix of one axis.

  Same float32 arithmetic as TensorFlow's `ComputeSpansCore`: sample centre
  (x + 0.5) / scale, kernel widened by 1/scale when downscaling, span start/end rounded with
  ceil/floor, weights summed sequentially and multiplied by 1/sum.
  """
  f32 = np.float32
  scale = f32(out_size) / f32(in_size)
  inv_scale = f32(1.0 / np.float64(scale))  # C++ `1.0 / scale` is a double division
  kernel_scale = max(inv_scale, f32(1.0))
  span_size = min(2 * int(np.ceil(kernel_scale)) + 1, in_size)
  one_over_kernel_scale = f32(1.0) / kernel_scale

  sample = (np.arange(out_size, dtype=f32) + f32(0.5)) * inv_scale   # float32[out]
  start = np.ceil(sample - kernel_scale - f32(0.5)).astype(np.int64)
  end = np.floor(sample + kernel_scale - f32(0.5)).astype(np.int64)
  start = np.clip(start, 0, in_size - 1)
  end = np.clip(end, 0, in_size - 1) + 1
  source = start[:, None] + np.arange(span_size)                        # int[out, span]
  in_span = source < end[:, None]
  pos = (source.astype(f32) + f32(0.5)) - sample[:, None]
  x = np.abs(pos * one_over_kernel_scale)
  weights = np.where(in_span & (x < f32(1.0)), f32(1.0) - x, f32(0.0)).astype(f32)
  total = np.zeros(out_size, f32)
  for k in range(span_size):  # sequential float32 sum, as in TF (np.sum would sum pairwise)
    total += weights[:, k]
  # TF leaves spans whose weights sum to ~0 (or that sample outside the image) all zero.
  valid = (np.abs(total) >= f32(1000.0) * np.finfo(f32).tiny) & (sample >= 0) & (
      sample <= f32(in_size))
  inv_total = np.where(valid, f32(1.0) / np.where(valid, total, f32(1.0)), f32(0.0))
  weights = weights * inv_total[:, None]
  keep = weights != 0  # zero weights add exactly nothing to a sum of non-negative terms
  rows = np.broadcast_to(np.arange(out_size)[:, None], keep.shape)[keep]
  return scipy.sparse.csr_matrix(
      (weights[keep], (rows, source[keep])), shape=(out_size, in_size), dtype=f32)


_WHOLE_PIXELS_FROM = 4_000_000  # pixels; see `_float_buffer`


def _whole_pixels(image: np.ndarray) -> np.ndarray | None:
  """uint8[H-1, W, 4] view of all but the last row of a 3-channel view of 4-byte pixels (PIL
  stores RGB as RGBX; `load_image` returns such views), else None. The last row is left out
  because its last pixel's 4th byte may lie past the end of the buffer."""
  h, w, c = image.shape
  if image.dtype != np.uint8 or c != 3 or h < 2 or image.strides != (4 * w, 4, 1):
    return None
  return np.lib.stride_tricks.as_strided(image[:-1], shape=(h - 1, w, 4), strides=image.strides,
                                         writeable=False)


def _convert_rows(image: np.ndarray, whole: np.ndarray | None, start: int, stop: int,
                  out: np.ndarray) -> None:
  """out[:stop - start] = image[start:stop] * float32(1/255), through `whole` pixels if given."""
  scale = np.float32(1.0 / 255.0)
  if whole is None:
    np.multiply(image[start:stop], scale, out=out[:stop - start], dtype=np.float32)
    return
  last = image.shape[0] - 1
  if start < min(stop, last):
    np.multiply(whole[start:min(stop, last)], scale, out=out[:min(stop, last) - start],
                dtype=np.float32)
  if stop > last:
    np.multiply(image[last], scale, out=out[last - start, :, :3], dtype=np.float32)
    out[last - start, :, 3] = 0.0


def _float_buffer(image: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray | None]:
  """(empty float32[rows, W, C'] for converted image rows, whole-pixel view or None).

  C' is 4 (a 4th channel to ignore) for large 3-channel views of 4-byte pixels: converting
  whole pixels is about 2.5x faster than gathering 3 of every 4 bytes, which outweighs carrying
  the extra channel through the resize once the image has several megapixels (measured: -10 %
  for 4000x3000, +7 % for 1024x768).
  """
  h, w = image.shape[:2]
  whole = _whole_pixels(image) if h * w >= _WHOLE_PIXELS_FROM else None
  channels = image.shape[2] if whole is None else 4
  return np.empty((rows, w, channels), np.float32), whole


def to_float(image: np.ndarray) -> np.ndarray:
  """uint8[H, W, C] -> float32[H, W, C'] in [0, 1] exactly as `tf.image.convert_image_dtype`
  (x * float32(1/255), a multiplication, not a division); C' may be 4, see `_float_buffer`."""
  pixels, whole = _float_buffer(image, image.shape[0])
  _convert_rows(image, whole, 0, image.shape[0], pixels)
  return pixels


# Input rows converted at a time by `resize_many` (a cache-sized chunk: ~1 MB for 4000 px rows).
_CONVERT_ROWS = 32
# Output rows per column-pass product (see `_column_pass`).
_ROW_BLOCK = 16


@functools.lru_cache(maxsize=256)
def _row_plan(in_h: int, out_h: int) -> tuple:
  """The row pass split by input chunk: (y0, y1, lo, hi, weights[y1-y0, hi-lo]) for the output
  rows y0..y1 whose input rows all lie before `hi`, the end of a _CONVERT_ROWS chunk."""
  weights = resize_weights(in_h, out_h)
  nonzero = np.diff(weights.indptr) > 0
  last = np.where(nonzero, weights.indices[np.maximum(weights.indptr[1:] - 1, 0)], 0)
  last = np.maximum.accumulate(last)  # (rows without weights, if any, keep the order)
  first = np.where(nonzero, weights.indices[np.minimum(weights.indptr[:-1], weights.nnz - 1)],
                   in_h)
  chunk = last // _CONVERT_ROWS  # rows are in order, so chunk ids never decrease
  plan = []
  for c in np.unique(chunk):
    y0, y1 = np.searchsorted(chunk, c), np.searchsorted(chunk, c, side="right")
    lo, hi = int(first[y0:y1].min(initial=in_h)), min(in_h, (int(c) + 1) * _CONVERT_ROWS)
    lo = min(lo, hi - 1)
    plan.append((int(y0), int(y1), lo, hi, weights[y0:y1, lo:hi].tocsr()))
  return tuple(plan)


def _row_pass(image: np.ndarray, out_heights: list[int]) -> list[np.ndarray]:
  """float32[out_h, W, C'] for every out_h: output row y = sum over its input rows k, in order,
  of weight(y, k) * row k (scipy's CSR product adds a row's nonzeros one by one, like TF's loop).

  A uint8 image is converted to float a chunk of rows at a time into a small sliding window,
  and every output row is computed as soon as its input rows are in it: the converted rows are
  used while still in cache and the float image (200 MB for 12 megapixels) never exists whole.
  """
  h, w = image.shape[:2]
  if image.dtype != np.uint8:
    flat = np.ascontiguousarray(image, np.float32).reshape(h, -1)
    return [(resize_weights(h, n) @ flat).reshape(n, w, -1) for n in out_heights]
  plans = [_row_plan(h, n) for n in out_heights]
  reach = max(hi - lo for plan in plans for _, _, lo, hi, _ in plan)
  window, whole = _float_buffer(image, reach + _CONVERT_ROWS)
  flat = window.reshape(len(window), -1)
  outs = [np.empty((n, flat.shape[1]), np.float32) for n in out_heights]
  done = [0] * len(plans)
  base = 0  # window row i holds image row base + i
  for start in range(0, h, _CONVERT_ROWS):
    stop = min(start + _CONVERT_ROWS, h)
    # Keep only rows that a pending output row still reads (its block's `lo` onwards).
    keep = min([start] + [plan[d][2] for plan, d in zip(plans, done) if d < len(plan)])
    if keep > base:
      flat[:start - keep] = flat[keep - base:start - base].copy()
      base = keep
    _convert_rows(image, whole, start, stop, window[start - base:])
    for t, plan in enumerate(plans):
      while done[t] < len(plan) and plan[done[t]][3] <= stop:
        y0, y1, lo, hi, weights = plan[done[t]]
        outs[t][y0:y1] = weights @ flat[lo - base:hi - base]
        done[t] += 1
  return [out.reshape(n, w, -1) for out, n in zip(outs, out_heights)]


@functools.lru_cache(maxsize=256)
def _block_column_weights(in_w: int, out_w: int, rows: int) -> scipy.sparse.csr_matrix:
  """kron(I_rows, column weights): the column pass of `rows` image rows as one product whose
  input and output keep the [row, x, channel] memory layout (no transposes)."""
  eye = scipy.sparse.identity(rows, dtype=np.float32, format="csr")
  return scipy.sparse.kron(eye, resize_weights(in_w, out_w), format="csr").astype(np.float32)


def _column_pass(rows: np.ndarray, out_w: int) -> np.ndarray:
  """float32[H', W, C] -> float32[H', out_w, C], a block of rows at a time:
  [B*out_w, B*W] @ [B*W, C]."""
  out_h, w, c = rows.shape
  out = np.empty((out_h, out_w, c), np.float32)
  for start in range(0, out_h, _ROW_BLOCK):
    block = rows[start:start + _ROW_BLOCK]
    weights = _block_column_weights(w, out_w, len(block))
    out[start:start + len(block)] = (weights @ block.reshape(-1, c)).reshape(-1, out_w, c)
  return out


def resize_many(image: np.ndarray, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
  """Bilinear antialiased resizes of one image, bit-identical to TF's
  `tf.image.resize(image, size, "bilinear", antialias=True)` for each size; the uint8 -> float
  conversion is shared.

  Args:
    image: uint8[H, W, C] (converted like `tf.image.convert_image_dtype`), or float32 in [0, 1].
    sizes: [(out_h, out_w)], all >= 1.
  Returns:
    [float32[out_h, out_w, C']], not clipped; C' = 4 (drop the last channel) for large
    3-channel views of 4-byte pixels, see `_float_buffer`.
  """
  rows = _row_pass(image, [out_h for out_h, _ in sizes])
  return [_column_pass(r, out_w) for r, (_, out_w) in zip(rows, sizes)]


def resize(image: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
  """One bilinear antialiased resize (see `resize_many`): float32[out_h, out_w, C]."""
  return resize_many(image, [out_hw])[0][:, :, :image.shape[2]]

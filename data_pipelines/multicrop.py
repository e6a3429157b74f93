"""Multi-crop image preprocessing (`overlap-and-resize-c2`): what the vision encoder and the text
sequence see of one image.

The image is resized (aspect kept, centred padding) onto a canvas of `rows x cols` overlapping
crops chosen by `select_tiling`, cut into those crops, and a low-resolution global crop of the
whole image goes first. Every crop is split into `patch_size` patches (vector layout (dy, dx, c));
the connector pools `pool x pool` patches into one feature. Of each high-res crop only the features
outside the overlap margins are used; they are placed, left to right and top to bottom, on the
`<im_patch>` tokens of the image-token layout:

    <im_start> (<im_patch> x tw  <im_col>) x th  <im_end>      global crop, th x tw features
    <im_start> (<im_patch> x K   <im_col>) x R   <im_end>      high-res grid, R x K features

`image_layout` does the token bookkeeping without touching pixels (cheap, property-tested);
`preprocess_image` adds the pixel work.
"""
import dataclasses
import functools

import numpy as np

from data_pipelines import images as images_lib

# Index used by the official code for pooled features that are discarded (margins).
DROPPED = -100


@dataclasses.dataclass(frozen=True)
class CropConfig:
  """Geometry of the multi-crop preprocessing. Defaults = the released Molmo models (CLIP-336).

  crop_size: crop side in pixels (the ViT input).       patch_size: ViT patch side in pixels.
  overlap_margins: (left/top, right/bottom) patches of every crop that overlap its neighbours.
  pool: pooling window side in patches (2x2 in the released models).
  max_crops: most high-res crops (12 for training and default inference, 36 for "high-res" eval).
  legacy_mask: reproduce the official image_masks misalignment (spec 3.6); False = corrected.
  """
  crop_size: int = 336
  patch_size: int = 14
  overlap_margins: tuple[int, int] = (4, 4)
  pool: int = 2
  max_crops: int = 12
  legacy_mask: bool = True
  mean: tuple[float, float, float] = images_lib.CLIP_MEAN
  std: tuple[float, float, float] = images_lib.CLIP_STD

  def __post_init__(self):
    lm, rm = self.overlap_margins
    problems = []
    if self.crop_size % self.patch_size:
      problems.append(f"crop_size {self.crop_size} is not a multiple of patch_size {self.patch_size}")
    if self.crop_patches % self.pool or lm % self.pool or rm % self.pool:
      problems.append(f"crop patches {self.crop_patches} and margins {self.overlap_margins} must be "
                      f"multiples of pool {self.pool}")
    if self.window_patches <= 0:
      problems.append(f"margins {self.overlap_margins} leave no crop window")
    if self.max_crops < 1:
      problems.append(f"max_crops must be >= 1, got {self.max_crops}")
    if problems:
      raise ValueError("invalid CropConfig: " + "; ".join(problems))

  @property
  def crop_patches(self) -> int:  # patches per crop side (24)
    return self.crop_size // self.patch_size

  @property
  def window_patches(self) -> int:  # patches per side that a crop adds to the high-res grid (16)
    return self.crop_patches - sum(self.overlap_margins)

  @property
  def window_size(self) -> int:  # stride between crops in pixels (224)
    return self.window_patches * self.patch_size

  @property
  def margin_pixels(self) -> int:  # total overlap margin per side in pixels (112)
    return sum(self.overlap_margins) * self.patch_size

  @property
  def tokens_side(self) -> int:  # pooled features per crop side (12)
    return self.crop_patches // self.pool

  @property
  def patch_dim(self) -> int:  # 588
    return self.patch_size * self.patch_size * 3

  def canvas_size(self, tiling: tuple[int, int]) -> tuple[int, int]:
    """(height, width) in pixels of the high-res canvas that `tiling` crops cover."""
    return tuple(n * self.window_size + self.margin_pixels for n in tiling)


@dataclasses.dataclass(frozen=True)
class ImageLayout:
  """Token bookkeeping of one image (no pixels).

  tiling: (rows, cols) of high-res crops.        grid: (R, K) pooled high-res features.
  tokens: int32[T] image token ids (global block, then high-res block).
  image_input_idx: int32[1 + rows*cols, tokens_side**2] position in `tokens` of each pooled
    feature of each crop (row-major), DROPPED (-100) for margin features.
  """
  tiling: tuple[int, int]
  grid: tuple[int, int]
  tokens: np.ndarray
  image_input_idx: np.ndarray


@dataclasses.dataclass(frozen=True)
class ImageTokenIds:
  """Ids of the image special tokens in the tokenizer (see tokenizer.Tokenizer.image_token_ids)."""
  im_start: int
  im_end: int
  im_patch: int
  im_col: int


@functools.lru_cache(maxsize=64)
def _candidate_tilings(max_crops: int) -> np.ndarray:
  # Sorted by (number of crops, rows): argmin / argmax then prefer smaller tilings on ties.
  tilings = [(i, j) for i in range(1, max_crops + 1) for j in range(1, max_crops + 1)
             if i * j <= max_crops]
  tilings.sort(key=lambda t: (t[0] * t[1], t[0]))
  return np.array(tilings, np.int32)


@functools.lru_cache(maxsize=4096)
def select_tiling(h: int, w: int, window: int, max_crops: int) -> tuple[int, int]:
  """Tiling (rows, cols) for an image of h x w pixels (margins already subtracted), in float32.

  The tiling that needs the least upscaling, or, if every tiling needs downscaling, the least
  downscaling. A side <= 0 makes its scales negative or infinite; as in the official code this
  then always selects 1x1 (with a negative side) or behaves as an infinitely large scale (zero).
  """
  candidates = _candidate_tilings(max_crops)
  with np.errstate(divide="ignore"):
    scale_d = (candidates * window).astype(np.float32) / np.array([h, w], np.float32)
  scale = scale_d.min(axis=-1)
  if np.all(scale < 1):
    ix = np.argmax(scale)
  else:
    ix = np.argmin(np.where(scale < 1.0, np.float32(1e10), scale))
  return int(candidates[ix, 0]), int(candidates[ix, 1])


def _kept_pooled(n_crops: int, cfg: CropConfig) -> tuple[np.ndarray, np.ndarray]:
  """Along one axis: (first kept pooled index inside each crop, number kept) for n_crops crops."""
  lm, rm = (m // cfg.pool for m in cfg.overlap_margins)
  window = cfg.window_patches // cfg.pool
  first = np.full(n_crops, lm)
  first[0] = 0
  count = np.full(n_crops, window)
  count[0] += lm
  count[-1] += rm
  return first, count


@functools.lru_cache(maxsize=1024)
def _layout(tiling: tuple[int, int], cfg: CropConfig, ids: ImageTokenIds) -> ImageLayout:
  rows, cols = tiling
  side = cfg.tokens_side
  row_first, row_count = _kept_pooled(rows, cfg)
  col_first, col_count = _kept_pooled(cols, cfg)
  grid_h, grid_w = int(row_count.sum()), int(col_count.sum())

  def block(h, w):
    body = np.full((h, w + 1), ids.im_patch, np.int32)
    body[:, -1] = ids.im_col
    return np.concatenate([[ids.im_start], body.reshape(-1), [ids.im_end]]).astype(np.int32)

  global_block = block(side, side)
  tokens = np.concatenate([global_block, block(grid_h, grid_w)])

  # Global crop: feature (i, j) -> the j-th <im_patch> of row i.
  i, j = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
  global_idx = 1 + i * (side + 1) + j
  # High-res crop (r, c): local feature (i, j) -> high-res grid cell (gi, gj) unless in a margin.
  def grid_index(first, count):  # [n_crops, side] grid coordinate and keep flag along one axis
    local = np.arange(side)[None, :] - first[:, None]
    offset = np.cumsum(count) - count
    return offset[:, None] + local, (local >= 0) & (local < count[:, None])

  gi, keep_i = grid_index(row_first, row_count)
  gj, keep_j = grid_index(col_first, col_count)
  # [rows, cols, side, side] via broadcasting [rows, 1, side, 1] with [1, cols, 1, side].
  pos = len(global_block) + 1 + gi[:, None, :, None] * (grid_w + 1) + gj[None, :, None, :]
  keep = keep_i[:, None, :, None] & keep_j[None, :, None, :]
  hires_idx = np.where(keep, pos, DROPPED).reshape(rows * cols, side * side)
  idx = np.concatenate([global_idx.reshape(1, -1), hires_idx]).astype(np.int32)
  tokens.setflags(write=False)
  idx.setflags(write=False)
  return ImageLayout(tiling=tiling, grid=(grid_h, grid_w), tokens=tokens, image_input_idx=idx)


def image_layout(h: int, w: int, cfg: CropConfig, ids: ImageTokenIds) -> ImageLayout:
  """Tiling and token bookkeeping of an h x w image (no pixel work). Arrays are read-only."""
  tiling = select_tiling(h - cfg.margin_pixels, w - cfg.margin_pixels, cfg.window_size,
                         cfg.max_crops)
  return _layout(tiling, cfg, ids)


def cut_crops(canvas: np.ndarray, n_rows: int, n_cols: int, cfg, out: np.ndarray):
  """Cuts a float32[H, W, 3] canvas into n_rows x n_cols crops (stride window_size) and writes
  them as float32[n_rows*n_cols, P, D] into `out`: patches row-major, patch vectors (dy, dx, c).
  One copy, through a strided view. `cfg` is any config with crop_patches, patch_size and
  window_size (CropConfig, molmo2_images.Molmo2CropConfig)."""
  s0, s1, s2 = canvas.strides
  n, p = cfg.crop_patches, cfg.patch_size
  shape = (n_rows, n_cols, n, n, p, p, 3)
  view = np.lib.stride_tricks.as_strided(
      canvas, shape=shape,
      strides=(cfg.window_size * s0, cfg.window_size * s1, p * s0, p * s1, s0, s1, s2),
      writeable=False)
  out.reshape(shape)[...] = view


def _patch_fractions(box, n_rows: int, n_cols: int, cfg: CropConfig) -> np.ndarray:
  """float32[n_rows*n_cols, P]: fraction of real (not padding) pixels in every patch.

  The real pixels form one rectangle, so each fraction is (rows inside) x (cols inside) / p^2,
  which equals the official float32 mean of the 0/1 pixel mask exactly.
  """
  top, left, sh, sw = box
  p, n = cfg.patch_size, cfg.crop_patches

  def inside(n_crops, lo, size):  # [n_crops, n] real pixels per patch along one axis
    start = (np.arange(n_crops)[:, None] * cfg.window_size + np.arange(n)[None, :] * p)
    return np.clip(np.minimum(start + p, lo + size) - np.maximum(start, lo), 0, p)

  ry, rx = inside(n_rows, top, sh), inside(n_cols, left, sw)
  count = ry[:, None, :, None] * rx[None, :, None, :]     # [rows, cols, n, n]
  return (count.astype(np.float32) / np.float32(p * p)).reshape(n_rows * n_cols, n * n)


def preprocess_image(image: np.ndarray, cfg: CropConfig, ids: ImageTokenIds) -> dict:
  """uint8[H, W, 3] image -> model inputs of one image.

  Returns a dict:
    images: float32[C, P, D] crops (global first), C = 1 + rows*cols, P = crop_patches^2,
      D = patch_size^2 * 3.
    image_tokens: int32[T] token layout (no BOS).
    image_input_idx: int32[C, tokens_side^2] position of each pooled feature in image_tokens
      (not shifted for BOS), -100 = dropped.
    image_masks: float32[C, P] fraction of real pixels per patch; with cfg.legacy_mask the
      official misalignment (row k = high-res crop k's mask, last row -1), else aligned
      (global crop's own mask first).
    tiling: int32[2] (rows, cols).
    hires_box / global_box: int32[4] (top, left, height, width) of the resized image in the
      high-res canvas / in the global crop.
  """
  h, w = image.shape[:2]
  layout = image_layout(h, w, cfg, ids)
  rows, cols = layout.tiling
  canvas_hw = cfg.canvas_size(layout.tiling)
  crop_hw = (cfg.crop_size, cfg.crop_size)
  kwargs = dict(mean=cfg.mean, std=cfg.std)
  (canvas, box), (global_canvas, global_box) = images_lib.resize_and_pad_many(
      image, [canvas_hw, crop_hw], **kwargs)

  crops = np.empty((1 + rows * cols, cfg.crop_patches ** 2, cfg.patch_dim), np.float32)
  cut_crops(global_canvas, 1, 1, cfg, crops[:1])
  cut_crops(canvas, rows, cols, cfg, crops[1:])

  masks = _patch_fractions(box, rows, cols, cfg)
  if cfg.legacy_mask:
    masks = np.concatenate([masks, np.full((1, masks.shape[1]), -1.0, np.float32)])
  else:
    masks = np.concatenate([_patch_fractions(global_box, 1, 1, cfg), masks])
  return {
      "images": crops,
      "image_tokens": layout.tokens.copy(),
      "image_input_idx": layout.image_input_idx.copy(),
      "image_masks": masks,
      "tiling": np.array(layout.tiling, np.int32),
      "hires_box": np.array(box, np.int32),
      "global_box": np.array(global_box, np.int32),
  }

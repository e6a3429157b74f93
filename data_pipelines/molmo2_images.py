"""Molmo2 image and video-frame preprocessing: what its SigLIP2 encoder and its pooling adapter see.

An image becomes one low-resolution crop (the whole image stretched to crop_size x crop_size)
followed by rows x cols overlapping high-resolution crops of a canvas the image is stretched
onto (no aspect-preserving padding, unlike Molmo v1). The tiling is v1's rule
(`multicrop.select_tiling`: least upscaling, else least downscaling, at most `max_crops`).
Every crop is cut into patch_size patches (27 x 27 of 14 px at 378 px; vectors (dy, dx, c)).

The adapter pools patches into one token per pool_h x pool_w window; `image_token_pooling`
lists, for every token, the indices (into the flattened patches of all crops of all images) of
the patches it pools, -1 where the window hangs over the grid's edge. Of the high-res crops
only the patches outside the overlap margins enter the grid (their union tiles the canvas
exactly once). A video frame is a single crop_size crop, pooled 3 x 3.

Token text of one image (transformers' `Molmo2Processor.replace_image_token`):

    <low_res_im_start> (<im_patch> x rw [<im_col>]) x rh <im_end>      low-res crop, rh x rw tokens
    <im_start>         (<im_patch> x w  [<im_col>]) x h  <im_end>      high-res grid, h x w tokens

Pixels: uint8 -> float32 bilinear resize (not antialiased) -> rounded to uint8 ->
(x - 127.5) / 127.5 (`resize_bilinear`), as transformers' Molmo2 processors.
"""
import dataclasses

import numpy as np

from data_pipelines import multicrop, resize_bilinear

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclasses.dataclass(frozen=True)
class Molmo2CropConfig:
  """Geometry of Molmo2's image preprocessing (defaults: the released models and transformers).

  crop_size: crop side in pixels.     patch_size: ViT patch side in pixels.
  overlap_margins: (left/top, right/bottom) patches of a high-res crop shared with neighbours.
  pool: (pool_h, pool_w) patches per token: (2, 2) for images, (3, 3) for video frames.
  max_crops: most high-res crops of one image (the released `max_crops` and
    `max_multi_image_crops` are both 8).
  max_images: most images in one example (the released Molmo2 `max_images`).
  """
  crop_size: int = 378
  patch_size: int = 14
  overlap_margins: tuple[int, int] = (4, 4)
  pool: tuple[int, int] = (2, 2)
  max_crops: int = 8
  max_images: int = 5
  mean: tuple[float, float, float] = SIGLIP_MEAN
  std: tuple[float, float, float] = SIGLIP_STD

  def __post_init__(self):
    problems = []
    if self.crop_size % self.patch_size:
      problems.append(f"crop_size {self.crop_size} is not a multiple of patch_size {self.patch_size}")
    if self.window_patches <= 0:
      problems.append(f"margins {self.overlap_margins} leave no crop window")
    if min(self.pool) < 1 or self.max_crops < 1 or self.max_images < 1:
      problems.append(f"pool {self.pool}, max_crops {self.max_crops} and max_images "
                      f"{self.max_images} must be >= 1")
    if problems:
      raise ValueError("invalid Molmo2CropConfig: " + "; ".join(problems))

  @property
  def crop_patches(self) -> int:  # patches per crop side (27)
    return self.crop_size // self.patch_size

  @property
  def window_patches(self) -> int:  # patches per side that a high-res crop adds (19)
    return self.crop_patches - sum(self.overlap_margins)

  @property
  def window_size(self) -> int:  # stride between high-res crops in pixels (266)
    return self.window_patches * self.patch_size

  @property
  def margin_pixels(self) -> int:  # both margins in pixels (112)
    return sum(self.overlap_margins) * self.patch_size

  @property
  def patch_dim(self) -> int:  # 588
    return self.patch_size * self.patch_size * 3


@dataclasses.dataclass(frozen=True)
class Molmo2TokenIds:
  """Ids of Molmo2's vision tokens in its tokenizer."""
  im_patch: int
  im_col: int
  im_start: int
  low_res_im_start: int
  frame_start: int
  im_end: int
  frame_end: int
  im_low: int

  def all(self) -> tuple[int, ...]:
    """Every vision token id: the tokens `mm_token_type_ids` marks 1 (images and video alike)."""
    return dataclasses.astuple(self)


def crop_geometry(h: int, w: int, cfg: Molmo2CropConfig) -> tuple[tuple[int, int], tuple[int, int]]:
  """((rows, cols) of high-res crops, (height, width) of their canvas) for an h x w image."""
  tiling = multicrop.select_tiling(h - cfg.margin_pixels, w - cfg.margin_pixels, cfg.window_size,
                                   cfg.max_crops)
  return tiling, tuple(n * cfg.window_size + cfg.margin_pixels for n in tiling)


def pooling_windows(index_grid: np.ndarray, pool: tuple[int, int]) -> np.ndarray:
  """int32[h, w] patch indices -> int32[rows * cols, pool_h * pool_w] pooling windows.

  The grid is padded with -1 to multiples of the pool, the extra split as transformers'
  `arange_for_pooling` does (floor half before, the rest after); windows are row-major.
  """
  pool_h, pool_w = pool
  h, w = index_grid.shape
  pad_h, pad_w = -h % pool_h, -w % pool_w
  grid = np.pad(index_grid, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2)),
                constant_values=-1)
  rows, cols = grid.shape[0] // pool_h, grid.shape[1] // pool_w
  return np.ascontiguousarray(grid.reshape(rows, pool_h, cols, pool_w).transpose(0, 2, 1, 3)
                              .reshape(rows * cols, pool_h * pool_w)).astype(np.int32)


def pooled_size(patches: int, pool: int) -> int:
  """Tokens along one side of a `patches`-long side pooled `pool` at a time (ceil)."""
  return -(-patches // pool)


def high_res_patch_grid(tiling: tuple[int, int], cfg: Molmo2CropConfig) -> np.ndarray:
  """int32[canvas_h / patch, canvas_w / patch]: for every patch of the canvas, its index among
  the high-res crops' patches (crop-major, then row-major), taken from the one crop whose window
  (outside its overlap margins) covers it."""
  rows, cols = tiling
  n, (lm, rm) = cfg.crop_patches, cfg.overlap_margins
  index = np.arange(rows * cols * n * n, dtype=np.int32).reshape(rows, cols, n, n)
  keep = np.ones((rows, cols, n, n), bool)
  if lm:
    keep[1:, :, :lm, :] = False
    keep[:, 1:, :, :lm] = False
  if rm:
    keep[:-1, :, -rm:, :] = False
    keep[:, :-1, :, -rm:] = False
  index, keep = index.transpose(0, 2, 1, 3).reshape(-1), keep.transpose(0, 2, 1, 3).reshape(-1)
  size = rows * cfg.window_patches + lm + rm, cols * cfg.window_patches + lm + rm
  return index[keep].reshape(size)


def normalized_crops(image: np.ndarray, sizes: list[tuple[int, int]],
                     cfg: Molmo2CropConfig) -> list[np.ndarray]:
  """uint8[H, W, 3] stretched to each (h, w) of `sizes` -> [float32[h, w, 3]] normalised."""
  scale = np.float32(255.0)
  mean = np.asarray(cfg.mean, np.float32) * scale   # the fused rescale + normalise of
  std = np.asarray(cfg.std, np.float32) * scale     # transformers: (x - 255 m) / (255 s)
  return [(resize_bilinear.resize_bilinear_uint8(image, hw).astype(np.float32) - mean) / std
          for hw in sizes]


def preprocess_image(image: np.ndarray, cfg: Molmo2CropConfig) -> dict:
  """uint8[H, W, 3] -> Molmo2 inputs of one image (pooling indices relative to this image).

  Returns:
    pixel_values: float32[C, P, D], C = 1 + rows * cols (low-res crop first), P = 27^2, D = 588.
    image_token_pooling: int32[N, pool_h * pool_w], N = rh * rw + h * w tokens (low-res then
      high-res), indices into pixel_values.reshape(C * P, D), -1 = padding.
    image_grid: int64[4] (rh, rw, h, w) pooled grids of the low-res crop and of the canvas.
    tiling: (rows, cols).
  """
  tiling, canvas_hw = crop_geometry(image.shape[0], image.shape[1], cfg)
  rows, cols = tiling
  canvas, low_res = normalized_crops(image, [canvas_hw, (cfg.crop_size, cfg.crop_size)], cfg)
  crops = np.empty((1 + rows * cols, cfg.crop_patches ** 2, cfg.patch_dim), np.float32)
  multicrop.cut_crops(low_res, 1, 1, cfg, crops[:1])
  multicrop.cut_crops(canvas, rows, cols, cfg, crops[1:])

  n = cfg.crop_patches
  low_pool = pooling_windows(np.arange(n * n, dtype=np.int32).reshape(n, n), cfg.pool)
  high_grid = high_res_patch_grid(tiling, cfg)
  high_pool = pooling_windows(high_grid, cfg.pool)
  high_pool = np.where(high_pool >= 0, high_pool + n * n, -1).astype(np.int32)
  grid = np.array([pooled_size(n, cfg.pool[0]), pooled_size(n, cfg.pool[1]),
                   pooled_size(high_grid.shape[0], cfg.pool[0]),
                   pooled_size(high_grid.shape[1], cfg.pool[1])], np.int64)
  return {"pixel_values": crops, "image_token_pooling": np.concatenate([low_pool, high_pool]),
          "image_grid": grid, "tiling": tiling}


def preprocess_frames(frames, cfg: Molmo2CropConfig) -> dict:
  """Video frames (an iterable of uint8[H, W, 3], each used once: it may be a decoder) -> Molmo2
  video inputs: every frame stretched to one crop.

  Returns:
    pixel_values_videos: float32[T, P, D].
    video_token_pooling: int64[T * rows * cols, pool_h * pool_w] into the flattened patches
      (int64 as transformers returns it; image pooling is int32 there).
    video_grid: int64[3] (T, rows, cols).
  """
  side = (cfg.crop_size, cfg.crop_size)
  out = []
  for frame in frames:
    pixels = np.empty((1, cfg.crop_patches ** 2, cfg.patch_dim), np.float32)
    multicrop.cut_crops(normalized_crops(frame, [side], cfg)[0], 1, 1, cfg, pixels)
    out.append(pixels)
  if not out:
    raise ValueError("preprocess_frames: no frames")
  n = cfg.crop_patches
  pool = pooling_windows(np.arange(n * n, dtype=np.int32).reshape(n, n), cfg.pool)
  offsets = (np.arange(len(out), dtype=np.int32) * n * n)[:, None, None]
  pooled = np.where(pool[None] >= 0, pool[None] + offsets, -1).reshape(-1, pool.shape[1])
  grid = np.array([len(out), pooled_size(n, cfg.pool[0]), pooled_size(n, cfg.pool[1])], np.int64)
  return {"pixel_values_videos": np.concatenate(out), "video_token_pooling": pooled.astype(np.int64),
          "video_grid": grid}


def image_tokens(grid, ids: Molmo2TokenIds, *, use_col_tokens: bool = True,
                 low_res_col_tokens: bool | None = None, low_res_start_token: bool = True,
                 ) -> np.ndarray:
  """int32[T] token ids of one image whose image_grid is (rh, rw, h, w) (module docstring).
  low_res_col_tokens None = use_col_tokens (transformers' `use_single_crop_col_tokens`)."""
  rh, rw, h, w = (int(v) for v in grid)
  low_cols = use_col_tokens if low_res_col_tokens is None else low_res_col_tokens
  start = ids.low_res_im_start if low_res_start_token else ids.im_start
  return np.concatenate([_block(start, rh, rw, low_cols, ids), _block(ids.im_start, h, w,
                                                                       use_col_tokens, ids)])


def frame_tokens(rows: int, cols: int, ids: Molmo2TokenIds, *, use_col_tokens: bool = False,
                 frame_special_tokens: bool = True) -> np.ndarray:
  """int32[T] token ids of one video frame (without its timestamp text)."""
  start, end = ((ids.frame_start, ids.frame_end) if frame_special_tokens else
                (ids.im_start, ids.im_end))
  return _block(start, rows, cols, use_col_tokens, ids, end=end)


def _block(start: int, rows: int, cols: int, col_tokens: bool, ids: Molmo2TokenIds, *,
           end: int | None = None) -> np.ndarray:
  """start, (<im_patch> x cols [<im_col>]) x rows, end."""
  body = np.full((rows, cols + int(col_tokens)), ids.im_patch, np.int32)
  if col_tokens:
    body[:, -1] = ids.im_col
  return np.concatenate([[start], body.reshape(-1), [ids.im_end if end is None else end]]
                        ).astype(np.int32)

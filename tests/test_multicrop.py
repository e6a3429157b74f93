"""Multi-crop preprocessing against the official outputs, and layout invariants on random sizes."""
import hashlib
import json

import numpy as np
import pytest

from data_pipelines import images, multicrop, resize, tokenizer

IDS = multicrop.ImageTokenIds(im_start=152064, im_end=152065, im_patch=152066, im_col=152067)
BOS = 151643


def _cases(golden_dir):
  return json.loads((golden_dir / "preprocess" / "index.json").read_text())["cases"]


@pytest.fixture(scope="module")
def golden_outputs(golden_dir):
  """(case, golden npz, our output) for every preprocessing golden."""
  out = []
  for case in _cases(golden_dir):
    gold = np.load(golden_dir / "preprocess" / f"{case['key']}.npz")
    image = images.load_image(golden_dir / "preprocess" / case["png"])
    cfg = multicrop.CropConfig(max_crops=int(gold["max_crops"]))
    out.append((case, gold, multicrop.preprocess_image(image, cfg, IDS)))
  return out


def test_tokens_indices_masks_tiling_exact(golden_outputs):
  for case, gold, ours in golden_outputs:
    for key in ("image_tokens", "image_input_idx", "image_masks", "tiling"):
      np.testing.assert_array_equal(ours[key], gold[key], err_msg=f"{case['key']}: {key}")
      assert ours[key].dtype == gold[key].dtype, (case["key"], key)


def test_resize_geometry(golden_outputs):
  for case, gold, ours in golden_outputs:
    rows, cols = gold["tiling"]
    canvas = np.array([rows * 224 + 112, cols * 224 + 112])
    np.testing.assert_array_equal(canvas, gold["hires_target_hw"])
    np.testing.assert_array_equal(ours["hires_box"][:2], gold["hires_pad_top_left"], case["key"])
    np.testing.assert_array_equal(ours["hires_box"][2:], gold["hires_scaled_hw"], case["key"])
    np.testing.assert_array_equal(ours["global_box"][:2], gold["global_pad_top_left"], case["key"])
    np.testing.assert_array_equal(ours["global_box"][2:], gold["global_scaled_hw"], case["key"])


def test_pixels_bit_exact(golden_outputs):
  """The numpy port of TF's antialiased bilinear resize reproduces the official pixels exactly."""
  for case, gold, ours in golden_outputs:
    crops = ours["images"]
    np.testing.assert_array_equal(crops.shape, gold["images_shape"])
    flat = crops.reshape(-1)[gold["sample_flat_idx"]]
    np.testing.assert_allclose(flat, gold["sample_values"], rtol=0, atol=1e-5, err_msg=case["key"])
    per_crop = crops.reshape(crops.shape[0], -1).astype(np.float64)
    np.testing.assert_allclose(per_crop.mean(1), gold["images_crop_mean"], atol=1e-5)
    np.testing.assert_allclose(per_crop.std(1), gold["images_crop_std"], atol=1e-5)
    digest = hashlib.sha256(crops.astype("<f4").tobytes()).hexdigest()
    assert digest == str(gold["images_sha256"]), f"{case['key']}: pixels not bit-identical"


def test_processor_sequence(golden_outputs, golden_dir):
  """BOS + image tokens + prompt (real 7B-D tokenizer), image_input_idx shifted by the BOS."""
  tok = tokenizer.load_tokenizer(golden_dir / "molmo-7b-d-hf")
  assert tok.image_token_ids == IDS and tok.bos_id == BOS
  prompt = tok.encode(" User: Describe this image. Assistant:")
  for case, gold, ours in golden_outputs:
    ids = np.concatenate([[tok.bos_id], ours["image_tokens"], prompt]).astype(np.int32)
    np.testing.assert_array_equal(ids, gold["processor_input_ids"], case["key"])
    idx = np.where(ours["image_input_idx"] >= 0, ours["image_input_idx"] + 1,
                   ours["image_input_idx"])
    np.testing.assert_array_equal(idx, gold["processor_image_input_idx"], case["key"])


def _crop_position_index(layout, cfg):
  """Independent bookkeeping from crop positions: local pooled cell (i, j) of crop (r, c) sits
  at canvas patch (r*W + i*pool, c*W + j*pool); it is kept unless it lies in a margin that a
  neighbouring crop covers; its grid cell is that patch position / pool."""
  rows, cols = layout.tiling
  side, pool, w = cfg.tokens_side, cfg.pool, cfg.window_patches
  lm, rm = cfg.overlap_margins
  grid_w = (cols * w + lm + rm) // pool
  global_len = 2 + side * (side + 1)
  out = np.full((rows * cols, side * side), multicrop.DROPPED, np.int64)
  for r in range(rows):
    for c in range(cols):
      for i in range(side):
        for j in range(side):
          py, px = i * pool, j * pool
          lo_y, hi_y = (0 if r == 0 else lm), (cfg.crop_patches if r == rows - 1 else lm + w)
          lo_x, hi_x = (0 if c == 0 else lm), (cfg.crop_patches if c == cols - 1 else lm + w)
          if lo_y <= py < hi_y and lo_x <= px < hi_x:
            gy, gx = (r * w + py) // pool, (c * w + px) // pool
            out[r * cols + c, i * side + j] = global_len + 1 + gy * (grid_w + 1) + gx
  return out


def _check_layout(h, w, cfg):
  layout = multicrop.image_layout(h, w, cfg, IDS)
  rows, cols = layout.tiling
  tokens, idx = layout.tokens, layout.image_input_idx
  assert 1 <= rows * cols <= cfg.max_crops, (h, w, cfg.max_crops)
  assert idx.shape == (1 + rows * cols, cfg.tokens_side ** 2)
  valid = idx[idx >= 0]
  assert np.all(tokens[valid] == IDS.im_patch), (h, w)
  assert len(np.unique(valid)) == len(valid) == np.sum(tokens == IDS.im_patch), (h, w)
  assert np.all(idx[idx < 0] == multicrop.DROPPED)
  grid_h, grid_w = layout.grid
  assert len(tokens) == 4 + cfg.tokens_side * (cfg.tokens_side + 1) + grid_h * (grid_w + 1)
  assert np.sum(tokens == IDS.im_col) == cfg.tokens_side + grid_h
  assert np.sum(tokens == IDS.im_start) == np.sum(tokens == IDS.im_end) == 2
  np.testing.assert_array_equal(idx[1:], _crop_position_index(layout, cfg))


def test_layout_properties_random_sizes():
  """Random sizes from 1x1 to 6000 px per side (both orientations), every max_crops 1..36."""
  rng = np.random.default_rng(1234)
  for max_crops in range(1, 37):
    cfg = multicrop.CropConfig(max_crops=max_crops)
    sizes = [(1, 1), (6000, 300), (300, 6000), (112, 112), (113, 111), (336, 336)]
    sizes += [tuple(int(v) for v in rng.integers(1, 6001, 2)) for _ in range(6)]
    for h, w in sizes:
      _check_layout(h, w, cfg)


def test_select_tiling_edge_cases():
  cfg = multicrop.CropConfig()
  # A side under 112 px makes every required scale negative: always 1x1.
  assert multicrop.image_layout(1500, 60, cfg, IDS).tiling == (1, 1)
  assert multicrop.image_layout(60, 1500, cfg, IDS).tiling == (1, 1)
  # A side of exactly 112 px divides by zero (scale inf) and still works, without a warning.
  with np.errstate(all="raise"):
    assert multicrop.image_layout(112, 2000, cfg, IDS).tiling == (1, 9)  # 9*224/1888 >= 1
  # Worked examples of the spec.
  for (h, w), tiling in {(480, 640): (2, 3), (768, 1024): (3, 4), (2000, 500): (6, 2),
                         (224, 224): (1, 1)}.items():
    assert multicrop.image_layout(h, w, cfg, IDS).tiling == tiling


def test_small_geometry_and_corrected_masks():
  """A demo-sized geometry (112 px crops) and the corrected image_masks mode."""
  cfg = multicrop.CropConfig(crop_size=112, patch_size=14, overlap_margins=(2, 2), max_crops=6)
  image = np.random.default_rng(0).integers(0, 256, (70, 200, 3), dtype=np.uint8)
  out = multicrop.preprocess_image(image, cfg, IDS)
  rows, cols = out["tiling"]
  assert out["images"].shape == (1 + rows * cols, 64, 588)
  _check_layout(70, 200, cfg)
  fixed = multicrop.preprocess_image(image, multicrop.CropConfig(
      crop_size=112, patch_size=14, overlap_margins=(2, 2), max_crops=6, legacy_mask=False), IDS)
  np.testing.assert_array_equal(fixed["images"], out["images"])
  np.testing.assert_array_equal(fixed["image_masks"][1:], out["image_masks"][:-1])
  assert np.all(out["image_masks"][-1] == -1)
  # Corrected global row: the fraction of real pixels of the global crop's own padding.
  top, left, h, w = out["global_box"]
  pixel_mask = np.zeros((112, 112), np.float32)
  pixel_mask[top:top + h, left:left + w] = 1
  per_patch = pixel_mask.reshape(8, 14, 8, 14).transpose(0, 2, 1, 3).reshape(64, 196).mean(-1)
  np.testing.assert_array_equal(fixed["image_masks"][0], per_patch)


def test_invalid_config():
  with pytest.raises(ValueError, match="multiple of patch_size"):
    multicrop.CropConfig(crop_size=100)
  with pytest.raises(ValueError, match="max_crops"):
    multicrop.CropConfig(max_crops=0)


def test_whole_pixel_conversion_bit_exact(golden_dir, monkeypatch):
  """Large images are converted as 4-byte pixels (4th channel carried through the resize and
  dropped); force that path on the goldens: still bit-identical."""
  monkeypatch.setattr(resize, "_WHOLE_PIXELS_FROM", 0)
  for key, png in [("chelsea_300x451_mc12", "chelsea_300x451.png"),
                   ("hubble_1080x1920_mc12", "hubble_1080x1920.png")]:
    image = images.load_image(golden_dir / "preprocess" / png)
    assert resize.to_float(image).shape[2] == 4  # PIL's RGB is stored as RGBX
    gold = np.load(golden_dir / "preprocess" / f"{key}.npz")
    out = multicrop.preprocess_image(image, multicrop.CropConfig(max_crops=12), IDS)
    assert hashlib.sha256(out["images"].astype("<f4").tobytes()).hexdigest() == str(
        gold["images_sha256"]), key
    # A plain contiguous array takes the 3-channel path.
    assert resize.to_float(np.ascontiguousarray(image)).shape[2] == 3

"""Multi-crop preprocessing against the official outputs, and layout invariants on random sizes."""
import hashlib
import json

import numpy as np
import pytest

from data_pipelines import images, multicrop, tokenizer

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

"""`python -m data_pipelines.preprocess` and the whole per-example path (decode, crops, format,
tokenize)."""
import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_pipelines import formatting, multicrop, preprocess, tokenizer

CASE = "chelsea_300x451"


@pytest.fixture(scope="module")
def qwen2(golden_dir):
  return tokenizer.load_tokenizer(golden_dir / "molmo-7b-d-hf")


def test_cli_out_matches_golden(golden_dir, tmp_path, capsys):
  out, show = tmp_path / "x.npz", tmp_path / "x.png"
  rc = preprocess.main([str(golden_dir / "preprocess" / f"{CASE}.png"), "--preset", "molmo-7b-d",
                        "--max-crops", "12", "--out", str(out), "--show", str(show),
                        "--points", '<point x="50.0" y="50.0" alt="cat">cat</point>'])
  assert rc == 0
  printed = capsys.readouterr().out
  assert "tiling           1x2" in printed and "image tokens     412 (384 receive" in printed
  gold = np.load(golden_dir / "preprocess" / f"{CASE}_mc12.npz")
  ours = np.load(out)
  for key in ("image_tokens", "image_input_idx", "image_masks", "tiling", "hires_target_hw",
              "hires_scaled_hw", "hires_pad_top_left", "global_scaled_hw", "global_pad_top_left"):
    np.testing.assert_array_equal(ours[key], gold[key], err_msg=key)
    assert ours[key].dtype == gold[key].dtype, key
  assert ours["images"].dtype == np.float32
  np.testing.assert_array_equal(ours["images"].shape, gold["images_shape"])
  np.testing.assert_array_equal(ours["images"].reshape(-1)[gold["sample_flat_idx"]],
                                gold["sample_values"])
  with Image.open(show) as drawn:
    assert drawn.size[0] > 560 and drawn.size[1] == 336
    # The point lands at the centre of the resized image: (left + 50 % of width, 50 % of 336).
    left, width = int(ours["hires_pad_top_left"][1]), int(ours["hires_scaled_hw"][1])
    assert drawn.getpixel((left + width // 2, 168)) == (255, 0, 0)


def test_cli_bad_file(tmp_path, capsys):
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
  assert preprocess.main([str(bad)]) == 1
  assert "bad.jpg" in capsys.readouterr().err


def test_cli_module_entry_point(golden_dir):
  result = subprocess.run(
      [sys.executable, "-m", "data_pipelines.preprocess",
       str(golden_dir / "preprocess" / "astronaut_face_100x100.png"), "--max-crops", "4"],
      capture_output=True, text=True, timeout=120, check=True)
  assert "tiling           1x1" in result.stdout


def test_preprocess_example_with_image(qwen2):
  pixels = np.random.default_rng(0).integers(0, 256, (90, 160, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, "PNG")
  example = {"image": buf.getvalue(), "style": "pointing", "label": "Dots",
             "points": [[16.0, 9.0], [80.0, 45.0]]}
  cfg = multicrop.CropConfig(max_crops=4)
  out = preprocess.preprocess_example(example, qwen2, cfg, rng=np.random.RandomState(0))
  layout = multicrop.image_layout(90, 160, cfg, qwen2.image_token_ids)
  n = len(layout.tokens)
  assert out["input_tokens"][0] == qwen2.bos_id
  np.testing.assert_array_equal(out["input_tokens"][1:1 + n], layout.tokens)
  # Every valid (BOS-shifted) index points at an <im_patch> of the input sequence.
  idx = out["image_input_idx"][out["image_input_idx"] >= 0]
  assert np.all(out["input_tokens"][idx] == qwen2.image_token_ids.im_patch)
  assert out["images"].shape == (out["image_input_idx"].shape[0], 576, 588)
  answer = qwen2.decode(out["target_tokens"][out["loss_masks"] > 0])
  assert answer == ' <points x1="10.0" y1="10.0" x2="50.0" y2="50.0" alt="dots">dots</points>'
  assert out["metadata"] == {"points": example["points"]}


def test_text_only_example(qwen2):
  """Text-only: BOS + text, shifted targets (the official code instead returns inputs equal to
  targets without BOS, which trains on copying the current token)."""
  out = preprocess.preprocess_example({"style": "none", "question": "Hi", "answer": "Hello"}, qwen2,
                                      multicrop.CropConfig(), format_cfg=formatting.FINETUNED)
  text = qwen2.encode(" User: none: Hi Assistant:") + qwen2.encode(" Hello") + [qwen2.eos_id]
  assert out["input_tokens"].tolist() == [qwen2.bos_id] + text[:-1]
  assert out["target_tokens"].tolist() == text
  assert "images" not in out

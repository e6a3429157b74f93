"""Molmo2 preprocessing against transformers' Molmo2 processors, on videos the tests encode.

transformers' Molmo2 image/video processors need torchvision, which is not installed beside
the CPU torch here; `_TorchOnly` swaps their two torchvision calls (resize, normalize) for the
torch functions torchvision runs for float tensors (`F.interpolate` bilinear without
antialiasing; (x - mean) / std). Everything else (tiling, crops, pooling indices, grids, token
strings, tokenization, mm_token_type_ids) is transformers' own code.
"""
import fractions
import json
import types

import av
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.models.molmo2.image_processing_molmo2 import Molmo2ImageProcessor
from transformers.models.molmo2.processing_molmo2 import Molmo2Processor
from transformers.models.molmo2.video_processing_molmo2 import Molmo2VideoProcessor
from transformers.video_utils import VideoMetadata

from data_pipelines import molmo2_images, molmo2_processor, tokenizer as tokenizer_lib, video

SPECIAL = ["<|endoftext|>", "<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<|image|>",
           "<low_res_im_start>", "<frame_start>", "<frame_end>", "<im_low>", "<|video|>"]
# One uint8 level of the resize (1 / 127.5 after normalisation): float32 rounding of the
# bilinear weights flips a handful of pixels that sit at x.5 (torch itself flips them between
# thread counts).
PIXEL_ATOL = 1.01 / 127.5


class _TorchOnly:
  def resize(self, image, size, resample=None, antialias=True, **kwargs):
    return torch.nn.functional.interpolate(image, size=(size.height, size.width), mode="bilinear",
                                           align_corners=False, antialias=antialias)

  def normalize(self, image, mean, std, inplace=False):
    mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
    return (image - mean) / std


class _ImageProcessor(_TorchOnly, Molmo2ImageProcessor):
  pass


class _VideoProcessor(_TorchOnly, Molmo2VideoProcessor):
  pass


class _Processor(Molmo2Processor):
  def check_argument_for_proper_class(self, name, arg):  # its class lookup needs torchvision
    return None


@pytest.fixture(scope="module")
def processor_dir(tmp_path_factory):
  """A tiny byte-level BPE tokenizer with Molmo2's special tokens + processor_config.json."""
  folder = tmp_path_factory.mktemp("molmo2_processor")
  tok = HFTokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  text = ["User: Describe this image. Assistant: What happens in the video? 0.0 0.5 1.0 12.5"] * 8
  tok.train_from_iterator(text, trainers.BpeTrainer(
      vocab_size=300, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(str(folder / "tokenizer.json"))
  (folder / "tokenizer_config.json").write_text(json.dumps(
      {"eos_token": "<|endoftext|>", "bos_token": None}))
  (folder / "processor_config.json").write_text(json.dumps({
      "processor_class": "Molmo2Processor", "image_use_col_tokens": True,
      "use_single_crop_start_token": True, "video_use_col_tokens": False,
      "use_frame_special_tokens": True,
      "image_processor": {"max_crops": 8, "overlap_margins": [4, 4], "pooling_size": [2, 2],
                          "patch_size": 14, "size": {"height": 378, "width": 378}},
      "video_processor": {"pooling_size": [3, 3], "num_frames": 16, "max_fps": 2,
                          "frame_sample_mode": "uniform_last_frame", "sampling_fps": 2}}))
  return folder


@pytest.fixture(scope="module")
def ours(processor_dir):
  return (tokenizer_lib.load_tokenizer(processor_dir),
          molmo2_processor.load_config(processor_dir))


@pytest.fixture(scope="module")
def reference(processor_dir):
  fast = PreTrainedTokenizerFast(tokenizer_file=str(processor_dir / "tokenizer.json"),
                                 eos_token="<|endoftext|>")
  # transformers' Molmo2VideoProcessor leaves do_rescale / do_normalize unset (uint8 frames out)
  # unless the checkpoint's video config turns them on, as the released models' configs do.
  videos = _VideoProcessor(do_rescale=True, do_normalize=True)
  return _Processor(image_processor=_ImageProcessor(), video_processor=videos,
                    tokenizer=fast)


def write_video(path, n_frames=30, fps=10, size=(48, 64), codec="mpeg4", pts=None, **options):
  """Encodes a white square moving right over n_frames frames (PyAV); returns the frames."""
  frames = []
  with av.open(str(path), "w", options=options) as container:
    stream = container.add_stream(codec, rate=fps)
    stream.height, stream.width = size
    stream.pix_fmt = "yuv420p"
    for i in range(n_frames):
      frame = np.zeros(size + (3,), np.uint8)
      x = (i * 2) % (size[1] - 8)
      frame[size[0] // 2 - 4:size[0] // 2 + 4, x:x + 8] = 255
      frames.append(frame)
      av_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
      if pts is not None:
        av_frame.pts, av_frame.time_base = pts[i], fractions.Fraction(1, fps)
      for packet in stream.encode(av_frame):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  return frames


def _random_images(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, s + (3,), dtype=np.uint8) for s in shapes]


def _assert_same(ours_out, ref_out, pixel_keys=("pixel_values", "pixel_values_videos")):
  for key, expected in ref_out.items():
    if key == "attention_mask":
      continue
    got = ours_out[key]
    assert got.shape == expected.shape and got.dtype == expected.dtype, key
    if key in pixel_keys:
      diff = np.abs(got - expected)
      assert diff.max() <= PIXEL_ATOL, key
      assert (diff > 0).mean() < 1e-4, key
    else:
      np.testing.assert_array_equal(got, expected, err_msg=key)


@pytest.mark.parametrize("shape", [(300, 451), (100, 100), (1080, 1920), (2000, 300), (40, 1500)])
def test_image_parity(shape, ours, reference):
  tok, cfg = ours
  image = _random_images([shape])
  prompt = "User: <|image|> Describe this image. Assistant:"
  ref = reference(images=image, text=prompt, return_tensors="np",
                  images_kwargs={"do_convert_rgb": False})
  _assert_same(molmo2_processor.process(prompt, tok, cfg, images=image), ref)


def test_multi_image_parity_and_budget(ours, reference):
  tok, cfg = ours
  images = _random_images([(300, 451), (80, 700), (300, 451)], seed=1)
  prompt = "User: Image 1<|image|>Image 2<|image|>Image 3<|image|> Compare. Assistant:"
  ref = reference(images=images, text=prompt, return_tensors="np",
                  images_kwargs={"do_convert_rgb": False})
  out = molmo2_processor.process(prompt, tok, cfg, images=images)
  _assert_same(out, ref)
  assert out["image_num_crops"].tolist() == [3, 2, 3]
  # Each image's pooled tokens go, in order, on its <im_patch> tokens.
  n_patch = (out["input_ids"][0] == tok.token_to_id("<im_patch>")).sum()
  assert n_patch == out["image_token_pooling"].shape[0] == out["image_grids"][:, :2].prod(1).sum() \
      + out["image_grids"][:, 2:].prod(1).sum()
  with pytest.raises(ValueError, match="more than max_images=5"):
    molmo2_processor.process(prompt, tok, cfg, images=_random_images([(20, 20)] * 6))


def test_prompt_without_placeholders_and_mismatches(ours):
  tok, cfg = ours
  image = _random_images([(64, 64)])
  plain = molmo2_processor.process("Describe.", tok, cfg, images=image)
  explicit = molmo2_processor.process("<|image|>Describe.", tok, cfg, images=image)
  np.testing.assert_array_equal(plain["input_ids"], explicit["input_ids"])
  assert plain["input_ids"][0, 0] == tok.bos_id
  assert plain["input_ids"][0, 1] == tok.token_to_id("<low_res_im_start>")
  with pytest.raises(ValueError, match="2 <\\|image\\|> placeholders for 1 inputs"):
    molmo2_processor.process("<|image|><|image|>", tok, cfg, images=image)
  with pytest.raises(ValueError, match="no such input"):
    molmo2_processor.process("<|video|> hi", tok, cfg, images=image)


def test_pooling_windows_match_transformers():
  from transformers.models.molmo2.image_processing_molmo2 import arange_for_pooling
  for h, w, pool in [(27, 27, (2, 2)), (27, 27, (3, 3)), (42, 23, (2, 2)), (5, 7, (3, 2))]:
    grid = np.arange(h * w, dtype=np.int32).reshape(h, w)
    expected, _, _ = arange_for_pooling(torch.from_numpy(grid), *pool)
    np.testing.assert_array_equal(molmo2_images.pooling_windows(grid, pool), expected.numpy())


def test_video_parity(tmp_path, ours, reference):
  tok, cfg = ours
  path = tmp_path / "shapes.mp4"
  frames = write_video(path, n_frames=35, fps=10)
  prompt = "User: <|video|> Where does the square go? Assistant:"
  out = molmo2_processor.process(prompt, tok, cfg, video=str(path))
  # 3.5 s at 10 fps, max_fps 2: every 5th frame and the last one.
  np.testing.assert_array_equal(out["frame_indices"], [0, 5, 10, 15, 20, 25, 30, 34])
  np.testing.assert_allclose(out["timestamps"], np.array([0, 5, 10, 15, 20, 25, 30, 34]) / 10)
  with av.open(str(path)) as container:  # an independent full decode
    decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
  sampled = decoded[out["frame_indices"]]
  meta = VideoMetadata(total_num_frames=35, fps=10.0, frames_indices=out["frame_indices"].tolist(),
                       duration=3.5, height=48, width=64)
  ref = reference(videos=[sampled], text=prompt, return_tensors="np",
                  videos_kwargs={"do_sample_frames": False, "video_metadata": [meta],
                                 "do_convert_rgb": False})
  _assert_same(out, ref)
  text = tok.decode(out["input_ids"][0])
  assert text.startswith("User: 0.0  0.5  1.0 ") and "3.4  Where" in text
  # The decoded frames show the square where it was drawn (lossy codec: compare coarsely).
  for k, index in enumerate(out["frame_indices"]):
    assert np.abs(sampled[k].astype(int) - frames[index]).mean() < 8


def test_iter_frames_seeks_to_the_same_frames(tmp_path):
  path = tmp_path / "long.mkv"
  write_video(path, n_frames=90, fps=15, codec="libx264")
  info = video.probe(path)
  assert (info.num_frames, info.fps, info.height, info.width) == (90, 15.0, 48, 64)
  with av.open(str(path)) as container:
    decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
  indices = np.array([0, 1, 1, 40, 41, 89])
  for gap in (0.0, 100.0):  # seek before every frame / decode straight through
    got = list(video.iter_frames(info, indices, seek_gap_s=gap))
    for frame, index in zip(got, indices):
      np.testing.assert_array_equal(frame, decoded[index])


def _official_sample(total, video_fps, mode, num_frames, max_fps, sampling_fps):
  """The official Molmo2 rule, transcribed loop for loop (as vLLM's Molmo2 carries it)."""
  duration = total / video_fps
  if mode == "uniform_last_frame":
    if total <= 2:
      return np.arange(total)
    if duration > (num_frames - 1) / max_fps:
      return np.linspace(0, total - 1, num=min(num_frames, total), endpoint=True).astype(int)
    float_indices = np.arange(0.0, stop=total - 1, step=float(video_fps / max_fps))
    if np.round(float_indices[-1]) != total - 1:
      float_indices = np.concatenate([float_indices, [total - 1]], axis=0)
    return np.round(float_indices).astype(int)
  candidates = [float(c) for c in range(int(sampling_fps), int(video_fps) + 1, int(sampling_fps))
                if c <= 8 and int(video_fps) % c == 0]
  sampled, selected = 0, None
  for target in candidates:
    step = max(int(video_fps / target), 1)
    n = int(total / step)
    if sampled == 0:
      selected, sampled = target, n
    elif n > num_frames:
      continue
    elif n > sampled:
      selected, sampled = target, n
  if selected is None:
    indices = np.linspace(0, total, num_frames, endpoint=False, dtype=int)
  else:
    indices = np.arange(0, total, max(int(video_fps / selected), 1))
  return indices[:num_frames]


CASES = [(total, fps) for fps in (1, 2, 6, 10, 24, 25, 29.97, 30, 60)
         for total in (1, 2, 3, 7, 30, 61, 250, 901, 3600)]


def test_uniform_last_frame_and_fps_modes_follow_the_official_rule():
  for total, fps in CASES:
    for max_frames in (4, 16, 384):
      got = video.sample_frame_indices(total, fps, mode="uniform_last_frame",
                                       max_frames=max_frames, max_fps=2)
      np.testing.assert_array_equal(
          got, _official_sample(total, fps, "uniform_last_frame", max_frames, 2, 2),
          err_msg=f"{total} frames at {fps} fps, {max_frames} frames")
      assert got[-1] == total - 1 and len(got) <= max_frames
      if float(fps).is_integer() and fps % 2 == 0:
        np.testing.assert_array_equal(
            video.sample_frame_indices(total, fps, mode="fps", max_frames=max_frames,
                                       sampling_fps=2),
            _official_sample(total, fps, "fps", max_frames, 2, 2))
  # Hand-checked: 4 s at 30 fps, 2 fps cap -> every 15th frame and the last one.
  np.testing.assert_array_equal(video.sample_frame_indices(120, 30.0, max_frames=384),
                                [0, 15, 30, 45, 60, 75, 90, 105, 119])
  with pytest.raises(ValueError, match="sampling_fps=2 must divide"):
    video.sample_frame_indices(100, 25.0, mode="fps")


def test_transformers_mode_matches_its_sample_frames():
  for total, fps in CASES:
    for max_frames in (4, 64):
      fake = types.SimpleNamespace(max_fps=2, num_frames=max_frames)
      meta = VideoMetadata(total_num_frames=total, fps=float(fps))
      expected = Molmo2VideoProcessor.sample_frames(fake, meta).numpy()
      got = video.sample_frame_indices(total, fps, mode="transformers", max_frames=max_frames,
                                       max_fps=2)
      np.testing.assert_array_equal(got, expected, err_msg=f"{total} at {fps}")


def _truncated_mp4(tmp_path):
  path = tmp_path / "full.mp4"
  write_video(path, n_frames=40, movflags="faststart")  # index first: the cut keeps it
  data = path.read_bytes()
  (tmp_path / "cut.mp4").write_bytes(data[:len(data) * 6 // 10])
  return tmp_path / "cut.mp4"


def _audio_only(tmp_path):
  path = tmp_path / "audio.mkv"
  with av.open(str(path), "w") as container:
    stream = container.add_stream("pcm_s16le", rate=8000)
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
    frame.sample_rate = 8000
    for packet in list(stream.encode(frame)) + list(stream.encode()):
      container.mux(packet)
  return path


def _zero_frames(tmp_path):
  path = tmp_path / "empty.avi"
  with av.open(str(path), "w") as container:
    stream = container.add_stream("mpeg4", rate=10)
    stream.height, stream.width, stream.pix_fmt = 48, 64, "yuv420p"
    container.start_encoding()
  return path


def _variable_rate(tmp_path):
  path = tmp_path / "vfr.mkv"
  write_video(path, n_frames=10, fps=30, codec="libx264", pts=[0, 1, 2, 3, 8, 9, 10, 11, 20, 21])
  return path


def _text_file(tmp_path):
  path = tmp_path / "notes.mp4"
  path.write_text("not a video")
  return path


@pytest.mark.parametrize("make, max_pixels, cause", [
    (_truncated_mp4, None, "truncated or corrupt data"),
    (_audio_only, None, "no video stream"),
    (_zero_frames, None, "zero frames"),
    (_variable_rate, None, "variable frame rate"),
    (_text_file, None, "not a video file"),
    (lambda tmp: tmp / "missing.mp4", None, "unreadable file"),
    (lambda tmp: (write_video(tmp / "big.mp4", n_frames=3), tmp / "big.mp4")[1], 1000,
     "absurd dimensions 64x48"),
])
def test_bad_videos_get_one_clear_error(tmp_path, make, max_pixels, cause, ours):
  path = make(tmp_path)
  kwargs = {} if max_pixels is None else {"max_pixels": max_pixels}
  with pytest.raises(video.VideoDecodeError) as err:
    video.probe(path, **kwargs)
  assert str(err.value).startswith(f"{path}: {cause}")
  assert "\n" not in str(err.value)
  if max_pixels is None:  # and the processor passes the same error on
    tok, cfg = ours
    with pytest.raises(video.VideoDecodeError, match=cause):
      molmo2_processor.process("<|video|>", tok, cfg, video=str(path))


def test_cli_writes_the_processor_arrays(tmp_path, processor_dir, ours):
  from PIL import Image
  from data_pipelines import preprocess
  tok, cfg = ours
  images = _random_images([(300, 451), (120, 90)], seed=3)
  paths = []
  for k, image in enumerate(images):
    paths.append(str(tmp_path / f"im{k}.png"))
    Image.fromarray(image).save(paths[-1])
  prompt = "User: <|image|><|image|> Compare. Assistant:"
  out, show = tmp_path / "images.npz", tmp_path / "images.png"
  assert preprocess.main(paths + ["--processor", str(processor_dir), "--prompt", prompt,
                                  "--out", str(out), "--show", str(show)]) == 0
  expected = molmo2_processor.process(prompt, tok, cfg, images=images)
  with np.load(out) as saved:
    assert sorted(saved.files) == sorted(expected)
    for key in expected:
      np.testing.assert_array_equal(saved[key], expected[key], err_msg=key)
  with Image.open(show) as sheet:  # two images, each one row of 378-px crops
    assert sheet.height == 2 * (378 + 8)

  clip = tmp_path / "clip.mkv"
  write_video(clip, n_frames=20, fps=10, codec="libx264")
  out = tmp_path / "video.npz"
  assert preprocess.main([str(clip), "--preset", "molmo2-8b", "--tokenizer", str(processor_dir),
                          "--prompt", "<|video|> Where?", "--max-frames", "3", "--out", str(out),
                          "--show", str(tmp_path / "frames.png")]) == 0
  with np.load(out) as saved:
    np.testing.assert_array_equal(saved["frame_indices"], [0, 9, 19])
    assert saved["video_grids"].tolist() == [[3, 9, 9]]
    assert saved["pixel_values_videos"].shape == (3, 729, 588)


def test_cli_errors_are_one_line(tmp_path, processor_dir, capsys):
  from data_pipelines import preprocess
  clip = tmp_path / "clip.mp4"
  write_video(clip, n_frames=5)
  assert preprocess.main([str(clip), "--preset", "molmo2-8b", "--prompt", "x",
                          "--out", str(tmp_path / "o.npz")]) == 2
  assert "needs --tokenizer" in capsys.readouterr().err
  bad = tmp_path / "bad.mp4"
  bad.write_bytes(b"\x00" * 100)
  assert preprocess.main([str(bad), "--processor", str(processor_dir), "--prompt", "x",
                          "--out", str(tmp_path / "o.npz")]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "bad.mp4: not a video file" in err
  assert preprocess.main([str(clip), str(clip), "--processor", str(processor_dir), "--prompt",
                          "x", "--out", str(tmp_path / "o.npz")]) == 1
  assert "not 2 files with 2 video(s)" in capsys.readouterr().err
  assert not (tmp_path / "o.npz").exists()


def test_processor_folder_flags(tmp_path, processor_dir, ours):
  tok, _ = ours
  folder = tmp_path / "proc"
  folder.mkdir()
  for name in ("tokenizer.json", "tokenizer_config.json"):
    (folder / name).write_bytes((processor_dir / name).read_bytes())
  (folder / "processor_config.json").write_text(json.dumps(
      {"use_frame_special_tokens": False, "video_use_col_tokens": True,
       "use_single_crop_start_token": False}))
  (folder / "video_preprocessor_config.json").write_text(json.dumps(
      {"num_frames": 4, "frame_sample_mode": "fps", "do_normalize": True}))
  cfg = molmo2_processor.load_config(folder)
  assert (cfg.sampling.max_frames, cfg.sampling.mode, cfg.video.pool) == (4, "fps", (3, 3))
  ids = molmo2_processor.token_ids(tok)
  clip = tmp_path / "clip.mp4"
  write_video(clip, n_frames=12, fps=4)
  out = molmo2_processor.process("<|video|>", tok, cfg, video=str(clip))
  ids_out = out["input_ids"][0]
  assert (ids_out == ids.frame_start).sum() == 0 and (ids_out == ids.im_start).sum() == 4
  assert (ids_out == ids.im_col).sum() == 4 * 9  # a column token after each of the 9 rows
  image = molmo2_processor.process("<|image|>", tok, cfg, images=_random_images([(50, 50)]))
  assert (image["input_ids"][0] == ids.low_res_im_start).sum() == 0
  (folder / "video_preprocessor_config.json").write_text(json.dumps({"do_normalize": False}))
  with pytest.raises(ValueError, match="do_normalize=false"):
    molmo2_processor.load_config(folder)
  with pytest.raises(ValueError, match="no processor_config.json"):
    molmo2_processor.load_config(tmp_path)

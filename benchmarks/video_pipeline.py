"""Molmo2 video preprocessing throughput: decode + sample + crop + tokenize, per CPU-second.

    python benchmarks/video_pipeline.py [--seconds 30] [--repeats 3]

One example = a 1280x720, 30 fps H.264 clip of moving rectangles (encoded once into a temporary
folder; encoding is not timed) with a question, through `molmo2_processor.process` with the
released models' settings: probe (demux, no decoding), frame sampling, PyAV decoding of the
sampled frames, the 378 px resize + normalisation + patches of every frame, the 3x3 pooling
indices and the timestamped token text (a tiny tokenizer with Molmo2's special tokens; the text
is a small share of the time). Times are process CPU time (PyAV's decoding threads included),
best of `--repeats`. Rows: the released sampling (2 fps, at most 384 frames) and a 16-frame
budget (sparse frames: the decoder seeks). Columns "probe" and "decode" are timed on their own;
"frames+text" is the rest. Prints one table.
"""
import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipelines import molmo2_processor, tokenizer, video  # noqa: E402
from data_pipelines.sources.synthetic.video_shapes import encode_video  # noqa: E402

SPECIAL = ["<|endoftext|>", "<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<|image|>",
           "<low_res_im_start>", "<frame_start>", "<frame_end>", "<im_low>", "<|video|>"]


def clip_frames(seconds: float, fps: int = 30, height: int = 720, width: int = 1280):
  """uint8[H, W, 3] frames: a gradient with three coloured rectangles moving across it."""
  yy, xx = np.mgrid[0:height, 0:width]
  background = np.stack([xx * 200 // width, yy * 200 // height, np.full_like(xx, 120)], -1)
  background = background.astype(np.uint8)
  for t in range(int(seconds * fps)):
    frame = background.copy()
    for k, color in enumerate([(230, 40, 40), (40, 200, 60), (40, 80, 230)]):
      x = int((t * (6 + 3 * k)) % (width - 120))
      y = 100 + 180 * k
      frame[y:y + 90, x:x + 120] = color
    yield frame


def tiny_molmo2_tokenizer(folder: pathlib.Path):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(["User: What happens in the video? 0.0 0.5 12.5 Assistant:"] * 8,
                          trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL))
  tok.save(str(folder / "tokenizer.json"))
  (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
  return tokenizer.load_tokenizer(folder)


def cpu_s(fn, repeats: int) -> float:
  best = float("inf")
  for _ in range(repeats):
    start = time.process_time()
    fn()
    best = min(best, time.process_time() - start)
  return best


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--seconds", type=float, default=30.0)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  folder = pathlib.Path(tempfile.mkdtemp(prefix="video_pipeline_"))
  path = folder / "clip.mp4"
  encode_video(path, clip_frames(args.seconds), fps=30)
  tok = tiny_molmo2_tokenizer(folder)
  prompt = "User: <|video|> What happens in the video? Assistant:"

  rows = []
  for name, max_frames in (("2 fps, <= 384 frames", 384), ("16 frames", 16)):
    cfg = molmo2_processor.Molmo2ProcessorConfig(
        sampling=molmo2_processor.VideoSampling(max_frames=max_frames))
    info = video.probe(path)
    indices = video.sample_frame_indices(info.num_frames, info.fps, max_frames=max_frames)
    probe = cpu_s(lambda: video.probe(path), args.repeats)
    decode = cpu_s(lambda: sum(1 for _ in video.iter_frames(info, indices)), args.repeats)
    total = cpu_s(lambda: molmo2_processor.process(prompt, tok, cfg, video=str(path)),
                  args.repeats)
    start = time.perf_counter()
    out = molmo2_processor.process(prompt, tok, cfg, video=str(path))
    wall = time.perf_counter() - start
    rows.append((name, len(indices), out["input_ids"].shape[1], probe, decode,
                 total - probe - decode, total, wall))

  print(f"clip: {args.seconds:g} s, 1280x720, 30 fps, H.264 ({path.stat().st_size / 1e6:.1f} MB)")
  header = (f"{'sampling':<22}{'frames':>7}{'tokens':>8}{'probe s':>9}{'decode s':>10}"
            f"{'frames+text s':>15}{'total CPU s':>13}{'wall s':>8}{'examples/CPU-s':>16}")
  print(header)
  for name, frames, tokens, probe, decode, rest, total, wall in rows:
    print(f"{name:<22}{frames:>7}{tokens:>8}{probe:>9.3f}{decode:>10.3f}{rest:>15.3f}"
          f"{total:>13.3f}{wall:>8.3f}{1 / total:>16.3f}")


if __name__ == "__main__":
  main()

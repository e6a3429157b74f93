"""Preprocessing throughput per CPU core: decode + 12-crop multi-crop + format/tokenize.

    python benchmarks/preprocess.py [--repeats 10] [--tokenizer FOLDER]

One example = a JPEG (1024x768 or 4000x3000, quality 90, a photo upscaled) with a pointing
question and answer, through `preprocess_example` (decode, TF-exact resizes, crops, masks,
chat formatting, tokenization). Times are process CPU time (single-threaded code, so this is
examples/s per core and stays meaningful on a shared machine), best of `--repeats`. Stage
columns: "decode" (`load_image`), "resize+pad" (uint8 -> float, both TF-exact resizes of the
high-res canvas and the global crop, padding, normalisation) and "crops+text", the rest
(patches, masks, token layout, formatting, tokenization). Prints one table.
"""
import argparse
import io
import os
import pathlib
import sys
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipelines import images, multicrop, preprocess, tokenizer  # noqa: E402

GOLDEN_TOKENIZER = pathlib.Path(__file__).resolve().parents[2] / "shared/golden/molmo-7b-d-hf"


def photo_jpeg(width: int, height: int) -> bytes:
  """A natural-looking JPEG (scikit-image's astronaut, bilinear-upscaled; noise if absent)."""
  try:
    from skimage import data
    base = Image.fromarray(data.astronaut())
  except ImportError:
    base = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), np.uint8))
  buf = io.BytesIO()
  base.resize((width, height), Image.Resampling.BILINEAR).save(buf, "JPEG", quality=90)
  return buf.getvalue()


def tiny_tokenizer(folder: pathlib.Path):
  """A byte-level BPE trained on a few sentences, when the real tokenizer files are absent."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"])
  tok.train_from_iterator(["User: Point to the red apples Assistant: <points x1=\"1.0\">"] * 20,
                          trainer)
  folder.mkdir(parents=True, exist_ok=True)
  tok.save(str(folder / "tokenizer.json"))
  return tokenizer.load_tokenizer(folder, pad_to=512)


def cpu_ms(fn, repeats: int) -> float:
  best = float("inf")
  for _ in range(repeats):
    start = time.process_time()
    fn()
    best = min(best, time.process_time() - start)
  return best * 1e3


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--tokenizer", default=str(GOLDEN_TOKENIZER))
  args = parser.parse_args()
  if pathlib.Path(args.tokenizer).exists():
    tok = tokenizer.load_tokenizer(args.tokenizer)
  else:
    import tempfile
    tok = tiny_tokenizer(pathlib.Path(tempfile.mkdtemp()) / "tok")
  crop = multicrop.CropConfig(max_crops=12)

  rows = []
  for width, height in [(1024, 768), (4000, 3000)]:
    data = photo_jpeg(width, height)
    example = {"image": data, "style": "pointing", "label": "astronaut",
               "points": [[width * 0.4, height * 0.3], [width * 0.6, height * 0.5]]}
    rng = np.random.RandomState(0)
    run = lambda: preprocess.preprocess_example(example, tok, crop, rng=rng)  # noqa: E731
    out = run()  # warm-up: caches resize weights and token layouts
    total = cpu_ms(run, args.repeats)
    decoded = images.load_image(data)
    layout = multicrop.image_layout(height, width, crop, tok.image_token_ids)
    sizes = [crop.canvas_size(layout.tiling), (crop.crop_size, crop.crop_size)]
    stages = {
        "decode": cpu_ms(lambda: images.load_image(data), args.repeats),
        "resize+pad": cpu_ms(lambda: images.resize_and_pad_many(decoded, sizes), args.repeats),
    }
    stages["crops+text"] = total - sum(stages.values())
    rows.append((f"{width}x{height} JPEG", f"{layout.tiling[0]}x{layout.tiling[1]}",
                 out["images"].shape[0], len(out["input_tokens"]), total, 1e3 / total, stages))

  names = list(rows[0][-1])
  header = ["image", "tiling", "crops", "tokens", "ms/example", "examples/s/core"] + [
      f"{n} ms" for n in names]
  print(" | ".join(header))
  print(" | ".join("---" for _ in header))
  for image, tiling, crops, tokens, total, rate, stages in rows:
    cells = [image, tiling, str(crops), str(tokens), f"{total:.1f}", f"{rate:.1f}"]
    print(" | ".join(cells + [f"{stages[n]:.1f}" for n in names]))


if __name__ == "__main__":
  main()

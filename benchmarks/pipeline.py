"""Input pipeline throughput: batches/s and examples/s of `data_pipelines.pipeline.make_pipeline`.

    python benchmarks/pipeline.py [--batches 6] [--workers 0,2] [--tokenizer FOLDER]

Two geometries, both on the synthetic mixture (render + multi-crop + format + tokenize + pack):
  demo: configs/demo.py (sft): 112 px images and crops, 2 crops, seq_len 256, batch 8;
  7B-D: configs/molmo_7b_d.py (sft) geometry: 336 px crops, max_crops 12, seq_len 2304, batch 4,
        on 672x896 synthetic images (tiling 3x4, so every example fills all 12 + 1 crops).
The first batch (worker start-up, caches) is excluded; batches/s and examples/s are wall time
over the next `--batches` batches, so they depend on what else runs on the machine. Without
workers the pipeline runs with no prefetch thread and "examples/cpu-s" divides by this
process's CPU time instead (all work runs in it), which stays comparable on a shared machine.
Prints one table.
"""
import argparse
import os
import pathlib
import sys
import time

import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import demo, molmo_7b_d  # noqa: E402
from data_pipelines import pipeline  # noqa: E402
from data_pipelines.tokenizer import load_tokenizer  # noqa: E402

GOLDEN_TOKENIZER = pathlib.Path(__file__).resolve().parents[2] / "shared/golden/molmo-7b-d-hf"


def geometries():
    small = demo.get_config("sft")
    small.data.mixture = "synthetic"
    big = molmo_7b_d.get_config("sft")
    # a (height, width) image size: the config's field is a square size (int)
    big.data = ml_collections.ConfigDict({**big.data.to_dict(), "mixture": "synthetic",
                                          "synthetic_image_size": (672, 896), "clock_image_size": 672})
    big.train.global_batch = 4
    return {"demo": small, "7B-D": big}


def measure(config, tokenizer, workers: int, batches: int):
    config.data.num_workers = workers
    # Without workers, no prefetch thread: work done ahead would escape the timed window.
    config.data.prefetch = 2 if workers else 0
    it = iter(pipeline.make_pipeline(config, tokenizer=tokenizer))
    try:
        first = next(it)
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(batches):
            next(it)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    finally:
        it.close()
    batch_size = first["input_ids"].shape[0]
    mbytes = sum(v.nbytes for v in first.values()) / 2 ** 20
    crops = int((first["image_input_idx"].max(axis=-1) >= 0).sum(axis=-1).mean())
    per_cpu = f"{batches * batch_size / cpu:.1f}" if workers == 0 else "-"
    return batch_size, first["input_ids"].shape[1], crops, mbytes, batches / seconds, per_cpu


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--workers", default="0,2")
    parser.add_argument("--tokenizer", default=str(GOLDEN_TOKENIZER),
                        help="tokenizer for both geometries (default: the Molmo-7B-D files of the goldens)")
    args = parser.parse_args(argv)
    if not pathlib.Path(args.tokenizer).exists():
        parser.error(f"tokenizer {args.tokenizer} not found; pass --tokenizer")
    tokenizer = load_tokenizer(args.tokenizer)
    rows = []
    for name, config in geometries().items():
        for workers in (int(w) for w in args.workers.split(",")):
            batch, seq_len, crops, mbytes, rate, per_cpu = measure(config, tokenizer, workers, args.batches)
            rows.append((name, workers, batch, seq_len, crops, mbytes, rate, rate * batch, per_cpu))
    header = ("geometry", "workers", "batch", "seq_len", "crops/ex", "MB/batch", "batches/s", "examples/s",
              "examples/cpu-s")
    print(" | ".join(header))
    print(" | ".join("-" * len(h) for h in header))
    for name, workers, batch, seq_len, crops, mbytes, rate, examples, per_cpu in rows:
        print(f"{name} | {workers} | {batch} | {seq_len} | {crops} | {mbytes:.1f} | {rate:.2f} | {examples:.1f} | "
              f"{per_cpu}")
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())

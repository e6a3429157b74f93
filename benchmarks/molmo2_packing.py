"""Molmo2 packing (data_pipelines.molmo2_pipeline): how full the rows are, per packing buffer.

    python benchmarks/molmo2_packing.py [--rows 48] [--seq-len 512] [--crops 16]

The examples are synthetic moving-shape videos (VideoShapesSource, "count" task, 8 frames at
4 fps: 4 frames sampled at 2 fps, 24 px frames of 4 px patches, 3x3 pooling; a tiny byte-level
tokenizer with Molmo2's special tokens), through the real processor, message-tree builder and
packer. For each packing buffer (0: one example per row; 48: the official SFT's, image weight
30), `--rows` rows of seq_len tokens and `--crops` frames: examples per row, the share of the
row's tokens and frames that are not padding, and rows per CPU-second of the whole pipeline
(videos are encoded once before timing). Prints one table.
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

from benchmarks.video_pipeline import tiny_molmo2_tokenizer  # noqa: E402
from data_pipelines import molmo2_pipeline, molmo2_processor  # noqa: E402
from data_pipelines.sources.synthetic.video_shapes import VideoShapesSource  # noqa: E402

BUFFERS = (0, 8, 48)
PROCESSOR = {"image_processor": {"max_crops": 2, "overlap_margins": [1, 1], "pooling_size": [2, 2], "patch_size": 4,
                                 "size": {"height": 24, "width": 24}},
             "video_processor": {"pooling_size": [3, 3], "overlap_margins": [1, 1], "num_frames": 8, "max_fps": 2,
                                 "patch_size": 4, "frame_sample_mode": "uniform_last_frame", "sampling_fps": 2,
                                 "size": {"height": 24, "width": 24}}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=48)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--crops", type=int, default=16)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        tok = tiny_molmo2_tokenizer(folder)
        (folder / "processor_config.json").write_text(json.dumps(PROCESSOR))
        processor = molmo2_processor.load_config(folder)
        budget = {"seq_len": args.seq_len, "crops": args.crops, "pooled_tokens": args.crops * 4, "slots": 9}
        pack = molmo2_pipeline.pack_config(tok, processor, budget)
        preprocess = molmo2_pipeline.Molmo2Preprocess(tok, processor, pack,
                                                      formats={"video_shapes": molmo2_pipeline.PLAIN_FORMAT})
        source = VideoShapesSource(64, image_size=(48, 64), seed=0, task="count", num_frames=8, fps=4,
                                   out_dir=folder / "videos")
        for i in range(len(source)):  # encode every video before timing
            source[i]
        print(f"seq_len {args.seq_len}, {args.crops} frames per row, {args.rows} rows")
        print(f"{'buffer':>6} {'examples/row':>13} {'tokens used':>12} {'frames used':>12} {'rows/CPU-s':>11}")
        for buffer in BUFFERS:
            data = molmo2_pipeline.make_pipeline_from_parts(
                {"video_shapes": source}, {"video_shapes": 1.0}, preprocess, seed=0, batch_size=1,
                buffer_size=buffer, image_weight=30.0, prefetch=0)
            it = iter(data)
            start = time.process_time()
            rows = [next(it) for _ in range(args.rows)]
            seconds = time.process_time() - start
            tokens = np.mean([np.mean(r["input_ids"] != -1) for r in rows])
            frames = np.mean([np.mean(~np.all(r["pixel_values"][0] == -1, axis=(1, 2))) for r in rows])
            print(f"{buffer:>6} {it.stats.examples / args.rows:>13.2f} {tokens:>12.1%} {frames:>12.1%} "
                  f"{args.rows / seconds:>11.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

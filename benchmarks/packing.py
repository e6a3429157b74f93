"""Packing several examples per training sequence (config.data.examples_per_row) on the demo recipe.

    python benchmarks/packing.py [--steps 40] [--rows 50]

For each (examples_per_row, seq_len): from `--rows` batches of the demo's input pipeline, the
examples per row, the fraction of the sequence that is text rather than padding, and the share of
examples cut at seq_len; then `--steps` steps of the real trainer (configs/demo.py:sft, CPU) and
the median step time and examples per second (first 10 steps excluded: compilation). The
tokenizer is the demo's, trained on the spot. Prints one table; ratios are against the first row
(one example per row, the official layout), measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import demo as demo_config  # noqa: E402
from data_pipelines import pipeline  # noqa: E402
from molmo_jax.demo import data as demo  # noqa: E402

SETTINGS = ((1, 320), (2, 256), (2, 320), (3, 320))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rows", type=int, default=50, help="batches read to measure the packing")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    from molmo_jax.train.trainer import train

    tmp = tempfile.mkdtemp(prefix="bench_packing_")
    base = demo_config.get_config("sft")
    vocab = int(base.model.llm.vocab_size) - 12
    tokenizer = demo.train_tokenizer(os.path.join(tmp, "tok"), demo.tokenizer_text(base, 100), vocab)
    rows = []
    for per_row, seq_len in SETTINGS:
        c = demo_config.get_config("sft")
        c.data.tokenizer, c.data.examples_per_row, c.data.seq_len = tokenizer, per_row, seq_len
        it = iter(pipeline.make_pipeline(c))
        fill = [np.mean(next(it)["input_ids"] >= 0) for _ in range(args.rows)]
        per = it.stats.examples / (args.rows * int(c.train.global_batch))
        cut = it.stats.truncated / max(it.stats.examples, 1)
        it.close()
        c.train.total_steps, c.checkpoint.every, c.log.every = args.steps, 10 ** 6, 10 ** 6
        workdir = os.path.join(tmp, f"run_{per_row}_{seq_len}")
        train(c, workdir)
        metrics = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))][10:]
        step = float(np.median([m["step_time_s"] for m in metrics if "step_time_s" in m]))
        examples = float(np.median([m["examples_per_s"] for m in metrics if "examples_per_s" in m]))
        rows.append((per_row, seq_len, per, float(np.mean(fill)), cut, step, examples))

    print(f"\nPacking on the demo recipe (batch {int(base.train.global_batch)} rows, CPU float32, "
          f"{args.steps} steps)\n")
    print("| examples_per_row | seq_len | examples / row | text fraction | cut at seq_len | step s | examples / s | vs 1 per row |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for per_row, seq_len, per, fill, cut, step, examples in rows:
        print(f"| {per_row} | {seq_len} | {per:.2f} | {fill:.2f} | {cut:.1%} | {step:.3f} | {examples:.1f} | "
              f"{examples / rows[0][-1]:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

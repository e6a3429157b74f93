"""Generation latency on CPU: prefill, per-token decode with the KV cache, and decoding by
recomputing the whole sequence (no cache), for batch 1 and 8 (float32).

    python benchmarks/generate.py [--prompt 256] [--new 32] [--repeats 3]

Small config (as benchmarks/forward.py): LLM d_model 256, 4 layers, 8 heads (4 kv), SwiGLU 1024,
vocab 4096; text-only prompts of --prompt tokens (the image is encoded once in the prefill, so it
does not change the per-token figures). With the cache: prefill = a 1-token generation; decode =
(time for --new tokens - prefill) / (--new - 1), one compiled chunk. Without the cache: each new
token costs a full forward over prompt + new tokens (the sequence padded to its final length, one
compiled program). Compiled once, median of --repeats timed runs. Prints one table.
"""
import argparse
import os
import statistics
import sys
import time

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from molmo_jax.inference.generate import GenerationConfig, Generator  # noqa: E402
from molmo_jax.model.molmo import Molmo  # noqa: E402
from benchmarks.forward import SMALL  # noqa: E402


def median_time(fn, repeats):
    fn()  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = Molmo(SMALL, rngs=nnx.Rngs(0))
    generator = Generator(model)
    graphdef, state = nnx.split(model)
    full_forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids)[:, -1])
    rng = np.random.RandomState(0)

    print(f"{'batch':>5} | {'prefill ms':>10} | {'cache ms/tok':>12} | {'cache tok/s':>11} | "
          f"{'no-cache ms/tok':>15} | {'no-cache tok/s':>14} | {'speed-up':>8}")
    print("-+-".join("-" * w for w in (5, 10, 12, 11, 15, 14, 8)))
    for b in (1, 8):
        batch = {"input_ids": rng.randint(2, 4096, (b, args.prompt)).astype(np.int32)}
        prefill = median_time(lambda: generator(batch, GenerationConfig(max_new_tokens=1)), args.repeats)
        config = GenerationConfig(max_new_tokens=args.new, chunk_size=args.new - 1)
        total = median_time(lambda: generator(batch, config), args.repeats)
        per_token = (total - prefill) / (args.new - 1)
        ids = rng.randint(2, 4096, (b, args.prompt + args.new)).astype(np.int32)
        recompute = median_time(lambda: jax.block_until_ready(full_forward(state, ids)), args.repeats)
        print(f"{b:>5} | {1e3 * prefill:>10.1f} | {1e3 * per_token:>12.2f} | {b / per_token:>11.0f} | "
              f"{1e3 * recompute:>15.2f} | {b / recompute:>14.0f} | {recompute / per_token:>7.1f}x")


if __name__ == "__main__":
    main()

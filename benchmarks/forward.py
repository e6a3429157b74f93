"""CPU forward throughput of a small Molmo in float32 (tokens/s).

    python benchmarks/forward.py [--repeats 5]

Small config: LLM d_model 256, 4 layers, 8 heads (4 kv), SwiGLU 1024, vocab 4096; ViT with the
release geometry (336 px, patch 14, 577 positions) at width 128, 4 layers, layers (-1, -3).
Cases: text only (batch 4 x 512 tokens) and with images (batch 2 x 512 tokens, 3 crops each,
432 image tokens). Compiled once, then the median of `--repeats` timed calls. Prints one table.
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

from molmo_jax.model.config import LLMConfig, MolmoConfig, VisionConfig  # noqa: E402
from molmo_jax.model.molmo import Molmo  # noqa: E402

SMALL = MolmoConfig(
    vision=VisionConfig(width=128, num_heads=4, head_dim=32, mlp_dim=512, num_layers=4, feature_layers=(-1, -3)),
    llm=LLMConfig(d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=32, mlp_hidden_size=1024,
                  vocab_size=4096, embedding_size=4096),
)


def batch(rng, b, length, crops):
    ids = rng.randint(0, 4096, (b, length)).astype(np.int32)
    if not crops:
        return (ids,)
    images = rng.randn(b, crops, 576, 588).astype(np.float32)
    idx = np.broadcast_to(np.arange(crops * 144).reshape(1, crops, 144) + 1, (b, crops, 144)).astype(np.int32)
    return ids, images, np.ones((b, crops, 576), np.float32), idx


def time_forward(model, args, repeats):
    forward = nnx.jit(lambda m, *a: m(*a))
    t0 = time.perf_counter()
    jax.block_until_ready(forward(model, *args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(forward(model, *args))
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model = Molmo(SMALL, rngs=nnx.Rngs(0))
    rng = np.random.RandomState(0)
    print(f"{'case':<12} | {'batch x len':>11} | {'compile+1st s':>13} | {'ms / forward':>12} | {'tokens/s':>9}")
    print(f"{'-' * 12}-+-{'-' * 11}-+-{'-' * 13}-+-{'-' * 12}-+-{'-' * 9}")
    for name, b, length, crops in (("text only", 4, 512, 0), ("with images", 2, 512, 3)):
        first, median = time_forward(model, batch(rng, b, length, crops), args.repeats)
        print(f"{name:<12} | {f'{b} x {length}':>11} | {first:>13.2f} | {1e3 * median:>12.1f} | "
              f"{b * length / median:>9.0f}")


if __name__ == "__main__":
    main()

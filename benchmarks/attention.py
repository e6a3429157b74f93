"""Attention backends on this machine: forward and forward + gradient time, compiled temp memory.

  python benchmarks/attention.py                        # the 36M config's decoder shapes, 1024 tokens
  python benchmarks/attention.py --seq-len 1024 4096 --heads 8 --kv-heads 4 --head-dim 64
  python benchmarks/attention.py --no-mask --batch 10 --seq-len 577 --heads 4 --kv-heads 4   # the 36M ViT

Inputs: batch x seq_len right-padded sequences (the last 10% padding) with two conversations per
image (subsegment ids), causal, float32, q/k/v of the given heads. Each row gives the median of
`--steps` runs after one warm-up, per backend, and the temp memory XLA's compiled memory analysis
reports for forward + gradient. On CPU, "auto" (attention.select_implementation) picks the
einsum for sequences of one chunked tile (512 tokens) and the chunked kernel beyond; this
table is what that rests on. Measured on the 2-core CPU machine, batch 2, 8 / 4 heads of 64:

| tokens | backend | forward ms | forward + grad ms | temp MiB (fwd + grad) |
|---:|---|---:|---:|---:|
| 512 | reference | 59.5 | 115.3 | 66.1 |
| 512 | chunked | 61.8 | 164.5 | 73.1 |
| 1024 | reference | 280.0 | 674.3 | 260.1 |
| 1024 | chunked | 197.0 | 589.5 | 94.3 |
| 2048 | reference | 1418.7 | 3293.4 | 1032.3 |
| 2048 | chunked | 610.4 | 1651.9 | 110.5 |
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from molmo_jax.model.attention import AttentionMask, dot_product_attention

BACKENDS = ("reference", "chunked")


def inputs(batch: int, t: int, heads: int, kv_heads: int, head_dim: int):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(batch, t, heads, head_dim)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(batch, t, kv_heads, head_dim)), jnp.float32) for _ in range(2))
    valid = np.arange(t)[None] < int(0.9 * t)
    sub = np.where(np.arange(t) < t // 2, 10000, np.where(np.arange(t) < 3 * t // 4, 1, 2))
    mask = AttentionMask(key_valid=jnp.asarray(np.broadcast_to(valid, (batch, t))),
                         subsegment_ids=jnp.asarray(np.broadcast_to(sub, (batch, t))))
    return q, k, v, mask


def timed(fn, args, steps: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, nargs="+", default=[1024])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--no-mask", action="store_true",
                   help="every query sees every key (the ViT's crops and the pooling windows)")
    args = p.parse_args(argv)

    print(f"device: {jax.device_count()} x {jax.devices()[0].device_kind}; batch {args.batch}, "
          f"{args.heads} heads / {args.kv_heads} kv heads of {args.head_dim}, float32, "
          + ("no mask" if args.no_mask else "causal, padding, two conversations"))
    print("| tokens | backend | forward ms | forward + grad ms | temp MiB (fwd + grad) |")
    print("|---:|---|---:|---:|---:|")
    for t in args.seq_len:
        q, k, v, mask = inputs(args.batch, t, args.heads, args.kv_heads, args.head_dim)
        mask = None if args.no_mask else mask
        for name in BACKENDS:
            def forward(q, k, v, mask, name=name):
                return dot_product_attention(q, k, v, mask, implementation=name)
            grad = jax.jit(jax.grad(lambda q, k, v, mask: jnp.sum(forward(q, k, v, mask) ** 2), argnums=(0, 1, 2)))
            temp = grad.lower(q, k, v, mask).compile().memory_analysis().temp_size_in_bytes
            fwd_s = timed(jax.jit(forward), (q, k, v, mask), args.steps)
            grad_s = timed(grad, (q, k, v, mask), args.steps)
            print(f"| {t} | {name} | {fwd_s * 1e3:.1f} | {grad_s * 1e3:.1f} | {temp / 2**20:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

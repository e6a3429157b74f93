"""Mixture-of-experts layer: forward+backward time, FLOPs, and tokens dropped by capacity.

    python benchmarks/moe.py [--repeats 3] [--sizes demo,16] [--dtype float32]

`--sizes` picks rows from: demo (the tiny LLM's MoE), 16 (a 16-expert layer), molmoe (one
MolmoE-1B layer, E64 k8 D2048 F1024; meant for an accelerator). For each, one
`MoEFeedForward` (float32 parameters, `--dtype` compute) runs jit(grad(sum(y**2))) w.r.t. its
parameters and input, in dropless "sorted" mode (ragged_dot) and in "capacity" mode at
capacity factors 1.0, 1.25 and 2.0. Columns:
  ms        median wall time of one forward+backward on this machine's CPU
  dense-eq  useful GFLOP: 3 x (2 * tokens * k * 3 * D * F + router), i.e. what a dense SwiGLU
            of k experts' width would cost for the same tokens (forward + 2x for backward)
  actual    GFLOP that XLA's cost analysis reports for the compiled forward+backward
            (includes the dispatch / combine einsums and, in capacity mode, the empty slots)
  dropped   fraction of the tokens*k (token, expert) assignments over capacity
Routing: N(0, 0.02) router as initialised, random normal inputs (a trained router is more
skewed and drops more at the same factor).
"""
import argparse
import dataclasses
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from molmo_jax.model.config import MOLMOE_1B, TINY_MOE, LLMConfig  # noqa: E402
from molmo_jax.model.moe import MoEFeedForward  # noqa: E402

CONFIGS = {  # name: (row label, LLM config, batch, length)
    # The tiny test/demo LLM's MoE (d 64, 8 experts, top-2, expert width 64), 8 x 256 tokens.
    "demo": ("demo (E8 k2 D64 F64)", TINY_MOE.llm, 8, 256),
    # A 16-expert layer of a small real model, 4 x 512 tokens.
    "16": ("16-expert (E16 k2 D512 F512)", dataclasses.replace(
        TINY_MOE.llm, d_model=512, moe_num_experts=16, moe_top_k=2, moe_hidden_size=512), 4, 512),
    # One MolmoE-1B layer at a training micro-batch of 4 x 2048 tokens.
    "molmoe": ("MolmoE-1B (E64 k8 D2048 F1024)", MOLMOE_1B.llm, 4, 2048),
}
MODES = [("sorted", None), ("capacity", 1.0), ("capacity", 1.25), ("capacity", 2.0)]


def measure(config: LLMConfig, batch: int, length: int, repeats: int, dtype):
    module = MoEFeedForward(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(module)
    x = jax.random.normal(jax.random.key(1), (batch, length, config.d_model), jnp.float32)

    def loss(params, x):
        y, aux = nnx.merge(graphdef, params)(x, dtype)
        return jnp.sum(y.astype(jnp.float32) ** 2), aux["dropped_tokens"]

    step = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
    compiled = step.lower(params, x).compile()
    flops = compiled.cost_analysis().get("flops", float("nan"))
    (grads, dropped) = compiled(params, x)
    jax.block_until_ready(grads)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, x))
        times.append(time.perf_counter() - start)
    tokens = batch * length
    d, f, e, k = config.d_model, config.moe_hidden_size, config.moe_num_experts, config.moe_top_k
    dense_eq = 3 * (2 * tokens * k * 3 * d * f + 2 * tokens * d * e)
    return statistics.median(times) * 1e3, dense_eq / 1e9, flops / 1e9, float(dropped) / (tokens * k)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default="demo,16", help=f"comma-separated, from {sorted(CONFIGS)}")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    unknown = set(args.sizes.split(",")) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown --sizes {sorted(unknown)}; choose from {sorted(CONFIGS)}")
    rows = []
    for size in args.sizes.split(","):
        name, base, batch, length = CONFIGS[size]
        for dispatch, factor in MODES:
            config = dataclasses.replace(base, moe_dispatch=dispatch, moe_capacity_factor=factor or 1.0)
            ms, dense_eq, actual, dropped = measure(config, batch, length, args.repeats, jnp.dtype(args.dtype))
            mode = "sorted (dropless)" if factor is None else f"capacity {factor:g}"
            rows.append((name, f"{batch}x{length}", mode, f"{ms:.1f}", f"{dense_eq:.3f}", f"{actual:.3f}",
                         f"{actual / dense_eq:.2f}", f"{100 * dropped:.1f}%"))
    header = ("config", "tokens", "dispatch", "ms fwd+bwd", "dense-eq GFLOP", "actual GFLOP", "actual/dense",
              "dropped")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    print(f"MoE layer forward+backward on {jax.devices()[0].device_kind} ({jax.device_count()} device), "
          f"{args.dtype} compute, jax {jax.__version__}")
    for row in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))


if __name__ == "__main__":
    main()

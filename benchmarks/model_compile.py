"""Compile time of the LLM forward vs depth: layers are stacked and scanned, so going from 2
to 28 layers must leave the compile time flat.

    python benchmarks/model_compile.py [--layers 2 28] [--width 64]

Tiny width (d_model 64, 4 heads, GQA 2, SwiGLU 128, vocab 512), batch 2 x 128 tokens, float32,
abstract parameters (nothing allocated): `jax.jit(...).lower(...)` then `.compile()`, each
timed once on a fresh model of the given depth. Prints one table.
"""
import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from molmo_jax.model.config import LLMConfig  # noqa: E402
from molmo_jax.model.llm import LLM  # noqa: E402


def compile_times(n_layers: int, width: int, batch: int = 2, length: int = 128):
    config = LLMConfig(d_model=width, n_layers=n_layers, n_heads=4, n_kv_heads=2, head_dim=width // 4,
                       mlp_hidden_size=2 * width, vocab_size=512, embedding_size=512)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: LLM(config, rngs=nnx.Rngs(0))))

    def forward(state, ids):
        llm = nnx.merge(graphdef, state)
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        return llm(llm.embed_tokens(ids), positions, token_valid=ids != -1)[0]

    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    t0 = time.perf_counter()
    lowered = jax.jit(forward).lower(state, ids)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    params = sum(x.size for x in jax.tree.leaves(state))
    return params, t1 - t0, t2 - t1


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 28])
    parser.add_argument("--width", type=int, default=64)
    args = parser.parse_args()
    compile_times(1, args.width)  # warm-up: first-use costs of jax itself are not the model's
    print(f"{'layers':>6} | {'params':>10} | {'lower s':>8} | {'compile s':>9}")
    print(f"{'-' * 6}-+-{'-' * 10}-+-{'-' * 8}-+-{'-' * 9}")
    for n in args.layers:
        params, lower, comp = compile_times(n, args.width)
        print(f"{n:>6} | {params:>10,} | {lower:>8.2f} | {comp:>9.2f}")


if __name__ == "__main__":
    main()

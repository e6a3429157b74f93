"""LoRA vs full fine-tuning on one tiny model: training-state memory, step time, int8 / nf4 weights.

  python benchmarks/lora.py                       # LLM 256 x 4 blocks, rank 8, batch 4 x 128 tokens
  python benchmarks/lora.py --d-model 512 --layers 6 --rank 16

Rows: full fine-tuning (trainer defaults: base embedding frozen), LoRA on the LLM attention + MLP
(float32 base) and QLoRA (int8 and nf4 bases), on one CPU device, text-only batches. "state MiB"
is the training state the trainer holds (params, frozen base, Adam moments) and "checkpoint MiB"
what a checkpoint of it stores (a LoRA checkpoint omits the base); "temp MiB" is XLA's compiled
temp memory of the step; step ms the median of --steps steps after one warm-up. Bytes count
device memory: nf4 codes (uint4) as half a byte, as XLA packs them. The second table: bytes per
Dense-kernel parameter (codes plus scales) and the max |logit difference| of weight-only int8 /
nf4 inference vs float32 on a random batch of the random-init model (max |logit| for scale).
Measured on the 2-core CPU machine, defaults, while other runs loaded it to 6x its cores (times
are noise; the memory columns are exact):

| run | trainable params | state MiB | checkpoint MiB | temp MiB | step ms |
|---|---:|---:|---:|---:|---:|
| full | 4,558,272 | 52.7 | 52.7 | 122.6 | 3628.0 |
| lora | 180,224 | 20.0 | 2.1 | 109.8 | 4540.2 |
| qlora-int8 | 180,224 | 7.1 | 2.1 | 124.8 | 3270.2 |
| qlora-nf4 | 180,224 | 5.2 | 2.1 | 124.8 | 2843.8 |

| weights | bytes / kernel param | max abs logit diff vs float32 | max abs logit |
|---|---:|---:|---:|
| float32 | 4.000 | 0 | 1.23 |
| int8 | 1.016 | 0.0289 | 1.23 |
| nf4 | 0.568 | 0.406 | 1.23 |

nf4 is 0.5 bytes of code plus one float32 scale per block of 64 (0.5625), a little more where the
tiny ViT's 32-wide axes make blocks of 32. Its logit error is about 14x int8's, in line with a
grid 16x coarser; on this random model it is a third of the largest logit (nf4 is meant for
trained weights, whose values are near normal). At this size the step's temp memory (activations,
the 512-column logits) dominates, and the embeddings, norms and biases stay float32; the
state columns are what grows with the model.
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from flax import nnx

import configs
from configs import common
from molmo_jax.inference.predictor import with_compute_dtype
from molmo_jax.model import lora, sharding
from molmo_jax.model.config import TINY_QWEN2
from molmo_jax.tools.logits import compute_logits
from molmo_jax.train import trainer
from molmo_jax.train.export_verify import random_batch

MIB = 2 ** 20


def experiment(args, rank: int, base_dtype: str):
    cfg = configs.load("configs/demo.py:pretrain")
    cfg.model = common.model_config(TINY_QWEN2)
    cfg.model.llm.update(dict(d_model=args.d_model, n_layers=args.layers, n_heads=args.d_model // 32,
                              n_kv_heads=args.d_model // 64, head_dim=32, mlp_hidden_size=8 * args.d_model))
    cfg.mesh = dict(data=1, fsdp=1, tensor=1, expert=1)
    cfg.lora.update(dict(rank=rank, base_dtype=base_dtype))
    return cfg


def nbytes(tree) -> float:
    """Device bytes of a tree's arrays: nf4 codes (uint4) count half a byte, as XLA packs them."""
    return sum(int(np.prod(x.shape)) * jax.dtypes.itemsize_bits(x.dtype) / 8 for x in jax.tree.leaves(tree))


def train_row(args, name: str, rank: int, base_dtype: str):
    cfg = experiment(args, rank, base_dtype)
    mesh = sharding.make_mesh(cfg.mesh.to_dict(), jax.devices()[:1])
    setup = trainer.build_train_setup(cfg, trainer.model_config_from(cfg), mesh)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 500, (args.batch, args.seq_len + 1)).astype(np.int32)
    batch = sharding.make_global_batch({"input_ids": ids[:, :-1], "target_tokens": ids[:, 1:],
                                        "loss_masks": np.ones((args.batch, args.seq_len), np.float32)}, mesh)
    state = setup.init(jax.random.key(0))
    temp = setup.step_fn.lower(state, batch).compile().memory_analysis().temp_size_in_bytes
    state, _ = setup.step_fn(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, m = setup.step_fn(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    trainable = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
    saved = trainer.saved_part(state, trainer.lora_config_from(cfg))
    return (f"| {name} | {trainable:,} | {nbytes(state) / MIB:.1f} | {nbytes(saved) / MIB:.1f} | {temp / MIB:.1f} "
            f"| {1000 * float(np.median(times)):.1f} |")


def weight_rows(args):
    cfg = experiment(args, 0, "float32")
    model_cfg = trainer.model_config_from(cfg)
    model = lora.build(model_cfg, lora.LoraConfig(), nnx.Rngs(0))
    batch = random_batch(model_cfg)
    reference = compute_logits(model, batch)
    rows = []
    for name in ("float32", "int8", "nf4"):
        m = model if name == "float32" else with_compute_dtype(model, "float32", name)
        layers = lora.dense_layers(m).values()
        stored = sum(nbytes([d.kernel[...]] + ([d.kernel_scale[...]] if d.kernel_scale is not None else []))
                     for d in layers)
        count = sum(int(np.prod(d.kernel.shape)) for d in layers)
        diff = float(np.max(np.abs(compute_logits(m, batch) - reference)))
        rows.append(f"| {name} | {stored / count:.3f} | {diff:.3g} | {float(np.max(np.abs(reference))):.3g} |")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args(argv)
    print("| run | trainable params | state MiB | checkpoint MiB | temp MiB | step ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, rank, base_dtype in (("full", 0, "float32"), ("lora", args.rank, "float32"),
                                   ("qlora-int8", args.rank, "int8"), ("qlora-nf4", args.rank, "nf4")):
        print(train_row(args, name, rank, base_dtype), flush=True)
    print()
    print("| weights | bytes / kernel param | max abs logit diff vs float32 | max abs logit |")
    print("|---|---:|---:|---:|")
    for row in weight_rows(args):
        print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

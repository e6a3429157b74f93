"""Training-step speed on this machine, and analytic FLOPs per step of the released recipes.

  python benchmarks/train_step.py                          # demo and ~100M models, float32, CPU
  python benchmarks/train_step.py --size 100m --dtype bfloat16 --batch 8 --seq-len 2304 --max-crops 12 --remat full
  python benchmarks/train_step.py --size 1b --dtype bfloat16 --batch 8 --seq-len 2304 --max-crops 12 --remat full

Measured rows: compile time of the full training step (forward, backward, per-group clipping,
AdamW), then the median time of `--steps` steps on random inputs of the model's shapes, with
tokens/s and, where the device's peak FLOP/s is known, MFU. Analytic rows: model FLOPs of one
optimizer step of stage 1 (batch 128) and stage 2 (batch 256) at seq_len 2304 with 13 crops per
example, counting the ViT; "frozen ViT" shows the same step if the ViT were frozen (forward only),
the frozen base embedding adds no matmul FLOPs either way. One table is printed.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax
import numpy as np

import configs
from configs import common
from molmo_jax import sharding
from molmo_jax.flops import params_count
from molmo_jax.model.config import LLMConfig, MOLMO_7B_D, MOLMO_7B_O, MOLMO_72B, MOLMOE_1B, VisionConfig
from molmo_jax.train import trainer
from molmo_jax.train.metrics_logging import peak_flops, train_step_flops

# A ~100M-parameter Molmo: small CLIP-style ViT, Qwen2-style LLM with a 32k vocabulary.
MODEL_100M = dataclasses.replace(
    MOLMO_7B_D,
    vision=VisionConfig(image_size=(112, 112), width=384, num_heads=6, head_dim=64, mlp_dim=1536, num_layers=8,
                        feature_layers=(-2, -5)),
    llm=LLMConfig(d_model=640, n_layers=10, n_heads=10, n_kv_heads=2, head_dim=64, mlp_hidden_size=2 * 1728,
                  vocab_size=32000, embedding_size=32000),
)
# A ~1.6B-parameter Molmo for accelerators: the released CLIP ViT-L/14-336 and a 16-layer Qwen2-style LLM.
MODEL_1B = dataclasses.replace(
    MOLMO_7B_D,
    llm=LLMConfig(d_model=2048, n_layers=16, n_heads=16, n_kv_heads=2, head_dim=128, mlp_hidden_size=2 * 5632),
)
SIZES = {"100m": MODEL_100M, "1b": MODEL_1B}
RELEASES = {"MolmoE-1B": MOLMOE_1B, "Molmo-7B-O": MOLMO_7B_O, "Molmo-7B-D": MOLMO_7B_D, "Molmo-72B": MOLMO_72B}


def experiment(size: str, dtype: str, batch: int, seq_len: int, max_crops: int, remat: str):
    c = configs.load("configs/demo.py:pretrain")
    if size in SIZES:
        c.model = common.model_config(SIZES[size])
    c.model.dtype = dtype
    c.model.remat_policy = remat
    c.model.llm.response_residual_dropout = 0.1  # stage-1 recipe: dropout is part of the step
    c.train.global_batch, c.data.seq_len, c.data.max_crops = batch, seq_len, max_crops
    c.mesh = dict(data=1, fsdp=-1, tensor=1, expert=1)
    return c


def random_batch(model_cfg, batch: int, seq_len: int, crops: int, rng: np.random.Generator) -> dict:
    """Inputs of the pipeline's shapes; every crop's pooled tokens land in the sequence."""
    v, llm = model_cfg.vision, model_cfg.llm
    tokens = (v.grid[0] // 2) * (v.grid[1] // 2)
    idx = np.arange(1, 1 + crops * tokens).reshape(crops, tokens) % seq_len
    ids = rng.integers(0, llm.vocab_size, (batch, seq_len)).astype(np.int32)
    return {"input_ids": ids, "target_tokens": np.roll(ids, -1, 1),
            "loss_masks": (rng.random((batch, seq_len)) < 0.5).astype(np.float32),
            "images": rng.normal(size=(batch, crops, v.num_patches, v.patch_dim)).astype(np.float32),
            "image_masks": np.ones((batch, crops, v.num_patches), np.float32),
            "image_input_idx": np.broadcast_to(idx, (batch, crops, tokens)).astype(np.int32)}


def measure(size: str, dtype: str, batch: int, seq_len: int, max_crops: int, remat: str, steps: int) -> dict:
    config = experiment(size, dtype, batch, seq_len, max_crops, remat)
    model_cfg = trainer.model_config_from(config)
    mesh = sharding.make_mesh(config.mesh.to_dict())
    setup = trainer.build_train_setup(config, model_cfg, mesh)
    state = setup.init(jax.random.key(0))
    crops = max_crops + 1
    batch_arrays = sharding.make_global_batch(random_batch(model_cfg, batch, seq_len, crops,
                                                           np.random.default_rng(0)), mesh)
    t0 = time.perf_counter()
    step = setup.step_fn.lower(state, batch_arrays).compile()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps + 1):  # the first run warms up allocations
        t0 = time.perf_counter()
        state, metrics = step(state, batch_arrays)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times[1:]))
    flops = train_step_flops(model_cfg, batch, seq_len, crops)
    peak = peak_flops(jax.devices()[0].device_kind)
    return {"params": params_count(model_cfg)["total"], "compile_s": compile_s, "step_s": step_s,
            "tokens_s": batch * seq_len / step_s, "tflop_step": flops / 1e12,
            "mfu": flops / step_s / (peak * mesh.size) if peak else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=("demo", "100m", "1b", "both"), default="both")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--batch", type=int, default=None, help="global batch (default: 8 demo, 4 for 100m)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-crops", type=int, default=2)
    p.add_argument("--remat", choices=("none", "full", "dots", "dots_no_batch"), default="none",
                   help="activation rematerialisation of the scanned blocks (the releases use full)")
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    args = p.parse_args(argv)

    device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    rows = []
    for size in (("demo", "100m") if args.size == "both" else (args.size,)):
        batch = args.batch or (8 if size == "demo" else 4)
        m = measure(size, args.dtype, batch, args.seq_len, args.max_crops, args.remat, args.steps)
        rows.append([f"{size} (measured)", f"{m['params'] / 1e6:.1f}M", f"{batch}x{args.seq_len}, {args.max_crops + 1} crops",
                     f"{m['compile_s']:.1f}", f"{m['step_s'] * 1e3:.0f}", f"{m['tokens_s']:.0f}",
                     f"{m['tflop_step']:.4f}", "-", f"{m['mfu']:.1%}" if m["mfu"] is not None else "n/a"])
    for name, cfg in RELEASES.items():
        for stage, batch in (("stage 1", 128), ("stage 2", 256)):
            full = train_step_flops(cfg, batch, 2304, 13)
            frozen_vit = train_step_flops(cfg, batch, 2304, 13, trained=("connector", "llm"))
            rows.append([f"{name} {stage} (analytic)", f"{params_count(cfg)['total'] / 1e9:.2f}B",
                         f"{batch}x2304, 13 crops", "-", "-", "-", f"{full / 1e12:.0f}", f"{frozen_vit / 1e12:.0f}", "-"])

    header = ["config", "params", "batch", "compile s", "step ms", "tokens/s", "TFLOP/step", "frozen-ViT TFLOP",
              "MFU"]
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    print(f"train step, {args.dtype} compute, float32 params, remat {args.remat}, on {device}")
    for r in [header, ["-" * w for w in widths]] + rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

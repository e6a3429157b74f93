"""Training-step speed on this machine, and analytic FLOPs per step of the released recipes.

  python benchmarks/train_step.py                          # demo and ~100M models, float32, CPU
  python benchmarks/train_step.py --size 100m --dtype bfloat16 --batch 8 --seq-len 2304 --max-crops 12 --remat full
  python benchmarks/train_step.py --size 1b --dtype bfloat16 --batch 8 --seq-len 2304 --max-crops 12 --remat full
  python benchmarks/train_step.py --size 36m      # forward, ViT, train step, generation, peak memory: 36M config
  python benchmarks/train_step.py --size make-demo [--config KEY=VALUE ...]   # what `make demo` trains

Measured rows: compile time of the full training step (forward, backward, per-group clipping,
AdamW), then the median time of `--steps` steps on random inputs of the model's shapes, with
tokens/s and, where the device's peak FLOP/s is known, MFU. Analytic rows: model FLOPs of one
optimizer step of stage 1 (batch 128) and stage 2 (batch 256) at seq_len 2304 with 13 crops per
example, counting the ViT; "frozen ViT" shows the same step if the ViT were frozen (forward only),
the frozen base embedding adds no matmul FLOPs either way. One table is printed.

The 36M rows against the official PyTorch figures of the compute-core issue (4.84 s step, 3.4 GB
peak; measured on another machine of this kind, so ratios are indicative), on the 2-core CPU
with other work running, `--size 36m --steps 3`:

| remat | forward | ViT | train step | prefill | decode / token | peak memory | step temporaries |
|---|---:|---:|---:|---:|---:|---:|---:|
| none | 3.52 s | 1.78 s | 12.62 s | 1.74 s | 8.9 ms | 5.00 GB | 3.20 GiB |
| dots_and_attention (run under heavier load) | 5.02 s | 2.45 s | 21.85 s | 2.01 s | 16.0 ms | 3.28 GB | 1.57 GiB |

`--size make-demo` on a 2-core AMD EPYC (nothing else running): step 268-296 ms on real batches,
input pipeline 100 ms of CPU per batch, 12.4 examples per batch of 8 rows, 78% of the crop slots
and 72% of the tokens real. `make demo` itself ran 2600 steps in 16.5 min there (381 ms a step:
the step plus the pipeline, which shares the two cores); the README's machine ran them at 215 ms.

dots_and_attention halves the step's temporaries at no cost in step time on this CPU (three
policies' steps interleaved in one process: none 23.1 s, dots_and_attention 23.0 s, full 25.0 s
per step under a load of 4; wall times of that run are load-bound, the ratios are what counts).
"""
from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
import time

import jax
import numpy as np
from flax import nnx

import configs
from configs import common
from molmo_jax.model import sharding
from molmo_jax.model.flops import params_count
from molmo_jax.model.layers import REMAT_POLICIES
from molmo_jax.model.config import LLMConfig, MOLMO_7B_D, MOLMO_7B_O, MOLMO_72B, MOLMOE_1B, VisionConfig
from data_pipelines import multicrop
from molmo_jax.inference.generate import GenerationConfig, Generator
from molmo_jax.model.molmo import Molmo
from molmo_jax.train import optimizer as opt_lib
from molmo_jax.train import trainer
from molmo_jax.train.metrics_logging import peak_flops, train_step_flops, useful_train_step_flops

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
# The 36M-parameter config the CPU comparison with the official PyTorch code uses (the official
# initialiser's shapes): CLIP-style ViT 336/14, width 256 x 12 layers, features of -2 and -9; 2x2
# attention-meanq pooling; SwiGLU projector 256 -> 1376 -> 512; Qwen2-style LLM 512 x 8 layers, 8 / 4
# heads of 64, qkv bias, RoPE 1e6, vocab 1024 + 128 rows, untied head. 35,976,704 parameters.
MODEL_36M = dataclasses.replace(
    MOLMO_7B_D,
    vision=VisionConfig(width=256, num_heads=4, head_dim=64, mlp_dim=1024, num_layers=12, feature_layers=(-2, -9)),
    llm=LLMConfig(d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, head_dim=64, mlp_hidden_size=2 * 1376,
                  vocab_size=1024, embedding_size=1024, rope_theta=1e6, qkv_bias=True),
)
SIZES = {"100m": MODEL_100M, "1b": MODEL_1B, "36m": MODEL_36M}
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
    # Useful FLOPs: the real tokens and crops (this random batch has no padding, so all of them).
    flops = useful_train_step_flops(model_cfg, np.asarray(batch_arrays["input_ids"]), np.asarray(batch_arrays["images"]))
    peak = peak_flops(jax.devices()[0].device_kind)
    return {"params": params_count(model_cfg)["total"], "compile_s": compile_s, "step_s": step_s,
            "tokens_s": batch * seq_len / step_s, "tflop_step": flops / 1e12,
            "mfu": flops / step_s / (peak * mesh.size) if peak else None}


def batch_36m(model_cfg, rng: np.random.Generator, batch: int = 2, seq_len: int = 1024) -> dict:
    """The comparison's inputs: per row BOS + the 580 image tokens of a 2x2-tiled image (5 crops,
    the real multi-crop layout) + random text to seq_len, loss on the text."""
    crop = multicrop.CropConfig(max_crops=4)
    vocab = model_cfg.llm.vocab_size
    ids = multicrop.ImageTokenIds(vocab, vocab + 1, vocab + 2, vocab + 3)
    rows = []
    for _ in range(batch):
        image = rng.integers(0, 256, (672, 672, 3), dtype=np.uint8)
        crops = multicrop.preprocess_image(image, crop, ids)
        text = rng.integers(0, vocab, seq_len - 1 - len(crops["image_tokens"]))
        tokens = np.concatenate([[0], crops["image_tokens"], text]).astype(np.int32)
        idx = crops["image_input_idx"]
        rows.append(dict(input_ids=tokens, images=crops["images"], image_masks=crops["image_masks"],
                         image_input_idx=np.where(idx >= 0, idx + 1, idx).astype(np.int32),
                         target_tokens=np.roll(tokens, -1), loss_masks=(np.arange(seq_len) > seq_len - len(text) - 2)
                         .astype(np.float32)))
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def timed(fn, *args, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def generation_36m(model, model_cfg, repeats: int) -> tuple[float, float]:
    """Seconds of the prefill of one 613-token prompt (BOS + 580 image tokens + 32 text tokens, 5
    crops) and per decoded token, as users call the Generator (default GenerationConfig: 12 new
    tokens): prefill = a 1-token generation; decode = (23-token generation - 12-token generation)
    / 11, two runs that both decode, so the difference is decode steps only (a 1-token run has
    none, and its prefill alone is within timing noise of a 12-token run on a busy machine)."""
    host = batch_36m(model_cfg, np.random.default_rng(1), batch=1, seq_len=613)
    prompt = {k: host[k] for k in ("input_ids", "images", "image_masks", "image_input_idx")}
    generator = Generator(model)
    defaults = GenerationConfig()
    prefill_s = timed(lambda: generator(prompt, GenerationConfig(max_new_tokens=1)).tokens, repeats=repeats)
    extra = defaults.max_new_tokens - 1
    longer = dataclasses.replace(defaults, max_new_tokens=defaults.max_new_tokens + extra)
    short_s = timed(lambda: generator(prompt, defaults).tokens, repeats=repeats)
    long_s = timed(lambda: generator(prompt, longer).tokens, repeats=repeats)
    return prefill_s, (long_s - short_s) / extra


def measure_36m(steps: int, remat: str = "none") -> list:
    """Rows of the 36M comparison: forward (loss), the ViT alone on the 10 crops, the train step
    (forward, CE, backward, AdamW: b 0.9 / 0.95, eps 1e-6, no weight decay, no clipping,
    nothing frozen), float32, and the process's peak resident memory."""
    c = experiment("36m", "float32", 2, 1024, 4, remat)
    c.model.llm.response_residual_dropout = 0.0
    c.optimizer.update(dict(b1=0.9, b2=0.95, eps=1e-6, weight_decay=0.0, clip_norm=0.0, frozen=""))
    model_cfg = trainer.model_config_from(c)
    mesh = sharding.make_mesh(c.mesh.to_dict())
    setup = trainer.build_train_setup(c, model_cfg, mesh)
    state = setup.init(jax.random.key(0))
    host = batch_36m(model_cfg, np.random.default_rng(0))
    batch = sharding.make_global_batch(host, mesh)
    eval_step = jax.jit(trainer.make_eval_step(setup.graphdef, c))
    forward_s = timed(eval_step, state["params"], state["frozen"], batch, repeats=steps)
    vision = nnx.merge(setup.graphdef, opt_lib.merge_trees(state["params"], state["frozen"])).vision
    crops = jax.numpy.asarray(host["images"].reshape(-1, *host["images"].shape[2:]))
    vit_s = timed(jax.jit(lambda x: vision(x)), crops, repeats=steps)
    prefill_s, decode_s = generation_36m(nnx.merge(setup.graphdef, opt_lib.merge_trees(state["params"], state["frozen"])),
                                         model_cfg, repeats=steps)
    step = setup.step_fn.lower(state, batch).compile()
    temp_gb = step.memory_analysis().temp_size_in_bytes / 2**30
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t0)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return [["forward, batch 2 x 1024 tokens, 5 crops each", f"{forward_s:.3f} s"],
            ["vision backbone only (10 crops)", f"{vit_s:.3f} s"],
            ["train step (forward, CE, backward, AdamW)", f"{np.median(times[1:]):.3f} s"],
            ["generation prefill, 613-token prompt (Generator defaults)", f"{prefill_s:.3f} s"],
            ["generation decode per token (Generator defaults)", f"{decode_s * 1e3:.1f} ms"],
            ["peak host memory of the process", f"{peak_gb:.2f} GB"],
            ["train step temporaries (XLA memory analysis)", f"{temp_gb:.2f} GiB"],
            ["parameters", f"{params_count(model_cfg)['total']:,}"],
            ["loss at step 1", f"{float(metrics['loss']):.6f}"]]


def cpu_model() -> str:
    """The host CPU's model name (/proc/cpuinfo), as the demo's time targets are quoted per CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return f"{names[0]} x {len(names)}" if names else "unknown CPU"
    except OSError:
        return "unknown CPU"


def measure_make_demo(steps: int, overrides: list) -> list:
    """Rows for the `make demo` recipe (configs/demo.py:sft plus demo-style --config overrides) on
    batches of its real pipeline: the train step alone, the pipeline's CPU time per batch (one
    thread; in the demo it shares the same cores), how full the rows are, and the training time
    that the step implies for the recipe's step count."""
    import tempfile
    from molmo_jax.demo import __main__ as demo_cli
    from molmo_jax.demo.data import tokenizer_text, train_tokenizer
    from molmo_jax.train import families
    args = demo_cli.parse_args([f"--config={o}" for o in overrides])
    c = demo_cli.build_config(args, tokenizer_path="")
    with tempfile.TemporaryDirectory() as tmp:
        c.data.tokenizer = train_tokenizer(tmp, tokenizer_text(c, 40), int(c.model.llm.vocab_size) - 12)
        c.data.prefetch = 0
        family = families.family_of(c)
        it = iter(family.make_pipeline(c))
        n_batches = max(steps, 8)
        next(it)
        t0 = time.process_time()
        host = [next(it) for _ in range(n_batches)]
        pipeline_s = (time.process_time() - t0) / n_batches
    model_cfg = trainer.model_config_from(c)
    mesh = sharding.make_mesh(c.mesh.to_dict())
    setup = trainer.build_train_setup(c, model_cfg, mesh)
    state = setup.init(jax.random.key(0))
    batches = [sharding.make_global_batch(trainer._model_batch(b, family), mesh) for b in host]
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        step = setup.step_fn.lower(state, batches[0]).compile()
        compile_s = time.perf_counter() - t0
        state, metrics = step(state, batches[0])
        jax.block_until_ready(metrics["loss"])
        times = []
        for b in batches:
            t0 = time.perf_counter()
            state, metrics = step(state, b)
            jax.block_until_ready(metrics["loss"])
            times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    # A padding crop is all -1 (the model's crop_valid); every example brings 1 + max_crops crops.
    slots = np.concatenate([~np.all(b["images"] == -1, axis=(2, 3)).ravel() for b in host])
    text = np.concatenate([b["input_ids"].ravel() for b in host])
    examples = slots.sum() / len(host) / (1 + int(c.data.max_crops))
    total = int(c.train.total_steps)
    return [["train step (real batches, median)", f"{step_s * 1e3:.0f} ms"],
            ["compile", f"{compile_s:.1f} s"],
            ["input pipeline CPU per batch (one thread)", f"{pipeline_s * 1e3:.0f} ms"],
            ["batch", f"{int(c.train.global_batch)} rows x {int(c.data.seq_len)} tokens, "
                      f"{host[0]['images'].shape[1]} crop slots a row"],
            ["examples per batch", f"{examples:.1f}"],
            ["crop slots holding an image (the ViT encodes all)", f"{np.mean(slots):.0%}"],
            ["tokens that are not padding", f"{np.mean(text >= 0):.0%}"],
            ["parameters", f"{params_count(model_cfg)['total']:,}"],
            [f"{total} steps at this step time", f"{total * step_s / 60:.1f} min"]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=("demo", "make-demo", "36m", "100m", "1b", "both"), default="both",
                   help="demo: TINY_QWEN2 on random inputs; make-demo: the `make demo` recipe on its real batches")
    p.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                   help="with --size make-demo: a configs/demo.py override, as `python -m molmo_jax.demo --config`")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--batch", type=int, default=None, help="global batch (default: 8 demo, 4 for 100m)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-crops", type=int, default=2)
    p.add_argument("--remat", choices=tuple(REMAT_POLICIES), default="none",
                   help="activation rematerialisation of the scanned blocks (the releases use full)")
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    args = p.parse_args(argv)

    device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    if args.size == "make-demo":
        rows = measure_make_demo(max(args.steps, 8), args.config)
        print(f"`make demo` recipe (configs/demo.py:sft{''.join(' --config ' + o for o in args.config)}), float32, "
              f"on {device}, {cpu_model()}")
        width = max(len(r[0]) for r in rows)
        for name, value in [["measurement", "value"], ["-" * width, "-" * 9]] + rows:
            print(f"{name.ljust(width)}  {value}")
        return 0
    if args.size == "36m":
        rows = measure_36m(max(args.steps, 3), args.remat)
        print(f"36M config, float32, remat {args.remat}, on {device} (compare with the official PyTorch code "
              "run on the same machine)")
        width = max(len(r[0]) for r in rows)
        for name, value in [["measurement", "molmo-jax"], ["-" * width, "-" * 9]] + rows:
            print(f"{name.ljust(width)}  {value}")
        return 0
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
